"""benchmarks/race.py's core on a tiny race: the JSON's schema and its numbers' consistency.

4 workers (cyclic load 2) on 2 Ray actors, 4 of the 6 contenders (a coded one, uncoded,
the quorum and the checkpoint baseline), a low target and a kill loop too slow to fire
within a run, so the test checks the bookkeeping, not the machine's speed: the planner's
prediction against a direct computation on the same draws, each run's times against its
own steps, and the exact contenders against each other (the same gradients, so the same
accuracy at every evaluation).
"""
import json

import jax
import numpy as np
import pytest

ray = pytest.importorskip("ray")

from benchmarks import race  # pylint: disable=wrong-import-position
from jaxgc import assignments, timing  # pylint: disable=wrong-import-position

NAMES = ("partial_straggler", "uncoded", "ignore_stragglers", "uncoded_ckpt")   # the 4 kinds
ARGS = ["--workers=4", "--load=2", "--num_actors=2", "--time_scale=0.004", "--target=0.4",
        "--max_wall=3", "--repeats=1", "--calib_steps=1", "--trials=256", "--mtbf=1000",
        "--eval_every=2", f"--contenders={','.join(NAMES)}"]
KEYS = {"scenario", "name", "repeat", "time_to_target_s", "mean_step_s", "planned_step_s",
        "replayed_step_s", "calibration", "steps", "executed", "exact_fraction", "kills",
        "rollbacks", "stalled_s", "final_accuracy", "curve"}


@pytest.fixture(scope="module")
def raced():
  args = race.parse_args(ARGS)
  problem = race.digits_problem(args)
  straggler = timing.get_model("slowdown")
  with race.local_pool(args.num_actors) as pool:
    result = race.race(pool, problem, straggler, args, log=lambda s: None)
  result["args"] = vars(args)
  return args, straggler, result


def test_schema_and_contenders(raced):
  _, _, result = raced
  result = json.loads(json.dumps(result))        # plain JSON, nothing NumPy left
  runs = result["runs"]
  for r in runs:
    assert set(r) >= KEYS, KEYS - set(r)
  by = {s: [r["name"] for r in runs if r["scenario"] == s] for s in race.SCENARIOS}
  assert by["stragglers"] == [n for n in NAMES if n != "uncoded_ckpt"]
  assert by["kills"] == list(NAMES)
  summary = race.summarize(runs)
  assert [(r["scenario"], r["name"]) for r in summary] == [(r["scenario"], r["name"])
                                                           for r in runs]
  for s, r in zip(summary, runs, strict=True):      # one repeat: the medians are the runs
    assert s["time_to_target_s"] == r["time_to_target_s"]
    assert s["mean_step_s"] == r["mean_step_s"]
  assert set(race.checks(summary)) == {"stragglers: partial_straggler first",
                                       "stragglers: planner within 10%",
                                       "kills: partial_straggler first"}


def test_times_agree_with_the_steps(raced):
  args, _, result = raced
  for r in result["runs"]:
    steps, walls, accs = (np.array(c) for c in zip(*r["curve"], strict=True))
    assert r["executed"] >= r["steps"] > 0 and r["mean_step_s"] > 0
    assert np.all(np.diff(walls) > 0) and walls[0] == 0
    assert list(steps) == list(range(0, r["steps"] + 1, args.eval_every))[:len(steps)]
    if r["time_to_target_s"] is None:
      assert np.all(accs < args.target)
    else:
      # The clock at the target holds every step executed until then (evaluations left out).
      assert accs[-1] >= args.target and np.all(accs[:-1] < args.target)
      assert r["time_to_target_s"] == walls[-1] >= r["mean_step_s"] * r["executed"]
    assert r["rollbacks"] == 0 and r["kills"] == 0     # the kill loop never fired


def test_exact_contenders_apply_the_same_gradients(raced):
  _, _, result = raced
  runs = {r["name"]: r for r in result["runs"] if r["scenario"] == "stragglers"}
  ref = runs["partial_straggler"]["curve"]
  for name in ("uncoded",):
    assert runs[name]["exact_fraction"] == 1.0
    for (s, _, a), (s_ref, _, a_ref) in zip(runs[name]["curve"], ref, strict=False):
      assert s == s_ref and abs(a - a_ref) <= 1 / 359 + 1e-9   # at most one test digit flips


def test_planned_steps_against_a_direct_computation(raced):
  args, straggler, result = raced
  runs = {r["name"]: r for r in result["runs"] if r["scenario"] == "stragglers"}
  for r in runs.values():     # c is shared; each run fits its own lag and rest
    assert r["calibration"]["chunk_s"] == result["calibration"]["chunk_s"] > 0
    assert r["calibration"]["rest_s"] > 0
  # Uncoded on the cyclic code waits for every worker's slot 0: the planner's draws again,
  # by hand (its key is the seed, the assignment the race's).
  tau = straggler.sample(jax.random.key(args.seed), assignments.cyclic(args.workers, args.load),
                         (args.trials,))
  c = result["calibration"]["chunk_s"]
  stop = np.max(np.asarray(tau[..., 0], np.float64) * args.time_scale + c, -1)
  mine = runs["uncoded"]["calibration"]
  np.testing.assert_allclose(runs["uncoded"]["planned_step_s"],
                             np.mean(stop + mine["lag_s"]) + mine["rest_s"], rtol=1e-5)
  mine = runs["ignore_stragglers"]["calibration"]
  cut = np.minimum(stop + mine["lag_s"], result["quorum_deadline"] * args.time_scale)
  np.testing.assert_allclose(runs["ignore_stragglers"]["planned_step_s"],
                             np.mean(cut) + mine["rest_s"], rtol=1e-5)
  # The planned stop of partial_straggler is below uncoded's: one slow worker in 4 is
  # covered by a neighbour's second chunk instead of waited for.
  ps = runs["partial_straggler"]
  assert ps["planned_step_s"] - ps["calibration"]["lag_s"] - ps["calibration"]["rest_s"] \
      < np.mean(stop)

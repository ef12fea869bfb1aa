"""The wall-clock race on Ray: every protocol to a target accuracy, same stragglers, same kills.

An MLP on digits, ``--workers`` workers on one cyclic assignment (load ``--load``) over
``--num_actors`` Ray actors of a local Ray instance; the straggler model is injected as
sleeps of ``τ · time_scale`` seconds per chunk on top of the real compute
(:class:`jaxgc.backends.ray.RayStep`). Every contender trains from the same parameters on
the same batches with the same key, so step ``s`` draws the same durations ``τ`` for all
of them, until the test accuracy reaches ``--target`` (or ``--max_wall`` seconds pass):

* ``partial_straggler`` (exact, ``ℓ = --ell``) and ``original``, on the cyclic code;
* ``backup_workers`` (``--num_backup``): stop at the ``(m − b)``-th worker, drop the rest;
* ``uncoded``: each chunk once, wait for all;
* ``ignore_stragglers``: the quorum semantics of fault-tolerant DDP (torchft). The PS
  waits until the quorum deadline ``--quorum_deadline`` (simulated seconds; default the
  planner's mean exact-step time of ``partial_straggler``, the same budget) and steps with
  the designated chunks that arrived, rescaled by ``N / #arrived``
  (:class:`jaxgc.protocols.IgnoreStragglers`, deadline mode);
* ``uncoded_ckpt`` (``kills`` only): uncoded training that throws away every step a
  failure touches, waits until every actor is alive again and rolls back to its last
  checkpoint, as ``benchmarks/chaos.py`` does (a real ``np.savez`` every ``--ckpt_every``
  steps).

Two scenarios: ``stragglers`` (the injected straggler model only) and ``kills`` (the same
plus one kill schedule: a :class:`jaxgc.backends.ray.KillLoop` with the same seed in every
run, so the kills come at the same seconds after each run's start; Ray restarts the actor).

Per run: ``time_to_target_s`` (wall seconds, evaluation excluded; ``null`` if never
reached), ``mean_step_s`` (mean wall seconds of the steps executed; the PS's waits for a
restarting actor and the checkpoint baseline's rollbacks are excluded) and
``planned_step_s``, the planner's prediction of that mean (:func:`jaxgc.planner.simulate`)
for the durations the actors live, ``τ · time_scale + c`` under the same straggler model,
plus two overheads: the report ``lag`` (dispatch and report latency, added to the stop;
a deadline step is cut at the deadline) and the ``rest`` of a step outside the watch
(solve, message round, decode, update). ``c``, the median real compute of a chunk, is
calibrated once on warm-up steps of every contender; ``lag`` and ``rest`` are refitted
before each run on its own ``--calib_steps`` warm-up steps (the machine's load drifts),
all drawn with another key. ``replayed_step_s`` is the same model on the run's own draws
(how much of planned against measured is their luck). The kills are not in the plan.

  python benchmarks/race.py --quick --json /tmp/race.json    # ~7.5 minutes on 2 shared cores
  python benchmarks/race.py --json race.json --plot docs/race.png    # 3 repeats
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# chaos.py's problem (the MLP on digits) and its checkpoint baseline's machinery: wait for
# restarts, read a checkpoint.
from benchmarks.chaos import _restore, _wait_all_alive, digits_problem  # noqa: E402  pylint: disable=wrong-import-position

__all__ = ["CONTENDERS", "SCENARIOS", "WallDurations", "build", "calibrate", "checks",
           "digits_problem", "local_pool", "main", "parse_args", "planned_step", "planned_steps",
           "plot", "race", "run_to_target", "simulated_stops", "summarize"]

SCENARIOS = ("stragglers", "kills")
CONTENDERS = ("partial_straggler", "original", "backup_workers", "uncoded", "ignore_stragglers",
              "uncoded_ckpt")


@dataclasses.dataclass(frozen=True)
class WallDurations:
  """A straggler model's durations as the actors live them: ``τ · time_scale + chunk_s``
  wall seconds a chunk (``inf``, an empty slot or a failure, stays ``inf``)."""
  straggler: Any
  time_scale: float
  chunk_s: float

  def sample(self, key, assignment, shape=()):
    return self.straggler.sample(key, assignment, shape) * self.time_scale + self.chunk_s


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true",
                  help="one repeat, --max_wall=45 (under 8 minutes on 2 cores)")
  ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated")
  ap.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated")
  ap.add_argument("--json", default=None, help="write the runs to this JSON file")
  ap.add_argument("--plot", default=None, help="write accuracy against wall seconds (PNG)")
  ap.add_argument("--workers", type=int, default=8)
  ap.add_argument("--load", type=int, default=3)
  ap.add_argument("--ell", type=int, default=1)
  ap.add_argument("--num_actors", type=int, default=4)
  ap.add_argument("--num_backup", type=int, default=1, help="backup_workers' b")
  ap.add_argument("--quorum_deadline", type=float, default=None,
                  help="ignore_stragglers' deadline, simulated seconds (default: the planner's "
                       "mean partial_straggler step)")
  ap.add_argument("--time_scale", type=float, default=0.03,
                  help="wall seconds per simulated second of injected delay")
  ap.add_argument("--target", type=float, default=0.9, help="test accuracy to reach")
  ap.add_argument("--eval_every", type=int, default=5)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--lr", type=float, default=0.5)
  ap.add_argument("--mtbf", type=float, default=6.0, help="kills: mean seconds between kills")
  ap.add_argument("--min_gap", type=float, default=3.0, help="kills: seconds added to each gap")
  ap.add_argument("--ckpt_every", type=int, default=10, help="uncoded_ckpt's interval, steps")
  ap.add_argument("--max_wall", type=float, default=60.0, help="seconds per run at most")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--calib_steps", type=int, default=3, help="warm-up steps per contender")
  ap.add_argument("--trials", type=int, default=4000, help="the planner's simulated steps")
  ap.add_argument("--seed", type=int, default=100, help="of the draws and kills (+ repeat)")
  args = ap.parse_args(argv)
  if args.quick:
    args.repeats, args.max_wall = 1, min(args.max_wall, 45.0)
  for flag, names, valid in (("--scenarios", args.scenarios, SCENARIOS),
                             ("--contenders", args.contenders, CONTENDERS)):
    bad = [n for n in names.split(",") if n not in valid]
    if bad or not names:
      ap.error(f"{flag} takes names from {','.join(valid)}, got {names!r}")
  return args


@contextlib.contextmanager
def local_pool(num_actors: int):
  """A :class:`jaxgc.backends.ray.WorkerPool` on a new local Ray instance, shut down after.

  ``address="local"``: a plain ``ray.init()`` joins a cluster already running on this
  machine (``ray start``, a test's ``Cluster``), which would share the CPUs with it.
  """
  import ray  # pylint: disable=import-outside-toplevel

  from jaxgc.backends.ray import WorkerPool  # pylint: disable=import-outside-toplevel
  ray.init(address="local", num_cpus=max(num_actors, os.cpu_count() or 1),
           include_dashboard=False, configure_logging=False, log_to_driver=False)
  try:
    with WorkerPool(num_actors) as pool:
      yield pool
  finally:
    ray.shutdown()


def build(pool, args, loss_fn, straggler) -> tuple[dict, float]:
  """``({contender: RayStep}, quorum deadline)``; uncoded and uncoded_ckpt share one step."""
  import optax  # pylint: disable=import-outside-toplevel

  from jaxgc import assignments, planner, protocols  # pylint: disable=import-outside-toplevel
  from jaxgc.backends.ray import RayStep  # pylint: disable=import-outside-toplevel
  a = assignments.cyclic(args.workers, args.load)
  deadline = args.quorum_deadline
  if deadline is None:
    ps = planner.simulate(args.workers, straggler,
                          [planner.Candidate("partial_straggler", args.load, args.ell)],
                          trials=args.trials, seed=args.seed, need_senders=False)[0]
    deadline = float(np.mean(ps.stop))
  steps: dict[str, Any] = {}
  for name in args.contenders.split(","):
    proto = "uncoded" if name == "uncoded_ckpt" else name
    if proto in steps:
      steps[name] = steps[proto]
      continue
    options = {"num_backup": args.num_backup} if proto == "backup_workers" else {}
    deadline_mode = proto == "ignore_stragglers"
    step = RayStep(protocols.get_protocol(proto, a, args.ell, **options), straggler, loss_fn,
                   optax.sgd(args.lr), pool=pool, time_scale=args.time_scale,
                   mode="deadline" if deadline_mode else "exact",
                   deadline=deadline if deadline_mode else None)
    steps[name] = steps.setdefault(proto, step)
  return {n: steps[n] for n in args.contenders.split(",")}, deadline


def _model_stops(step, taus, calib: dict) -> np.ndarray:
  """The PS's stops ``[n]``, wall seconds after dispatch, for durations ``τ [n, m, max_load]``
  (simulated): the completion times of ``τ · ts + c``, the reports ``lag`` later, cut at
  the deadline (batched: one call, not one per step)."""
  wall = np.asarray(taus, np.float32) * step.time_scale + calib["chunk_s"]
  t = np.asarray(step.protocol.completion_time(wall), np.float64) + calib["lag_s"]
  return t if step.mode == "exact" else np.minimum(t, step.deadline * step.time_scale)


def _warmup_steps(step, pool, problem, args) -> list[tuple]:
  """``[(τ, stop, wall, compute [m, max_load])]`` of ``--calib_steps`` steps of ``step``.

  Drawn with the key ``seed + 10**4`` from the initial parameters, so no race step is
  seen; the compile comes first (:meth:`RayStep.warmup`), outside any clock.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import ray  # pylint: disable=import-outside-toplevel
  params, batches, _, _ = problem
  key = jax.random.key(args.seed + 10**4)
  _wait_all_alive(ray, pool.actors)
  step.warmup(params, batches[0])
  state, seen = step.init_state(params, key), []
  for _ in range(args.calib_steps):
    state, m = step.update(state, batches[int(state.step) % len(batches)], key)
    rec = step.last_record
    seen.append((rec["durations"], rec["stop_wall"], _step_wall(m),
                 np.asarray(rec["compute_wall"], np.float64)))
  return seen


def _fit(step, seen: list[tuple], calib: dict) -> dict:
  """``calib`` with ``lag_s`` and ``rest_s`` fitted to ``seen`` (:func:`_warmup_steps`):

  ``lag_s``, the median of the PS's stop minus the completion time of ``τ · ts + c``
  (dispatch and report latency; exact steps only, a deadline step stops at the deadline),
  and ``rest_s``, the median of a step's wall time outside the watch (solve, message round,
  decode, update).
  """
  out = dict(calib)
  if step.mode == "exact":
    base = dict(calib, lag_s=0.0)
    out["lag_s"] = float(np.median([stop - _model_stops(step, [tau], base)[0]
                                    for tau, stop, _, _ in seen]))
  out["rest_s"] = float(np.median([wall - stop for _, stop, wall, _ in seen]))
  return out


def calibrate(steps: dict, pool, problem, args) -> dict:
  """``{chunk_s, lag_s, rest_s, steps}`` from the warm-up steps of every contender.

  ``chunk_s`` is the median real compute of a chunk; ``lag_s`` and ``rest_s`` as in
  :func:`_fit`, over all of them (each run refits them on its own warm-up: the machine's
  load drifts).
  """
  seen = {step: _warmup_steps(step, pool, problem, args)
          for step in dict.fromkeys(steps.values())}    # each distinct step once
  compute = np.concatenate([c.ravel() for rows in seen.values() for *_, c in rows])
  calib = {"chunk_s": float(np.nanmedian(compute)) if np.isfinite(compute).any() else 0.0,
           "lag_s": 0.0}
  exact = [(step, row) for step, rows in seen.items() if step.mode == "exact" for row in rows]
  lag = [_fit(step, [row], calib)["lag_s"] for step, row in exact]
  calib["lag_s"] = float(np.median(lag)) if lag else 0.0
  calib["rest_s"] = float(np.median([wall - stop for rows in seen.values()
                                     for _, stop, wall, _ in rows]))
  calib["steps"] = sum(len(rows) for rows in seen.values())
  return calib


def simulated_stops(steps: dict, straggler, args, chunk_s: float) -> dict[str, np.ndarray]:
  """``{contender: stop times [trials]}``, wall seconds, without lag or deadline:
  :func:`jaxgc.planner.simulate` on :class:`WallDurations`, one compile for the grid."""
  from jaxgc import planner  # pylint: disable=import-outside-toplevel
  wall = WallDurations(straggler, args.time_scale, chunk_s)
  grid = {}
  for name, step in steps.items():
    p = step.protocol
    # ignore_stragglers has no exact mode to plan: its stop is uncoded's, cut at the deadline.
    proto = "uncoded" if p.name == "ignore_stragglers" else p.name
    grid[name] = planner.Candidate(proto, p.assignment.max_load, p.ell,
                                   getattr(p, "num_backup", None))
  cands = list(dict.fromkeys(grid.values()))
  sims = dict(zip(cands, planner.simulate(args.workers, wall, cands, trials=args.trials,
                                          seed=args.seed, need_senders=False), strict=True))
  return {name: sims[c].stop for name, c in grid.items()}


def planned_step(step, stops: np.ndarray, calib: dict) -> float:
  """The planned mean step: ``E[min(stop + lag, deadline)] + rest`` (no deadline: no cut)."""
  stop = stops + calib["lag_s"]
  if step.mode == "deadline":
    stop = np.minimum(stop, step.deadline * step.time_scale)
  return float(np.mean(stop)) + calib["rest_s"]


def planned_steps(steps: dict, straggler, args, calib: dict) -> dict[str, float]:
  """``{contender: planned mean step seconds}`` for one calibration (:func:`planned_step`)."""
  stops = simulated_stops(steps, straggler, args, calib["chunk_s"])
  return {name: planned_step(step, stops[name], calib) for name, step in steps.items()}


def _step_wall(m: dict) -> float:
  """A step's wall seconds, less a real wait for a restarting actor (the PS polls the
  actors' states every step, a few ms, and waits in 50 ms polls only when none is alive)."""
  wait = m["alive_wait_s"]
  return m["wall_time"] - (wait if wait > 0.05 else 0.0)


def run_to_target(step, pool, problem, args, *, kills: bool, ckpt: bool, seed: int) -> dict:
  """One run from the initial parameters until ``--target``: times, counts and its curve.

  ``curve`` lists ``[step, wall seconds, test accuracy]`` at every evaluation (and at 0).
  """
  import jax  # pylint: disable=import-outside-toplevel
  import ray  # pylint: disable=import-outside-toplevel

  from jaxgc.backends.ray import KillLoop  # pylint: disable=import-outside-toplevel
  params, batches, accuracy, _ = problem
  key = jax.random.key(seed)          # the same draws for every contender
  _wait_all_alive(ray, pool.actors)
  step.warmup(params, batches[0])     # restarted actors compile again, outside the clock
  _wait_all_alive(ray, pool.actors)
  state = ckpt_state = step.init_state(params, key)
  path = os.path.join(tempfile.mkdtemp(), "ckpt.npz")
  walls, taus, exact, skipped, rollbacks, lost, degraded = [], [], 0, 0, 0, 0, 0
  stalled = 0.0          # the PS's waits for a live actor, and the baseline's for all of them
  curve = [[0, 0.0, float(accuracy(state.params))]]
  reached, eval_s = None, 0.0
  chaos = KillLoop(ray, pool.actors, args.mtbf, seed=seed, min_gap=args.min_gap) if kills else None
  t0 = time.perf_counter()
  if chaos:
    chaos.start()
  try:
    while time.perf_counter() - t0 - eval_s < args.max_wall:
      s = int(state.step)
      new, m = step.update(state, batches[s % len(batches)], key)
      walls.append(_step_wall(m))
      taus.append(step.last_record["durations"])
      stalled += m["wall_time"] - walls[-1]
      exact += bool(m["exact"])
      skipped += bool(m["skipped"])
      hit = m["dead_workers"] > 0 or m["erasures"] > 0
      degraded += hit
      if ckpt and (hit or not m["exact"]):
        rollbacks += 1
        lost += s - int(ckpt_state.step) + 1
        # The kill loop goes on meanwhile (chaos.py): the run may never get going again.
        left = args.max_wall - (time.perf_counter() - t0 - eval_s)
        w0 = time.perf_counter()
        alive = left > 0 and _wait_all_alive(ray, pool.actors, left)
        stalled += time.perf_counter() - w0
        if not alive:
          break
        state = _restore(ckpt_state, path)
        continue
      state = new
      if ckpt and int(state.step) % args.ckpt_every == 0:
        np.savez(path, *jax.tree.leaves(jax.device_get(state.params)))
        ckpt_state = state
      if int(state.step) % args.eval_every == 0:
        e0 = time.perf_counter()
        wall = e0 - t0 - eval_s
        acc = float(accuracy(state.params))
        eval_s += time.perf_counter() - e0
        curve.append([int(state.step), wall, acc])
        if acc >= args.target:
          reached = curve[-1][1]
          break
  finally:
    if chaos:
      chaos.stop()
  return {"time_to_target_s": reached, "mean_step_s": float(np.mean(walls)) if walls else None,
          "taus": taus,
          "steps": int(state.step), "executed": len(walls),
          "exact_fraction": exact / max(len(walls), 1), "skipped": skipped,
          "kills": len(chaos.kills) if chaos else 0, "degraded": degraded,
          "rollbacks": rollbacks, "lost_steps": lost, "stalled_s": stalled,
          "final_accuracy": curve[-1][2], "curve": curve}


def race(pool, problem, straggler, args, log=print) -> dict:
  """The whole race on ``pool``: ``{"calibration", "quorum_deadline", "runs"}``."""
  t0 = time.perf_counter()
  steps, deadline = build(pool, args, problem[3], straggler)
  calib = calibrate(steps, pool, problem, args)
  stops = simulated_stops(steps, straggler, args, calib["chunk_s"])
  log(f"calibrated on {calib['steps']} steps: {calib['chunk_s'] * 1e3:.2f} ms compute a "
      f"chunk, {calib['lag_s'] * 1e3:.1f} ms report lag, {calib['rest_s'] * 1e3:.1f} ms rest "
      f"of a step; after {time.perf_counter() - t0:.0f} s; "
      f"quorum deadline {deadline:.3g} simulated s")
  runs = []
  for rep in range(args.repeats):
    for scenario in args.scenarios.split(","):
      for name, step in steps.items():
        if name == "uncoded_ckpt" and scenario != "kills":
          continue
        mine = _fit(step, _warmup_steps(step, pool, problem, args), calib)
        r = run_to_target(step, pool, problem, args, kills=scenario == "kills",
                          ckpt=name == "uncoded_ckpt", seed=args.seed + rep)
        # The same model on this run's own draws: how much of planned - measured is their luck.
        taus = r.pop("taus")
        replayed = _model_stops(step, taus, mine) + mine["rest_s"] if taus else None
        runs.append({"scenario": scenario, "name": name, "repeat": rep,
                     "time_to_target_s": r.pop("time_to_target_s"),
                     "mean_step_s": r.pop("mean_step_s"),
                     "planned_step_s": planned_step(step, stops[name], mine),
                     "replayed_step_s": None if replayed is None else float(np.mean(replayed)),
                     "calibration": {k: mine[k] for k in ("chunk_s", "lag_s", "rest_s")}, **r})
        log(f"{_line(runs[-1])} [{time.perf_counter() - t0:.0f} s]")
  return {"calibration": calib, "quorum_deadline": deadline, "runs": runs}


def _fmt(x, spec="7.2f"):
  return f"{'-':>{spec.split('.')[0]}}" if x is None else format(x, spec)


def _line(r: dict) -> str:
  return (f"  rep {r['repeat']} {r['scenario']:10s} {r['name']:17s} to target "
          f"{_fmt(r['time_to_target_s'])} s  step {_fmt(r['mean_step_s'], '.3f')} s "
          f"(planned {r['planned_step_s']:.3f}, on its draws "
          f"{_fmt(r['replayed_step_s'], '.3f')})  steps {r['steps']:3d} executed "
          f"{r['executed']:3d} kills {r['kills']} degraded {r['degraded']} rollbacks "
          f"{r['rollbacks']} stalled {r['stalled_s']:.1f} s acc {r['final_accuracy']:.3f}")


def summarize(runs: list[dict]) -> list[dict]:
  """Medians over repeats per ``(scenario, name)``; a run short of the target counts as
  infinitely slow (``null`` if the median is)."""
  out = []
  for key in dict.fromkeys((r["scenario"], r["name"]) for r in runs):
    rs = [r for r in runs if (r["scenario"], r["name"]) == key]
    tta = float(np.median([np.inf if r["time_to_target_s"] is None else r["time_to_target_s"]
                           for r in rs]))
    out.append({"scenario": key[0], "name": key[1], "repeats": len(rs),
                "time_to_target_s": tta if np.isfinite(tta) else None,
                "mean_step_s": float(np.median([r["mean_step_s"] for r in rs])),
                "planned_step_s": rs[0]["planned_step_s"],
                "kills": float(np.median([r["kills"] for r in rs])),
                "rollbacks": float(np.median([r["rollbacks"] for r in rs]))})
  return out


def checks(summary: list[dict]) -> dict:
  """The issue's targets on the medians: the PS first, the planner within 10%."""
  out = {}
  for scenario in dict.fromkeys(r["scenario"] for r in summary):
    rows = {r["name"]: r for r in summary if r["scenario"] == scenario}
    inf = lambda r: np.inf if r["time_to_target_s"] is None else r["time_to_target_s"]
    if "partial_straggler" in rows:
      ps = inf(rows["partial_straggler"])
      rivals = [n for n in ("backup_workers", "uncoded", "uncoded_ckpt") if n in rows]
      out[f"{scenario}: partial_straggler first"] = bool(
          np.isfinite(ps) and all(ps < inf(rows[n]) for n in rivals))
    if scenario == "stragglers":
      out["stragglers: planner within 10%"] = bool(all(
          abs(r["planned_step_s"] / r["mean_step_s"] - 1) <= 0.10 for r in rows.values()))
  return out


def plot(result: dict, path: str) -> None:
  """Test accuracy against wall seconds, one panel per scenario, repeat 0."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  scenarios = list(dict.fromkeys(r["scenario"] for r in result["runs"]))
  fig = Figure(figsize=(5.2 * len(scenarios), 3.6))
  FigureCanvasAgg(fig)
  colors = dict(zip(CONTENDERS, ("#1967d2", "#e8710a", "#188038", "#a142f4", "#d93025",
                                 "#5f6368"), strict=True))
  for i, scenario in enumerate(scenarios):
    ax = fig.add_subplot(1, len(scenarios), i + 1)
    for r in result["runs"]:
      if r["scenario"] == scenario and r["repeat"] == 0:
        _, wall, acc = zip(*r["curve"], strict=True)
        ax.plot(wall, acc, lw=1.2, marker=".", color=colors[r["name"]], label=r["name"])
    ax.axhline(result["args"]["target"], color="k", lw=0.6, ls=":")
    ax.set_title(scenario, fontsize="medium", loc="left")
    ax.set_xlabel("wall seconds (evaluation excluded)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", loc="lower right")
  fig.tight_layout()
  tmp = f"{path}.tmp{os.getpid()}.png"
  fig.savefig(tmp, dpi=90)
  os.replace(tmp, path)


def main(argv=None) -> dict:
  args = parse_args(argv)
  from jaxgc import timing  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  problem = digits_problem(args)
  straggler = timing.get_model("slowdown")
  print(f"m={args.workers} load={args.load} ell={args.ell} {straggler} time_scale="
        f"{args.time_scale} actors={args.num_actors} target={args.target} "
        f"repeats={args.repeats}", flush=True)
  with local_pool(args.num_actors) as pool:
    result = race(pool, problem, straggler, args, log=lambda s: print(s, flush=True))
  result["args"] = vars(args)
  result["summary"] = summarize(result["runs"])
  result["checks"] = checks(result["summary"])
  print(f"\nmedians over {args.repeats} repeat(s); kills: KillLoop MTBF {args.mtbf:g} s + "
        f"{args.min_gap:g} s")
  print(f"{'scenario':10s} {'contender':17s} {'to target s':>11s} {'step s':>7s} "
        f"{'planned':>7s} {'off':>6s} {'kills':>5s} {'rollbk':>6s}")
  for r in result["summary"]:
    off = r["planned_step_s"] / r["mean_step_s"] - 1
    print(f"{r['scenario']:10s} {r['name']:17s} {_fmt(r['time_to_target_s'], '11.2f')} "
          f"{r['mean_step_s']:7.3f} {r['planned_step_s']:7.3f} {off * 100:+5.1f}% "
          f"{r['kills']:5.0f} {r['rollbacks']:6.0f}")
  for name, ok in result["checks"].items():
    print(f"target {name}: {'yes' if ok else 'NO'}")
  print(f"total {time.perf_counter() - t0:.0f} s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  if args.plot:
    plot(result, args.plot)
  return result


if __name__ == "__main__":
  main()

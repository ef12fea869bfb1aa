"""The planner: ranking against a brute-force simulation, the crossover, the command line."""
import importlib
import json
import math
import sys

import jax
import numpy as np
import pytest

import jaxgc
from jaxgc import assignments, network, planner, protocols, timing
from tests import warm

M, TRIALS = 6, 32
STRAGGLER = timing.get_model("slowdown")
GRID = planner.candidates(M, ("partial_straggler", "original", "uncoded", "backup_workers"),
                          loads=(2, 3), ells=(1, 2), backups=(1, 2))


@pytest.fixture(scope="module")
def sims():
  return planner.simulate(M, STRAGGLER, GRID, trials=TRIALS, seed=7)


def _brute_force(c, d, net):
  """Mean and p95 step time of one candidate: a Python event loop per draw, its own solve."""
  options = {} if c.num_backup is None else {"num_backup": c.num_backup}
  proto = protocols.get_protocol(c.protocol, assignments.cyclic(M, c.load), c.ell, **options)
  tau = np.asarray(STRAGGLER.sample(jax.random.key(7), assignments.cyclic(M, c.load), (TRIALS,)),
                   np.float64)
  decodable = jax.jit(proto.is_decodable)
  stops, counts = [], []
  for t in tau:
    if c.protocol == "backup_workers":          # its stop rule: the (m − b)-th finish
      stop = np.sort(t[:, 0])[M - c.num_backup - 1]
    else:
      stop = timing.event_loop_completion_time(t, lambda k: bool(decodable(k)))
    stops.append(stop)
    counts.append((np.cumsum(t, axis=1) <= stop).sum(axis=1))
  # Who sends is what the protocol's solve says at the state it stops in.
  senders = np.sum(jax.jit(jax.vmap(proto.solve))(np.asarray(counts, np.int32)).senders, -1)
  out = np.asarray(stops) + net.latency + senders * math.ceil(d / proto.ell) * 4 / net.bandwidth
  out = np.asarray(out, np.float64)   # host floats: pytest.approx reads .flat (jax arrays lack it)
  return float(np.mean(out)), float(np.percentile(out, 95))


def test_ranking_equals_brute_force_simulation(sims):
  d, net = 10**6, network.PSIngress(bandwidth=2e6, latency=0.01)
  rows = planner.rank(sims, d, net)
  assert [r["mean_step_time"] for r in rows] == sorted(r["mean_step_time"] for r in rows)
  brute = {}
  for c in GRID:
    brute[c.protocol, c.load, c.ell, c.num_backup] = _brute_force(c, d, net)
  for r in rows:
    mean, p95 = brute[r["protocol"], r["load"], r["ell"], r["num_backup"]]
    assert r["mean_step_time"] == pytest.approx(mean, rel=1e-4), r
    assert r["p95_step_time"] == pytest.approx(p95, rel=1e-4), r
    assert r["compute_time"] + r["comm_time"] == pytest.approx(r["mean_step_time"], rel=1e-6)
  best = min(brute, key=lambda k: brute[k][0])
  assert (rows[0]["protocol"], rows[0]["load"], rows[0]["ell"], rows[0]["num_backup"]) == best


def _best(rows, ell):
  return min(r["mean_step_time"] for r in rows if r["protocol"] == "partial_straggler"
             and r["ell"] == ell)


def test_crossover_slow_network_favours_ell_2_and_none_does_not(sims):
  d = 10**7
  slow = planner.rank(sims, d, network.PSIngress(bandwidth=1e7, latency=1e-3))
  free = planner.rank(sims, d, network.NoNetwork())
  assert _best(slow, 2) < _best(slow, 1)
  # Without a network ℓ = 2 needs two finishers per chunk where ℓ = 1 needs one: never faster.
  assert _best(free, 2) >= _best(free, 1)
  assert free[0]["ell"] == 1 and free[0]["comm_time"] == 0.0
  assert {r["bytes_per_worker"] for r in slow if r["ell"] == 2} == {d // 2 * 4}


def test_plan_is_the_function_and_planner_the_module():
  assert jaxgc.plan is planner.plan and "plan" in jaxgc.__all__
  # The old module name was only ever a command line; importing it would shadow the function.
  with pytest.raises(ImportError, match="jaxgc.planner"):
    importlib.import_module("jaxgc.plan")
  assert jaxgc.plan is planner.plan
  rows = jaxgc.plan(5, 1000, "shifted_exponential", network.RingAllReduce(1e6, 1e-4),
                    protocols=("partial_straggler",), loads=(2,), ells=(1, 2), trials=16)
  assert [(r["load"], r["ell"]) for r in rows] in ([(2, 1), (2, 2)], [(2, 2), (2, 1)])
  comm = 2 * 4 * (1e-4 + 500 * 4 / (5 * 1e6))              # ring, ℓ = 2, m = 5
  assert [r["comm_time"] for r in rows if r["ell"] == 2][0] == pytest.approx(comm, rel=1e-6)


@pytest.mark.parametrize("args,flag", [
    (["--bandwidth=0"], "--bandwidth"),
    (["--bandwidth=-1e9"], "--bandwidth"),
    (["--latency=-1e-4"], "--latency"),
    (["--topology=star"], "--topology"),
    (["--num_params=abc"], "--num_params"),
    (["--num_params=-5"], "--num_params"),
    (["--num_params=0"], "--num_params"),
    (["--num_workers=1"], "--num_workers"),
    (["--straggler", "weibull"], "--straggler"),
    (["--protocols=fancy"], "--protocols"),
    (["--protocols=ignore_stragglers"], "--protocols"),
    (["--loads=0"], "--loads"),
    (["--ells=a"], "--ells"),
    (["--trials=0"], "--trials"),
    (["--ells=5", "--loads=2"], "--loads"),
    (["--loads=9,10"], "--num_workers"),
])
def test_bad_command_line_names_the_flag(args, flag, capsys):
  base = {"--num_workers": "8", "--num_params": "1e6", "--bandwidth": "1e9", "--latency": "0"}
  given = {a.split("=")[0] for a in args}
  argv = [f"{k}={v}" for k, v in base.items() if k not in given] + args
  assert planner.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and flag in err and "Traceback" not in err, err
  assert err.startswith("python -m jaxgc.planner: "), err


@pytest.mark.parametrize("names,loads,ells,param", [
    (("partial_straggler",), (2,), (5,), "ells"),
    (("uncoded", "original"), (2, 3), (4, 5), "ells"),
    (("graph_code",), (7, 9), (1,), "loads"),
    (("partial_straggler", "uncoded"), (7,), (1,), "loads"),
])
def test_a_coded_protocol_left_without_candidates_is_refused(names, loads, ells, param):
  """Each coded protocol asked for gets a candidate, or the grid is refused: never dropped."""
  with pytest.raises(jaxgc.errors.ParamError) as e:
    planner.candidates(6, names, loads, ells)
  assert e.value.param == param
  coded = [n for n in names if n not in ("uncoded", "backup_workers")]
  assert all(n in str(e.value) for n in coded)
  # One fitting pair is enough, and each protocol keeps exactly its fitting pairs.
  grid = planner.candidates(6, names, loads + (2,), ells + (1,))
  for n in coded:
    pairs = {(c.load, c.ell) for c in grid if c.protocol == n}
    want = {(d, e) for d in loads + (2,) for e in ells + (1,) if d <= 6 and e <= d}
    assert pairs == ({(d, 1) for d, _ in want} if n == "graph_code" else want)


def test_command_line_contract_json():
  """The contract command: a JSON list of rows, best first; a bad flag is one line, exit 2."""
  cmd = [sys.executable, "-m", "jaxgc.planner", "--num_workers=20", "--num_params=1e9",
         "--bandwidth=1.25e9", "--latency=1e-4", "--json"]
  out = warm.run(cmd, capture_output=True, text=True, timeout=300, check=True)
  rows = json.loads(out.stdout)
  assert rows and all({"protocol", "load", "ell", "mean_step_time"} <= set(r) for r in rows)
  means = [r["mean_step_time"] for r in rows]
  assert means == sorted(means)
  bad = warm.run(cmd[:4] + ["--num_params=1e9", "--bandwidth=-2"], capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode == 2 and bad.stdout == ""
  assert len(bad.stderr.strip().splitlines()) == 1 and "--bandwidth" in bad.stderr


def test_ells_and_loads_with_no_coded_candidate_is_one_line_naming_both_flags():
  """#27: --ells 5 --loads 2 used to print a table without any coded protocol, exit 0."""
  cmd = [sys.executable, "-m", "jaxgc.planner", "--num_workers=8", "--num_params=1e6",
         "--bandwidth=1e9", "--ells", "5", "--loads", "2"]
  out = warm.run(cmd, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and out.stdout == "", out
  err = out.stderr.strip()
  assert len(err.splitlines()) == 1 and "Traceback" not in err, err
  assert "--ells 5" in err and "--loads 2" in err and "partial_straggler" in err, err


def test_the_old_command_still_runs_with_a_deprecation_warning():
  cmd = [sys.executable, "-m", "jaxgc.plan", "--num_workers=4", "--num_params=1e3",
         "--bandwidth=1e9", "--protocols=uncoded", "--trials=4", "--json"]
  out = warm.run(cmd, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert [r["protocol"] for r in json.loads(out.stdout)] == ["uncoded"]
  assert "DeprecationWarning" in out.stderr and "python -m jaxgc.planner" in out.stderr

"""Ray under a kill loop: coded training against checkpoint-restart, wall-clock to a target.

An MLP on digits, ``--workers`` workers on the cyclic assignment (load
``--load``) over ``--num_actors`` Ray actors of a local Ray instance. A
:class:`jaxgc.backends.ray.KillLoop` kills a random live actor every
``Exp(--mtbf)`` seconds (Ray restarts it). Four runs, each ``--repeats`` times
with the same kill seeds, each until the test accuracy reaches ``--target``:

* ``coded``: partial_straggler (ell = 1, exact mode) without faults;
* ``coded+kills``: the same under the kill loop. The PS carries on without the
  dead actor's workers (the step stays exact while the live ones cover every
  chunk) and gives the actor the current parameters once Ray has restarted it;
* ``uncoded``: each chunk computed once, without faults;
* ``uncoded+ckpt``: the practitioners' baseline under the same kill loop. Any
  step that a failure touches (a dead worker, an erasure, an inexact step) is
  thrown away; the run waits until every actor is alive again (the real restart
  time, measured) and resumes from its last checkpoint (every ``--ckpt_every``
  steps, a real ``np.savez`` to disk), so it loses the steps since then.

With ``--num_spares=s`` the pool keeps ``s`` hot spares (warm actors hosting no
worker): a killed actor's workers move to a spare at the next step, and the
killed actor, once Ray has restarted it, becomes a spare (the kill loop kills
the actors hosting workers, whichever they are by then).

This baseline is generous to checkpoint-restart: a real job restart relaunches
every process, reinitialises JAX and recompiles, where here only the killed
actor restarts and failures are detected at once.

Reports per run the median over repeats of: faults injected, steps executed,
degraded steps (with dead workers or erasures), steps lost to rollbacks, and
wall seconds to the target, with the ratio to the run's failure-free twin; then
the restart measurement (kill -> actor alive -> its first chunk report at the
PS, in seconds and steps; with a spare, the spare's first report). Evaluation time
is not counted.

  python benchmarks/chaos.py                        # ~12 minutes on 2 shared cores
  python benchmarks/chaos.py --num_spares=1         # the same with one hot spare
  python benchmarks/chaos.py --mtbf=2 --repeats=5
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _wait_all_alive(ray, actors, timeout: float = 120.0) -> bool:
  """Whether every actor was alive within ``timeout`` seconds."""
  from jaxgc.backends.ray import actor_state  # pylint: disable=import-outside-toplevel
  until = time.perf_counter() + timeout
  while time.perf_counter() < until:
    if all(actor_state(ray, a)[0] in ("ALIVE", "UNKNOWN") for a in actors):
      return True
    time.sleep(0.05)
  return False


def digits_problem(args):
  """``(params, batches, accuracy, loss_fn)``: the MLP on digits, ``args.batch`` examples a
  step in ``args.workers`` chunks (shared with ``benchmarks/race.py``)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from jaxgc import data, models  # pylint: disable=import-outside-toplevel
  m, b = args.workers, args.batch
  ds = data.load("digits")
  model = models.get_model("mlp", ds.num_classes, (16,))
  params = models.init_params(model, jax.random.key(0), ds.x_train[:1])
  loss_fn = models.chunk_loss_fn(model.apply, b)
  batches = [(ds.x_train[s * b:(s + 1) * b].reshape(m, b // m, -1),
              ds.y_train[s * b:(s + 1) * b].reshape(m, b // m))
             for s in range(len(ds.x_train) // b)]
  accuracy = jax.jit(lambda p: jnp.mean(jnp.argmax(model.apply({"params": p}, ds.x_test), -1)
                                        == ds.y_test))
  return params, batches, accuracy, loss_fn


def train_to_target(step, pool, problem, args, mtbf, seed, checkpoint_restart):
  """One run until ``args.target``: a dict of counts and wall seconds."""
  import jax  # pylint: disable=import-outside-toplevel
  import ray  # pylint: disable=import-outside-toplevel

  from jaxgc.backends.ray import KillLoop  # pylint: disable=import-outside-toplevel
  params, batches, accuracy = problem
  key = jax.random.key(seed)
  state = step.init_state(params, key)
  _wait_all_alive(ray, pool.actors)
  step.warmup(state.params, batches[0])
  _wait_all_alive(ray, pool.actors)
  out = {"faults": 0, "executed": 0, "degraded": 0, "lost": 0, "rollbacks": 0, "wall": np.nan,
         "acc": 0.0, "stalled": 0.0}
  ckpt, eval_s = state, 0.0
  path = os.path.join(tempfile.mkdtemp(), "ckpt.npz")
  chaos = KillLoop(ray, pool.actors, mtbf, seed=seed, min_gap=0.5) if mtbf else None
  restarts_before = len(step.restarts)
  t0 = time.perf_counter()
  if chaos:
    chaos.start()
  try:
    while time.perf_counter() - t0 - eval_s < args.max_wall:
      s = int(state.step)
      new, m = step.update(state, batches[s % len(batches)], key)
      out["executed"] += 1
      out["stalled"] += m["alive_wait_s"]
      hit = m["dead_workers"] > 0 or m["erasures"] > 0
      out["degraded"] += hit
      if checkpoint_restart and (hit or not m["exact"]):
        out["rollbacks"] += 1
        out["lost"] += s - int(ckpt.step) + 1
        # The kill loop goes on meanwhile: with a restart slower than the MTBF over
        # all actors, this may never happen, and the run never reaches the target.
        if not _wait_all_alive(ray, pool.actors, args.max_wall - (time.perf_counter() - t0)):
          break
        state = _restore(ckpt, path)
        continue
      state = new
      if checkpoint_restart and int(state.step) % args.ckpt_every == 0:
        leaves = jax.tree.leaves(jax.device_get(state.params))
        np.savez(path, *leaves)
        ckpt = state
      if int(state.step) % args.eval_every == 0:
        e0 = time.perf_counter()
        out["acc"] = float(accuracy(state.params))
        eval_s += time.perf_counter() - e0
        if out["acc"] >= args.target:
          out["wall"] = time.perf_counter() - t0 - eval_s
          break
  finally:
    if chaos:
      chaos.stop()
  out["faults"] = len(chaos.kills) if chaos else 0
  out["steps"] = int(state.step)
  out["restarts"] = step.restarts[restarts_before:]
  return out


def _restore(ckpt, path):
  """``ckpt`` with its parameters read back from ``path`` (the step 0 state if none saved)."""
  import jax  # pylint: disable=import-outside-toplevel
  if not os.path.exists(path):
    return ckpt
  leaves, treedef = jax.tree.flatten(ckpt.params)
  with np.load(path) as z:
    saved = [z[f"arr_{i}"] for i in range(len(leaves))]
  return ckpt.replace(params=jax.tree.unflatten(treedef, saved))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workers", type=int, default=8)
  ap.add_argument("--load", type=int, default=3)
  ap.add_argument("--num_actors", type=int, default=4)
  ap.add_argument("--num_spares", type=int, default=0,
                  help="hot spares: warm actors that take over a killed one's workers")
  ap.add_argument("--mtbf", type=float, default=5.0, help="mean seconds between kills")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--target", type=float, default=0.9, help="test accuracy to reach")
  ap.add_argument("--time_scale", type=float, default=0.05,
                  help="wall seconds per simulated second of injected delay")
  ap.add_argument("--ckpt_every", type=int, default=10, help="baseline's checkpoint interval")
  ap.add_argument("--eval_every", type=int, default=5)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--lr", type=float, default=0.5)
  ap.add_argument("--max_wall", type=float, default=90.0, help="seconds per run at most")
  ap.add_argument("--restart_trials", type=int, default=3)
  ap.add_argument("--runs", default="coded,coded+kills,uncoded,uncoded+ckpt",
                  help="comma-separated runs to do (a ratio needs the run's failure-free twin)")
  args = ap.parse_args()

  import optax  # pylint: disable=import-outside-toplevel

  from jaxgc import assignments, protocols, timing  # pylint: disable=import-outside-toplevel
  from jaxgc.backends.ray import RayStep, WorkerPool  # pylint: disable=import-outside-toplevel

  params, batches, accuracy, loss_fn = digits_problem(args)
  problem = (params, batches, accuracy)
  a = assignments.cyclic(args.workers, args.load)
  straggler = timing.get_model("slowdown")
  runs = [("coded", "partial_straggler", 0.0, False),
          ("coded+kills", "partial_straggler", args.mtbf, False),
          ("uncoded", "uncoded", 0.0, False),
          ("uncoded+ckpt", "uncoded", args.mtbf, True)]
  chosen = args.runs.split(",")
  if not set(chosen) <= {name for name, *_ in runs}:
    ap.error(f"--runs: choose among {','.join(name for name, *_ in runs)}, got {args.runs!r}")
  runs = [r for r in runs if r[0] in chosen]
  results = {name: [] for name, *_ in runs}
  with WorkerPool(args.num_actors, num_spares=args.num_spares) as pool:
    steps = {p: RayStep(protocols.get_protocol(p, a, 1), straggler, loss_fn,
                        optax.sgd(args.lr), pool=pool, time_scale=args.time_scale)
             for p in ("partial_straggler", "uncoded")}
    for rep in range(args.repeats):
      for name, proto, mtbf, ckpt in runs:
        r = train_to_target(steps[proto], pool, problem, args, mtbf, 100 + rep, ckpt)
        results[name].append(r)
        print(f"  rep {rep} {name:13s} wall {r['wall']:6.2f} s  faults {r['faults']:2d}  "
              f"steps {r['steps']:3d}  executed {r['executed']:3d}  degraded {r['degraded']:3d}"
              f"  lost {r['lost']:3d}  stalled {r['stalled']:5.2f} s  acc {r['acc']:.3f}",
              flush=True)
    restarts = [measure_restart(pool, problem, args, steps["partial_straggler"], trial)
                for trial in range(args.restart_trials)]
  _report(results, args)
  _report_restarts(restarts, args)


def measure_restart(pool, problem, args, like, trial):
  """Kills actor 1 at step 3 (``fail_at``) and trains until it reports again: its Restart."""
  import jax  # pylint: disable=import-outside-toplevel
  import ray  # pylint: disable=import-outside-toplevel

  from jaxgc.backends.ray import RayStep  # pylint: disable=import-outside-toplevel
  params, batches, _ = problem
  step = RayStep(like.protocol, like.straggler, like.loss_fn, like.tx, pool=pool,
                 time_scale=args.time_scale, fail_at=[(1, 3)])
  _wait_all_alive(ray, pool.actors + pool.spares)    # the spares too: warmed up below
  state = step.init_state(params, jax.random.key(trial))
  step.warmup(state.params, batches[0])
  t0 = time.perf_counter()
  while time.perf_counter() - t0 < args.max_wall:
    state, _ = step.update(state, batches[int(state.step) % len(batches)], jax.random.key(trial))
    if step.restarts and step.restarts[0].first_report_step is not None:
      break
  walls = [r["stop_wall"] for r in step.records]
  return step.restarts[0] if step.restarts else None, float(np.median(walls))


def _report_restarts(restarts, args):
  done = [(ev, w) for ev, w in restarts if ev is not None and ev.first_report_s is not None]
  if not done:
    print("\nno restart closed within --max_wall")
    return
  print(f"\nrestart of an actor killed by fail_at ({len(done)} trials, {args.num_actors} actors,"
        f" {args.num_spares} spares; seconds from the kill; alive: the actor, or the spare that "
        "took over):")
  print(f"{'trial':>5s} {'spare':>5s} {'alive_s':>8s} {'alive_step':>10s} {'report_s':>9s} "
        f"{'steps':>6s} {'step_s':>7s}")
  for i, (ev, w) in enumerate(done):
    print(f"{i:5d} {'yes' if ev.spare else 'no':>5s} {ev.up_s:8.2f} {ev.up_step - ev.down_step:10d}"
          f" {ev.first_report_s:9.2f} {ev.steps_lost:6d} {w:7.3f}")
  print(f"median: alive after {np.median([ev.up_s for ev, _ in done]):.2f} s, first chunk report "
        f"after {np.median([ev.first_report_s for ev, _ in done]):.2f} s = "
        f"{np.median([ev.steps_lost for ev, _ in done]):.0f} steps")


def _report(results, args):
  # A run that never reached the target counts as infinitely slow.
  med = lambda name, k: float(np.median([np.inf if np.isnan(r[k]) else r[k]
                                         for r in results[name]]))
  print(f"\nmedians over {args.repeats} repeats; kill loop MTBF {args.mtbf:g} s, "
        f"target accuracy {args.target}, {args.num_actors} actors ({args.num_spares} spares), "
        f"{args.workers} workers")
  print(f"{'run':14s} {'faults':>6s} {'steps':>6s} {'executed':>8s} {'degraded':>8s} "
        f"{'lost':>5s} {'stall_s':>7s} {'wall_s':>7s} {'x free':>7s}")
  twin = {"coded+kills": "coded", "uncoded+ckpt": "uncoded"}
  for name in results:
    ratio = (med(name, "wall") / med(twin.get(name, name), "wall")
             if twin.get(name, name) in results else np.nan)
    print(f"{name:14s} {med(name, 'faults'):6.0f} {med(name, 'steps'):6.0f} "
          f"{med(name, 'executed'):8.0f} {med(name, 'degraded'):8.0f} {med(name, 'lost'):5.0f} "
          f"{med(name, 'stalled'):7.2f} {_secs(med(name, 'wall'), args)} {ratio:7.2f}")
  print(f"(wall_s '>{args.max_wall:g}': the target was not reached within --max_wall)")


def _secs(x, args):
  return f"{x:7.2f}" if np.isfinite(x) else f"{'>' + format(args.max_wall, 'g'):>7s}"


if __name__ == "__main__":
  main()

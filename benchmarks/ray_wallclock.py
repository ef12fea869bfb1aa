"""Wall-clock of the protocols on real Ray workers, beside the simulator's prediction.

The default config (configs/default.py: 20 workers, cyclic load 4, ell = 2, the
slowdown straggler model, an MLP on digits) runs on ``--num_actors`` Ray actors
of a local Ray instance. Injected delays are ``τ · time_scale`` seconds of sleep
per chunk on top of the real compute. For each protocol it trains until the test
accuracy reaches ``--target`` (or ``--max_steps``) and prints

* wall-clock per step (median) and the simulator's prediction for the same
  injected durations (``step_sim_time · time_scale``);
* the PS's overhead per step: the coefficient solve, the message round (send the
  coefficients, collect the ``d/ℓ`` messages), and the rest of the step
  (dispatch, decode, optimizer update), against the injected compute;
* the replay check: the completion time of the *measured* chunk arrival times
  (``measured_durations`` -> the protocol's ``completion_time``) against the stop
  the PS actually made;
* time to the target accuracy, in wall seconds and as the simulator predicts it;
* the PS/Original wall-clock ratio against the simulated ratio.

Every protocol sees the same batches and the same injected durations at each step
(both are functions of ``(seed, step)``).

  python benchmarks/ray_wallclock.py                       # ~3 minutes on 2 cores
  python benchmarks/ray_wallclock.py --time_scale=0.05 --protocols=partial_straggler,original
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def load_config(path):
  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default=os.path.join(ROOT, "configs/default.py"))
  ap.add_argument("--protocols", default="partial_straggler,original,uncoded,backup_workers",
                  help="comma-separated; names not in jaxgc.protocols.PROTOCOLS are skipped")
  ap.add_argument("--num_actors", type=int, default=4)
  ap.add_argument("--time_scale", type=float, default=0.05,
                  help="wall seconds per simulated second of injected delay")
  ap.add_argument("--target", type=float, default=0.95, help="test accuracy to reach")
  ap.add_argument("--max_steps", type=int, default=60)
  ap.add_argument("--eval_every", type=int, default=5)
  ap.add_argument("--address", default=None, help="Ray cluster to join (default: start one)")
  ap.add_argument("--out", default=None, help="write the per-step numbers to this JSON file")
  args = ap.parse_args()

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  from jaxgc import assignments, data, models, protocols, timing  # pylint: disable=import-outside-toplevel
  from jaxgc.backends.ray import RayStep, WorkerPool, measured_durations  # pylint: disable=import-outside-toplevel

  config = load_config(args.config)
  m, load, ell, batch = config.num_workers, config.load, config.ell, config.batch_size
  names = [n for n in args.protocols.split(",") if n]
  missing = [n for n in names if n not in protocols.PROTOCOLS]
  names = [n for n in names if n in protocols.PROTOCOLS]
  if missing:
    print(f"skipping {missing}: not in jaxgc.protocols.PROTOCOLS on this checkout")
  assignment = assignments.cyclic(m, load)
  s = config.straggler
  straggler = timing.get_model(s.name, shift=s.shift, rate=s.rate, fraction=s.fraction,
                               factor=s.factor)
  ds = data.load(config.dataset, test_fraction=config.test_fraction, split_seed=config.split_seed)
  model = models.get_model(config.model, ds.num_classes, tuple(config.hidden))
  init_key, data_key, step_key = jax.random.split(jax.random.key(config.seed), 3)
  params = models.init_params(model, init_key, ds.x_train[:1])
  loss_fn = models.chunk_loss_fn(model.apply, batch)
  tx = optax.adam(config.learning_rate)
  accuracy = jax.jit(lambda p: models.predict_metrics(model.apply, p, ds.x_test, ds.y_test)[
      "test_accuracy"])
  chunks_of = jax.jit(lambda s, perm: data.step_chunks((ds.x_train, ds.y_train), data_key, s,
                                                       batch, m, perm=perm))
  per_epoch = data.steps_per_epoch(ds.num_train, batch)
  batches = []
  for step in range(args.max_steps):
    if step % per_epoch == 0:
      perm = data.epoch_permutation(data_key, step // per_epoch, ds.num_train)
    batches.append(jax.tree.map(np.asarray, chunks_of(step, perm)))

  print(f"m={m} load={load} ell={ell} straggler={straggler} time_scale={args.time_scale} "
        f"actors={args.num_actors} target={args.target}", flush=True)
  t0 = time.perf_counter()
  pool = WorkerPool(args.num_actors, address=args.address)
  print(f"Ray up with {args.num_actors} actors in {time.perf_counter() - t0:.1f} s", flush=True)
  results = {}
  try:
    for name in names:
      proto = protocols.get_protocol(name, assignment, ell)
      step_fn = RayStep(proto, straggler, loss_fn, tx, pool=pool, time_scale=args.time_scale)
      state = step_fn.init_state(params, step_key)
      step_fn.warmup(params, batches[0])      # compile everything once, untimed
      rows, reached, wall, sim = [], None, 0.0, 0.0
      for step in range(args.max_steps):
        state, met = step_fn.update(state, batches[step], step_key)
        rec = step_fn.last_record
        replay = float(proto.completion_time(jnp.asarray(measured_durations(rec), jnp.float32)))
        wall += met["wall_time"]
        sim += met["step_sim_time"]
        row = {k: float(v) for k, v in met.items()}
        row.update(replay_stop=replay * args.time_scale)
        if (step + 1) % args.eval_every == 0:
          row["test_accuracy"] = float(accuracy(state.params))
          if reached is None and row["test_accuracy"] >= args.target:
            reached = (step + 1, wall, sim * args.time_scale)
        rows.append(row)
        if reached is not None:
          break
      results[name] = {"rows": rows, "reached": reached}
      med = lambda k, rows=rows: float(np.median([r[k] for r in rows]))
      print(f"{name:>18}: {len(rows)} steps, wall/step {med('wall_time') * 1e3:6.1f} ms "
            f"(simulated {med('step_sim_time') * args.time_scale * 1e3:6.1f} ms), "
            f"acc {rows[-1].get('test_accuracy', float('nan')):.3f}", flush=True)
  finally:
    pool.close()

  ts = args.time_scale
  print(f"\nmedians per step, ms (time_scale={ts}: simulated seconds x {ts * 1e3:g} ms)")
  print(f"{'protocol':>18} {'wall':>7} {'sim':>7} {'stop':>7} {'replay':>7} {'lag':>5} "
        f"{'solve':>6} {'round':>6} {'rest':>5} {'ovh%':>5} {'exact':>5} {'steps':>5} "
        f"{'tta_wall':>8} {'tta_sim':>8}")
  summary = {}
  for name, res in results.items():
    rows = res["rows"]
    get = lambda k, rows=rows: np.array([r[k] for r in rows])
    wall, sim = get("wall_time"), get("step_sim_time") * ts
    stop, solve, rnd = get("stop_wall"), get("solve_s"), get("round_s")
    rest = wall - stop - solve - rnd
    over = (wall - sim) / sim
    reached = res["reached"]
    summary[name] = dict(wall=float(np.median(wall)), sim=float(np.median(sim)))
    tta = (f"{reached[1]:8.2f} {reached[2]:8.2f}" if reached
           else f"{'>' + str(len(rows)):>8} {'':>8}")
    print(f"{name:>18} {np.median(wall) * 1e3:7.1f} {np.median(sim) * 1e3:7.1f} "
          f"{np.median(stop) * 1e3:7.1f} {np.median(get('replay_stop')) * 1e3:7.1f} "
          f"{np.median(stop - sim) * 1e3:5.1f} {np.median(solve) * 1e3:6.2f} "
          f"{np.median(rnd) * 1e3:6.1f} {np.median(rest) * 1e3:5.1f} "
          f"{np.median(over) * 100:5.1f} {get('exact').mean():5.2f} {len(rows):5d} {tta}")
  print("  wall: real step; sim: the simulator's stop for the same injected durations;")
  print("  stop: when the PS stopped watching; replay: the simulator on the measured arrivals;")
  print("  lag = stop - sim: dispatch and report latency, real compute; solve/round: the PS's")
  print("  coefficient solve and message round(s); rest: dispatch, decode, update;")
  print("  ovh% = (wall - sim) / sim; tta: seconds to the target accuracy (wall, simulated).")
  print("\nmessages as sent (a network model's inputs): bytes per message, transfer time "
        "(actor send to PS receipt), median and max over steps")
  for name, res in results.items():
    rows = [r for r in res["rows"] if r.get("message_bytes", 0) > 0]
    if rows:
      get = lambda k, rows=rows: np.array([r[k] for r in rows])
      print(f"{name:>18} {int(np.median(get('message_bytes'))):8d} B  "
            f"{np.median(get('message_transfer_s')) * 1e3:6.2f} ms  "
            f"max {np.max(get('message_transfer_max_s')) * 1e3:6.2f} ms")
  if "partial_straggler" in summary and "original" in summary:
    ray_ratio = summary["partial_straggler"]["wall"] / summary["original"]["wall"]
    sim_ratio = summary["partial_straggler"]["sim"] / summary["original"]["sim"]
    off = ray_ratio / sim_ratio - 1
    print(f"\nPS/Original wall-clock ratio {ray_ratio:.3f}; simulated {sim_ratio:.3f} "
          f"({off * 100:+.1f}%); targets: within 15% -> {'yes' if abs(off) <= 0.15 else 'no'}, "
          f"below 0.85 -> {'yes' if ray_ratio < 0.85 else 'no'}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"args": vars(args), "results": results}, f)


if __name__ == "__main__":
  main()

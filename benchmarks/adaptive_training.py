"""Time to 95% test accuracy, in simulated time, with the adaptive PS in training (issue #13).

The default config (digits, MLP (64, 64), Adam 3e-3, batch 320, m = 20 workers,
cyclic load 4, ℓ = 2) under persistent stragglers: Gilbert–Elliott (p_slow =
0.02, p_recover = 0.1, factor 5) and the Alibaba PAI job 4 trace. Protocols:
the adaptive PS (PartialStraggler + jaxgc.adaptive.AdaptivePS in the coded
step), the static PS, Original, uncoded, and backup workers (b = 2). 3 seeds.
Every object comes from ``jaxgc.experiment`` with train.py's flags, e.g. the
adaptive PS is ``--config.adaptive=True`` and backup workers
``--config.protocol.name=backup_workers --config.protocol.backup_workers.num_backup=2``.

How it is measured, cheaply but with the step's own code:
  * Each protocol's per-step plan (stop time = step_sim_time, and the state k)
    comes from ``CodedStep.plan_step``, the function the training step uses to
    plan ahead, scanned over the steps (straggler chain and adaptive PS state
    carried exactly as in ``TrainState``).
  * Each protocol trains on one device with ``protocols.estimate`` at its
    planned state (solve, encode, decode of the per-slot chunk gradients): the
    same estimate the sharded step decodes, without simulating 8 devices.
  * A check runs the real sharded ``CodedStep.update`` with the adaptive PS for
    the first ``--check_steps`` steps (seed 0, Gilbert–Elliott) and asserts that
    its step_sim_time equals the plan scan's and its loss the one-device run's.
Accuracy is evaluated after every step (train.py does it every 10 steps).

    python benchmarks/adaptive_training.py              # 300 steps, 3 seeds
    python benchmarks/adaptive_training.py --steps 150  # quicker
    python benchmarks/adaptive_training.py --seeds 10 --decay 0.8
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from jaxgc import adaptive, data, experiment, models, parallel, protocols  # noqa: E402

NAMES = ("adaptive", "static", "original", "uncoded", "backup_workers")


STRAGGLERS = {
    "gilbert_elliott": [("straggler.name", "gilbert_elliott"),
                        ("straggler.gilbert_elliott.p_slow", "0.02"),
                        ("straggler.gilbert_elliott.p_recover", "0.1"),
                        ("straggler.gilbert_elliott.factor", "5.0")],
    "alibaba_job4": [("straggler.name", "trace"), ("straggler.trace.trace", "alibaba_pai_job4")],
}
PROTOCOL_FLAGS = {
    "adaptive": [("protocol.name", "partial_straggler"), ("adaptive", "True")],
    "static": [("protocol.name", "partial_straggler")],
    "original": [("protocol.name", "original")],
    "uncoded": [("protocol.name", "uncoded")],
    "backup_workers": [("protocol.name", "backup_workers"),
                       ("protocol.backup_workers.num_backup", "2")],
}


def configured(base, flags):
  """A copy of ``base`` with ``--config.<flag>=<value>`` overrides, as train.py applies them."""
  return experiment.apply_overrides(base.copy_and_resolve_references(), flags)


def plan_scan(coded, num_steps):
  """``(stop [T], counts [T, m])`` of steps ``0..T-1`` for one step key, as the step plans them."""
  def run(key):
    def body(carry, s):
      plan, ss, ads = coded.plan_step(key, s, *carry)
      return (ss, ads), (plan.stop, plan.counts)
    carry = (coded.init_straggler_state(key), coded.init_adaptive_state())
    return jax.lax.scan(body, carry, jnp.arange(num_steps))[1]
  return jax.jit(jax.vmap(run))


def make_train(protocol, model, loss_fn, tx, train_data, test_data, batch, num_steps):
  """One-device training at given states: ``(init_key, data_key, counts [T, m]) -> (loss, acc)``."""
  asg = protocol.assignment
  slot_chunk = np.maximum(asg.order, 0)

  def run(init_key, data_key, counts):
    params = models.init_params(model, init_key, train_data[0][:1])
    _, unravel = ravel_pytree(params)

    def body(carry, xs):
      params, opt = carry
      s, k = xs
      chunks = data.step_chunks(train_data, data_key, s, batch, asg.num_chunks)
      loss, g = jax.vmap(jax.value_and_grad(loss_fn), (None, 0))(params, chunks)
      flat = jax.vmap(lambda t: ravel_pytree(t)[0])(g)                    # [N, d]
      ghat = protocols.estimate(protocol, flat[slot_chunk], k)
      updates, opt = tx.update(unravel(ghat), opt, params)
      new = optax.apply_updates(params, updates)
      ok = jnp.all(jnp.isfinite(ghat))
      params = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, params)
      acc = models.predict_metrics(model.apply, params, *test_data)["test_accuracy"]
      return (params, opt), (jnp.sum(loss), acc)

    return jax.lax.scan(body, (params, tx.init(params)), (jnp.arange(num_steps), counts))[1]
  return jax.jit(jax.vmap(run))


def time_to(acc, stop, target):
  """Cumulative sim time through the first step whose accuracy reaches ``target`` (inf if none)."""
  hit = np.flatnonzero(acc >= target)
  return (float(np.cumsum(stop)[hit[0]]), int(hit[0]) + 1) if hit.size else (np.inf, -1)


def fmt(xs):
  xs = np.asarray(xs, float)
  if not np.isfinite(xs).any():
    return "not reached"
  return f"{np.median(xs):8.1f} [{np.min(xs):.1f}, {np.max(xs):.1f}]"


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--check_steps", type=int, default=20, help="0 skips the sharded-step check")
  ap.add_argument("--decay", type=float, default=adaptive.AdaptivePS._field_defaults["decay"],
                  help="the adaptive PS's EWMA weight of the newest step")
  args = ap.parse_args()
  t_start = time.time()
  cfg = experiment.default_config()
  mesh = experiment.setup_devices(cfg)
  ds = experiment.make_dataset(cfg)
  model = experiment.make_model(cfg, ds.num_classes)
  tx = experiment.make_optimizer(cfg)
  loss_fn = models.chunk_loss_fn(model.apply, cfg.batch_size, ds.is_regression)
  train_data = (jnp.asarray(ds.x_train), jnp.asarray(ds.y_train))
  test_data = (jnp.asarray(ds.x_test), jnp.asarray(ds.y_test))
  asg = experiment.make_assignment(cfg)
  num_workers, ell = cfg.assignment.num_workers, cfg.protocol.ell
  keys = jnp.stack([experiment.keys(s) for s in range(args.seeds)])
  init_keys, data_keys, step_keys = keys[:, 0], keys[:, 1], keys[:, 2]
  target = cfg.target_accuracy
  print(f"{cfg.data.name} {cfg.model.name} {tuple(cfg.model.mlp.hidden)}, m={num_workers}, "
        f"{cfg.assignment.name} load {cfg.assignment.load}, ell={ell}, batch {cfg.batch_size}, "
        f"{args.steps} steps, {args.seeds} seeds, "
        f"adaptive decay {args.decay}; "
        f"target accuracy {target}", flush=True)

  configs = {n: configured(cfg, f) for n, f in PROTOCOL_FLAGS.items()}
  protos = {n: experiment.make_protocol(c, asg) for n, c in configs.items()}
  trains = {n: make_train(p, model, loss_fn, tx, train_data, test_data, cfg.batch_size,
                          args.steps) for n, p in protos.items()}
  results = {}
  for sname, flags in STRAGGLERS.items():
    straggler = experiment.make_straggler_model(configured(cfg, flags))
    steps = {n: experiment.make_step(configs[n], p, straggler, loss_fn, tx, mesh)
             for n, p in protos.items()}
    if args.decay != adaptive.AdaptivePS._field_defaults["decay"]:
      steps["adaptive"] = parallel.make_coded_step(
          protos["adaptive"], straggler, loss_fn, tx, mesh,
          adaptive=adaptive.AdaptivePS(protos["adaptive"], decay=args.decay))
    for n in NAMES:
      t0 = time.time()
      stop, counts = jax.tree.map(np.asarray, plan_scan(steps[n], args.steps)(step_keys))
      loss, acc = jax.tree.map(np.asarray, trains[n](init_keys, data_keys, counts))
      results[sname, n] = dict(stop=stop, loss=loss, acc=acc)
      print(f"  {sname:16s} {n:15s} planned and trained in {time.time() - t0:5.1f} s",
            flush=True)
    if args.check_steps and sname == "gilbert_elliott":
      check(steps["adaptive"], model, train_data, cfg, init_keys[0], data_keys[0], step_keys[0],
            results[sname, "adaptive"], args.check_steps)

  for sname in STRAGGLERS:
    print(f"\n== {sname}: time to {target:.0%} test accuracy (simulated time, median "
          f"[min, max] over {args.seeds} seeds)")
    print(f"{'protocol':16s} {'time to target':>26s} {'steps':>6s} {'mean step time':>15s} "
          f"{'final acc':>10s} {'best acc':>9s}")
    for n in NAMES:
      r = results[sname, n]
      tt = [time_to(r["acc"][i], r["stop"][i], target) for i in range(args.seeds)]
      steps_to = [s for _, s in tt if s > 0]
      print(f"{n:16s} {fmt([t for t, _ in tt]):>26s} "
            f"{(str(int(np.median(steps_to))) if steps_to else '-'):>6s} "
            f"{np.mean(r['stop']):15.2f} {np.median(r['acc'][:, -1]):10.3f} "
            f"{np.median(r['acc'].max(1)):9.3f}")
    ada, sta = results[sname, "adaptive"], results[sname, "static"]
    ratio = [time_to(ada["acc"][i], ada["stop"][i], target)[0]
             / time_to(sta["acc"][i], sta["stop"][i], target)[0] for i in range(args.seeds)]
    step_ratio = np.mean(ada["stop"], 1) / np.mean(sta["stop"], 1)
    print(f"adaptive/static time to target: median {np.median(ratio):.3f} "
          f"[{np.min(ratio):.3f}, {np.max(ratio):.3f}] (target <= 0.9); mean step time ratio "
          f"{np.median(step_ratio):.3f}")
    bw = results[sname, "backup_workers"]
    print(f"backup workers (b=2, drops 10% of each batch): final accuracy "
          f"{np.median(bw['acc'][:, -1]):.3f} vs exact (adaptive) "
          f"{np.median(ada['acc'][:, -1]):.3f}; best {np.median(bw['acc'].max(1)):.3f} vs "
          f"{np.median(ada['acc'].max(1)):.3f}")
  print(f"\ntotal {time.time() - t_start:.0f} s")


def check(coded, model, train_data, cfg, init_key, data_key, step_key, fast, num_steps):
  """The sharded CodedStep with the adaptive PS reproduces the plan scan and the one-device run."""
  t0 = time.time()
  params = models.init_params(model, init_key, train_data[0][:1])
  update = jax.jit(coded.update)
  state = coded.init_state(params, step_key)
  sim, loss = [], []
  for s in range(num_steps):
    chunks = data.step_chunks(train_data, data_key, s, cfg.batch_size,
                              coded.assignment.num_chunks)
    state, met = update(state, chunks, step_key)
    sim.append(float(met["step_sim_time"]))
    loss.append(float(met["loss"]))
  assert coded.adaptive is not None
  np.testing.assert_array_equal(np.asarray(sim, np.float32), fast["stop"][0, :num_steps])
  np.testing.assert_allclose(loss, fast["loss"][0, :num_steps], rtol=1e-4)
  perm = np.asarray(state.adaptive_state.perm)
  moved = int(np.sum(perm != np.arange(perm.size)))
  print(f"  check: sharded CodedStep (adaptive) = plan scan for {num_steps} steps "
        f"(step_sim_time equal, loss max rel diff "
        f"{np.max(np.abs(np.asarray(loss) / fast['loss'][0, :num_steps] - 1)):.1e}); "
        f"{moved} workers placed off identity; {time.time() - t0:.1f} s", flush=True)


if __name__ == "__main__":
  main()

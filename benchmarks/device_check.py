"""Accelerator check of the LM config: step-time ratio, memory, exactness (< 5 min on one GPU).

Builds configs/lm.py's transformer LM on all local devices (one mesh axis of
``workers``; with ``--model K`` a ``workers × model`` mesh whose workers are groups of
``K`` devices holding the parameters and Adam state sharded, PROTOCOL.md §13), then
prints

1. exactness: the exact-mode partial_straggler gradient against the full-batch
   gradient (``jax.grad`` of the whole batch's loss), relative error, 3 steps;
2. memory: compiled temp/argument bytes of the coded and the uncoded step
   (XLA's memory analysis), the model's estimate (:func:`jaxgc.models.memory_estimate`)
   and the device's peak bytes in use where the backend reports it;
3. the coded / uncoded step-time ratio (median over interleaved steps; uncoded =
   the same per-device chunk gradients, summed and all-reduced);
4. with ``--train_steps N``: training loss and validation loss / perplexity of
   the coded step before and after ``N`` adam steps.

  python benchmarks/device_check.py                  # GPU/TPU, LM sized for one card
  python benchmarks/device_check.py --small          # CPU, a minute: checks the script
  python benchmarks/device_check.py --cpu --size=lm --train_steps=40   # configs/lm.py's LM
  python benchmarks/device_check.py --model 2        # several GPUs: workers of 2 devices each
  python benchmarks/device_check.py --small --model 4  # the k > 1 path on 8 CPU devices
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZES = {  # name: (d_model, num_heads, num_layers, seq_len, batch_size, corpus_bytes)
    "small": (32, 2, 1, 32, 32, 200_000),
    "lm": (64, 4, 2, 64, 64, 1_000_000),         # configs/lm.py
    "card": (512, 8, 8, 256, 256, 8_000_000),
}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--small", action="store_true", help="tiny LM on 8 simulated CPU devices")
  ap.add_argument("--size", choices=sorted(SIZES), default=None,
                  help="LM size (default: card; small with --small)")
  ap.add_argument("--cpu", action="store_true", help="8 simulated CPU devices")
  ap.add_argument("--train_steps", type=int, default=30)
  ap.add_argument("--protocol", default="partial_straggler")
  ap.add_argument("--workers", type=int, default=8, help="m (a multiple of the device count)")
  ap.add_argument("--load", type=int, default=3)
  ap.add_argument("--ell", type=int, default=2)
  ap.add_argument("--iters", type=int, default=30)
  ap.add_argument("--max_seconds", type=float, default=120.0, help="cap on the timing loop")
  ap.add_argument("--model", type=int, default=1,
                  help="devices per worker k (a workers x model mesh; k must divide the devices)")
  args = ap.parse_args()
  size = args.size or ("small" if args.small else "card")
  if args.small or args.cpu:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flag = "--xla_force_host_platform_device_count=8"
    if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
      os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from jax.flatten_util import ravel_pytree  # pylint: disable=import-outside-toplevel

  from jaxgc import assignments, data, models, parallel, protocols, timing  # pylint: disable=import-outside-toplevel

  t_start = time.perf_counter()
  d_model, heads, layers, seq, batch, corpus = SIZES[size]
  devices = jax.devices()
  mesh = parallel.make_mesh(len(devices), model=args.model)
  print(f"device: {len(devices)} x {devices[0].device_kind} ({devices[0].platform}); LM d_model="
        f"{d_model}, heads={heads}, layers={layers}, seq_len={seq}, batch={batch} sequences; "
        f"m={args.workers}, load={args.load}, ell={args.ell}, protocol={args.protocol}; mesh "
        f"{dict(mesh.shape)}", flush=True)
  ds = data.load("pystdlib", seq_len=seq, max_bytes=corpus, test_fraction=0.05)
  data.check_chunking(batch, args.workers, seq)
  model = models.get_model("transformer_lm", ds.num_classes, d_model=d_model, num_heads=heads,
                           num_layers=layers, seq_len=seq)
  loss_fn = models.chunk_loss_fn(model.apply, batch)
  params = jax.jit(model.init)(jax.random.key(0), ds.x_train[:1])["params"]
  nparams = sum(x.size for x in jax.tree.leaves(params))
  tx = optax.adam(1e-3)
  asg = assignments.cyclic(args.workers, args.load)
  proto = protocols.get_protocol(args.protocol, asg, args.ell)
  coded = parallel.make_coded_step(proto, timing.get_model("slowdown"), loss_fn, tx, mesh)
  plain = parallel.make_plain_step(asg, loss_fn, tx, mesh, compute_slots=coded.layout.slots)
  train = (jnp.asarray(ds.x_train), jnp.asarray(ds.y_train))
  data_key, key = jax.random.key(1), jax.random.key(2)
  chunks = [data.step_chunks(train, data_key, s, batch, args.workers) for s in range(3)]
  print(f"params: {nparams / 1e6:.2f} M; corpus {corpus / 1e6:.1f} MB, "
        f"{len(ds.x_train)} train / {len(ds.x_test)} validation sequences", flush=True)

  # 1. Exactness against the full-batch gradient.
  grad = jax.jit(coded.gradient)
  def total(p, c):
    return jnp.sum(jax.vmap(loss_fn, (None, 0))(p, c))
  full = jax.jit(jax.grad(total))
  errs = []
  for s, c in enumerate(chunks):
    g, metrics = grad(params, c, jax.random.fold_in(key, s))
    want = ravel_pytree(full(params, c))[0]
    errs.append(float(jnp.linalg.norm(ravel_pytree(g)[0] - want) / jnp.linalg.norm(want)))
    assert bool(metrics["exact"]), "exact mode did not decode exactly"
  print(f"exactness: ||g_coded - g_full|| / ||g_full|| = {max(errs):.2e} (worst of {len(errs)} "
        "steps)", flush=True)

  # 2. Memory.
  states = {"coded": jax.jit(coded.init_state)(params, key),
            "uncoded": jax.jit(lambda p: parallel.TrainState.create(p, tx))(params)}
  whole = sum(x.nbytes for x in jax.tree.leaves((states["uncoded"].params,
                                                  states["uncoded"].opt_state)))
  held = parallel.device_bytes((states["coded"].params, states["coded"].opt_state))
  print(f"parameters + optimizer state per device: {held / 2**20:.1f} MiB of a replica's "
        f"{whole / 2**20:.1f} MiB (x k = {held * args.model / whole:.3f}; target <= 1.1)")
  fns = {"coded": coded.jit(), "uncoded": plain.jit()}
  compiled = {k: fns[k].lower(states[k], chunks[0], key).compile() for k in fns}
  for k, c in compiled.items():
    ma = c.memory_analysis()
    print(f"memory {k}: temp {ma.temp_size_in_bytes / 2**20:.1f} MiB, arguments "
          f"{ma.argument_size_in_bytes / 2**20:.1f} MiB, "
          f"outputs {ma.output_size_in_bytes / 2**20:.1f} MiB")
  est = models.memory_estimate(loss_fn, params, jax.tree.map(lambda a: a[0], chunks[0]), args.load)
  print("memory estimate per worker: " + ", ".join(
      f"{k} {v / 2**20:.1f} MiB" for k, v in est._asdict().items())
        + f"; total {est.total / 2**20:.1f} MiB", flush=True)

  # 3. Step-time ratio, interleaved.
  times = {k: [] for k in fns}
  warm = 3
  t0 = time.perf_counter()
  for it in range(warm + args.iters):
    if it > warm + 5 and time.perf_counter() - t0 > args.max_seconds:
      break
    c = chunks[it % len(chunks)]
    for k, fn in compiled.items():
      t = time.perf_counter()
      states[k], m = fn(states[k], c, key)
      jax.block_until_ready((states[k], m))
      if it >= warm:
        times[k].append(time.perf_counter() - t)
  cod, unc = (np.asarray(times[k]) for k in ("coded", "uncoded"))
  print(f"step time: coded {1e3 * np.median(cod):.2f} ms, uncoded {1e3 * np.median(unc):.2f} ms, "
        f"median ratio {np.median(cod / unc):.3f} ({len(cod)} steps)")
  stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    print(f"device peak bytes in use: {stats['peak_bytes_in_use'] / 2**20:.1f} MiB of "
          f"{stats.get('bytes_limit', 0) / 2**20:.0f} MiB")
  # 4. Training: the loss goes down.
  if args.train_steps:
    evaluate = jax.jit(functools.partial(models.predict_metrics, model.apply))
    val = (jnp.asarray(ds.x_test[:512]), jnp.asarray(ds.y_test[:512]))
    state = jax.jit(coded.init_state)(params, key)
    before = {k: float(v) for k, v in evaluate(state.params, *val).items()}
    losses, t = [], time.perf_counter()
    for s in range(args.train_steps):
      c = data.step_chunks(train, data_key, s, batch, args.workers)
      state, m = compiled["coded"](state, c, key)
      losses.append(float(m["loss"]))
    after = {k: float(v) for k, v in evaluate(state.params, *val).items()}
    print(f"training {args.train_steps} coded steps ({time.perf_counter() - t:.0f} s): train loss "
          f"{np.mean(losses[:3]):.3f} (first 3) -> {np.mean(losses[-3:]):.3f} (last 3); validation "
          f"loss {before['test_loss']:.3f} -> {after['test_loss']:.3f}, perplexity "
          f"{before['test_perplexity']:.1f} -> {after['test_perplexity']:.1f}, next-byte accuracy "
          f"{before['test_accuracy']:.3f} -> {after['test_accuracy']:.3f}")
  print(f"total wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
  main()

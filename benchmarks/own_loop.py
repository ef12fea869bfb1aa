"""Coded-step overhead: the own-loop coded step against a plain data-parallel step.

Per model, three ratios from one run (medians over iterations after warm-up):

1. ``coded / plain``: ``jax.jit(jaxgc.coded_value_and_grad(...))`` (the own-loop call,
   plan made in the step) against a plain data-parallel ``value_and_grad`` on the
   same mesh (``shard_map``: each device streams its ``m / D`` chunks once with
   ``lax.scan``, sums, ``psum``); without ``--quick`` also
   ``make_coded_step(...).jit()`` (``update``, plan made one step ahead) against the
   plain gradient plus the same ``optax`` update;
2. ``layout``: the ratio redundancy alone implies, from the layout: chunk slots per
   device of the coded step (``m / D`` workers × ``slot_width`` slots) over the plain
   step's (``m / D``); ``computed``: the chunk gradients the coded step really
   computed (``computed_fraction · Σ load_j``, median) over ``N``;
3. ``remainder = ratio / layout``: the overhead that is not redundancy.

Coded and plain calls alternate (coded first on even iterations, plain first on odd
ones) so both see the same machine load; the medians are of those interleaved runs.

The phases (skip them with ``--no_phases``): the plan (draw, stop time, state,
coefficient solve, jitted alone), the chunk stream (``stream_round`` in
``shard_map`` at a fixed plan, no collective), the whole gradient at a fixed plan
(stream, decode, ``psum``, metrics), and the plain step's stream without its
``psum``, interleaved with the whole coded and plain steps; the differences give the
decode/``psum`` and the plan's share inside the step.

Models: the MLP (``jaxgc.models.mlp``), the transformer LM as ``configs/lm.py``
builds it on ``pystdlib`` (``d_model 64``, 4 heads, 2 layers, 64-byte sequences) and
flax's ImageNet ResNet (``tests/flax_models/imagenet_resnet.py``, ``stage_sizes
[1, 1]``, 8 filters, 16×16 inputs, its batch norm's ``axis_name`` unbound by a
method interceptor so each chunk's statistics are its own), or ``jaxgc.models.CNNBN``
where that file is absent.

  python benchmarks/own_loop.py                       # 8 CPU devices, 16 workers, load 3
  python benchmarks/own_loop.py --quick --json /tmp/own_loop.json
  python benchmarks/own_loop.py --models=mlp --iters=50

Results and their reading: docs/results.md, "Coded-step overhead in an own loop".
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESNET = os.path.join(ROOT, "tests", "flax_models", "imagenet_resnet.py")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--devices", type=int, default=8)
  ap.add_argument("--workers", type=int, default=16)
  ap.add_argument("--load", type=int, default=3)
  ap.add_argument("--ell", type=int, default=2)
  ap.add_argument("--models", default="mlp,lm,resnet", help="comma-separated: mlp, lm, resnet")
  ap.add_argument("--iters", type=int, default=30)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--no_phases", action="store_true", help="skip the phase breakdown")
  ap.add_argument("--quick", action="store_true",
                  help="8 iterations, 1 warm-up, coded_value_and_grad only (no update pair)")
  ap.add_argument("--json", default=None, help="also write the results to this path")
  args = ap.parse_args()
  if args.quick:
    args.iters, args.warmup = 8, 1

  import jaxgc  # pylint: disable=import-outside-toplevel
  jaxgc.parallel.set_cpu_device_count(args.devices)
  import jax  # pylint: disable=import-outside-toplevel

  mesh = jaxgc.parallel.make_mesh(args.devices)
  protocol = jaxgc.PartialStraggler(jaxgc.assignments.cyclic(args.workers, args.load), args.ell)
  straggler = jaxgc.timing.Slowdown(jaxgc.timing.ShiftedExponential(1.0, 1.0), 0.25, 5.0)
  print(f"{args.workers} workers, load {args.load}, ell {args.ell}, {args.devices} "
        f"{jax.default_backend()} devices, {args.iters} interleaved runs after {args.warmup} "
        "warm-up; medians")
  rows = []
  for name in args.models.split(","):
    model = build_model(name.strip(), args.workers)
    print(f"\n== {model['label']}", flush=True)
    rows.append(measure(model, protocol, straggler, mesh, args))
  print_table(rows)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"config": {k: getattr(args, k) for k in ("devices", "workers", "load", "ell",
                                                          "iters", "warmup")},
                 "rows": rows}, f, indent=1)
    print(f"wrote {args.json}")


# -- models ------------------------------------------------------------------------------

def build_model(name: str, m: int) -> dict:
  """``{label, loss_fn, params, chunks [N, ...], args, has_aux}`` for ``name``."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from jaxgc import data, models  # pylint: disable=import-outside-toplevel
  if name == "mlp":
    per_chunk, hidden = 16, (256, 256)
    net = models.mlp(10, hidden=hidden)
    x = jax.random.normal(jax.random.key(0), (m, per_chunk, 64))
    y = jax.random.randint(jax.random.key(1), (m, per_chunk), 0, 10)
    params = models.init_params(net, jax.random.key(2), x[0])
    return dict(label=f"mlp 64-256-256-10, {per_chunk} examples/chunk",
                loss_fn=models.chunk_loss_fn(net.apply, m * per_chunk), params=params,
                chunks=(x, y), args=(), has_aux=False)
  if name == "lm":
    # configs/lm.py's model and data: batch 64 sequences of 64 bytes, here over m chunks.
    seq, batch = 64, 64
    ds = data.load("pystdlib", seq_len=seq, max_bytes=200_000, test_fraction=0.05)
    net = models.get_model("transformer_lm", ds.num_classes, d_model=64, num_heads=4,
                           num_layers=2, seq_len=seq)
    per_chunk = batch // m
    x = np.asarray(ds.x_train[:batch]).reshape(m, per_chunk, seq)
    y = np.asarray(ds.y_train[:batch]).reshape(m, per_chunk, seq)
    params = jax.jit(net.init)(jax.random.key(0), x[0])["params"]
    return dict(label=f"transformer_lm d64 h4 L2 seq{seq}, {per_chunk} sequences/chunk",
                loss_fn=models.chunk_loss_fn(net.apply, batch), params=params,
                chunks=(x, y), args=(), has_aux=False)
  if name == "resnet":
    if os.path.exists(RESNET):
      return _flax_resnet(m)
    per_chunk = 16
    net = models.CNNBN(channels=(8,), hidden=32, num_outputs=2, dropout=0.2)
    x = jax.random.normal(jax.random.key(0), (m, per_chunk, 64))
    params, stats = models.init_variables(net, jax.random.key(1), x[0])
    return dict(label=f"CNNBN (no {os.path.relpath(RESNET, ROOT)}), {per_chunk} 8x8/chunk",
                loss_fn=models.stateful_chunk_loss_fn(net.apply, m * per_chunk),
                params=params, chunks=(x, (x[:, :, 0] > 0).astype(np.int32)),
                args=(stats,), has_aux=True)
  raise SystemExit(f"--models: unknown model {name!r}; pick from mlp, lm, resnet.")


def _flax_resnet(m: int) -> dict:
  """flax's ImageNet ResNet as copied, tiny: 2 stages of 1 block, 8 filters, 16×16×3."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  spec = importlib.util.spec_from_file_location("imagenet_resnet", RESNET)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  net = mod.ResNet(stage_sizes=[1, 1], block_cls=mod.ResNetBlock, num_classes=2, num_filters=8)
  per_chunk = 8

  def unbound(next_fun, args, kwargs, context):
    # The model's BatchNorm(axis_name='batch') would pmean over an axis that is not
    # bound here; unbound, each chunk normalises with its own statistics, which is
    # what binding the axis to the chunk alone computes (PROTOCOL.md §12).
    if isinstance(context.module, nn.BatchNorm) and context.module.axis_name is not None:
      object.__setattr__(context.module, "axis_name", None)
    return next_fun(*args, **kwargs)

  x = jax.random.normal(jax.random.key(0), (m, per_chunk, 16, 16, 3))
  y = (x[:, :, 0, 0, 0] > 0).astype(jnp.int32)
  with nn.intercept_methods(unbound):
    variables = jax.jit(functools.partial(net.init, train=False))(jax.random.key(1), x[0])
  params, stats = variables["params"], {"batch_stats": variables["batch_stats"]}
  scale = 1.0 / (m * per_chunk)

  def loss_fn(params, chunk, model_state):
    x, y = chunk
    with nn.intercept_methods(unbound):
      logits, new = net.apply({"params": params, **model_state}, x, train=True,
                              mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).sum() * scale, dict(new)

  return dict(label=f"flax ImageNet ResNet [1,1] x8 filters, {per_chunk} 16x16x3/chunk",
              loss_fn=loss_fn, params=params, chunks=(x, y), args=(stats,), has_aux=True)


# -- the plain data-parallel step ------------------------------------------------------------

def plain_value_and_grad(loss_fn, mesh, num_chunks: int, has_aux: bool, stream_only=False):
  """``(params, local, key, *args) -> (loss, grads)``: each device streams its chunks
  ``local`` (leaves ``[D, N/D, ...]``, sharded) once, sums and ``psum``s.

  ``stream_only``: no ``psum``; returns the per-device sums (``P(workers)``).
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

  from jaxgc.backends.spmd.chunk_fn import ChunkLoss, chunk_keys  # pylint: disable=C0415
  from jaxgc.backends.spmd.collectives import pvary  # pylint: disable=import-outside-toplevel
  ax = "workers"
  chunk_loss = ChunkLoss(loss_fn, has_aux)

  def body(params, local, keys, extra):
    params = pvary(params, ax)
    local = jax.tree.map(lambda a: a[0], local)
    keys = None if keys is None else keys[0]

    def one(carry, i):
      g_sum, l_sum = carry
      chunk = jax.tree.map(lambda a: a[i], local)
      (loss, aux), g = jax.value_and_grad(
          lambda p: chunk_loss(p, chunk, None if keys is None else keys[i], extra),
          has_aux=True)(params)
      return (jax.tree.map(jnp.add, g_sum, g), l_sum + loss), aux

    n = jax.tree.leaves(local)[0].shape[0]
    zeros = jax.tree.map(jnp.zeros_like, params)
    (g, loss), aux = jax.lax.scan(one, (zeros, pvary(jnp.zeros(()), ax)), jnp.arange(n))
    if stream_only:
      return jax.tree.map(lambda a: a[None], (loss, g))
    return jax.lax.psum((loss, g), ax), jax.tree.map(lambda a: a[None], aux)

  out = P(ax) if stream_only else (P(), P(ax))
  fn = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(ax), P(ax), P()), out_specs=out,
                     axis_names={ax})

  def call(params, local, key, *extra):
    keys = None
    if chunk_loss.uses_rng:
      keys = chunk_keys(key, num_chunks).reshape(mesh.shape[ax], -1)
    return fn(params, local, keys, tuple(extra))
  return call


# -- timing ------------------------------------------------------------------------------------

def interleaved(fns: dict, make_args, iters: int, warmup: int) -> dict:
  """Median seconds of each of ``fns`` (name -> callable), called in alternating order
  per iteration with ``make_args(name, i)``."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  names = list(fns)
  for name in names:                                   # compile
    jax.block_until_ready(fns[name](*make_args(name, 0)))
  times: dict = {n: [] for n in names}
  for i in range(warmup + iters):
    for name in (names if i % 2 == 0 else names[::-1]):
      a = make_args(name, i + 1)
      t0 = time.perf_counter()
      jax.block_until_ready(fns[name](*a))
      if i >= warmup:
        times[name].append(time.perf_counter() - t0)
  return {n: float(np.median(t)) for n, t in times.items()}


def measure(model: dict, protocol, straggler, mesh, args) -> dict:
  """One model's row: the timings, the three ratios and the phases."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

  import jaxgc  # pylint: disable=import-outside-toplevel
  m, n_dev = args.workers, args.devices
  num_chunks = protocol.assignment.num_chunks
  loss_fn, params, chunks, extra = model["loss_fn"], model["params"], model["chunks"], model["args"]
  has_aux = model["has_aux"]
  grad_fn = jaxgc.coded_value_and_grad(loss_fn, protocol, straggler, mesh, has_aux=has_aux)
  step = grad_fn.step
  worker_chunks = grad_fn.shard_chunks(chunks)
  local = jax.device_put(jax.tree.map(lambda a: np.asarray(a).reshape(
      (n_dev, -1) + np.shape(a)[1:]), chunks), NamedSharding(mesh, P("workers")))
  coded = jax.jit(grad_fn)
  plain = jax.jit(plain_value_and_grad(loss_fn, mesh, num_chunks, has_aux))
  keys = lambda i: jax.random.fold_in(jax.random.key(7), i)
  # name -> (callable, i -> its arguments)
  calls = {"coded": (coded, lambda i: (params, worker_chunks, keys(i), *extra)),
           "plain": (plain, lambda i: (params, local, keys(i), *extra))}

  lay = step.layout
  layout_ratio = lay.per_device * lay.slots / -(-m // n_dev)
  # The chunk gradients the coded step really computes, median over the timed keys.
  computed = [float(coded(*calls["coded"][1](i))[2]["computed_fraction"])
              for i in range(1, args.iters + 1)]
  work_ratio = float(np.median(computed)) * float(np.sum(protocol.assignment.loads)) / num_chunks
  # The plain step is a correct reference: its gradient is the coded step's (exact) one.
  (_, g_coded, info), ((_, g_plain), _) = (coded(*calls["coded"][1](0)),
                                           plain(*calls["plain"][1](0)))
  err = max(float(jnp.max(jnp.abs(a - b))) for a, b in
            zip(jax.tree.leaves(g_coded), jax.tree.leaves(g_plain), strict=True))
  print(f"max |coded - plain| gradient: {err:.2e} (exact: {bool(info['exact'])})")

  if not args.quick:
    tx = optax.sgd(0.01)
    upd = jaxgc.make_coded_step(protocol, straggler, loss_fn, tx, mesh, has_aux=has_aux)
    model_state = extra[0] if extra else ()
    # Each call starts from the same state: the timing is of one step, not a trajectory.
    state0 = upd.init_state(params, jax.random.key(3), model_state=model_state)
    opt0 = tx.init(params)

    @jax.jit
    def plain_update(params, opt_state, model_state, local, key):
      (loss, grads), aux = plain(params, local, key, *((model_state,) if extra else ()))
      updates, opt_state = tx.update(grads, opt_state, params)
      new_ms = (jax.tree.map(lambda a: jnp.mean(a.reshape((-1,) + a.shape[2:]), 0), aux)
                if extra else model_state)
      return optax.apply_updates(params, updates), opt_state, new_ms, loss

    calls["coded_update"] = (upd.jit(), lambda i: (state0, worker_chunks, keys(i)))
    calls["plain_update"] = (plain_update,
                             lambda i: (params, opt0, model_state, local, keys(i)))

  fns = {k: f for k, (f, _) in calls.items()}
  make = lambda name, i: calls[name][1](i)
  t = interleaved(fns, make, args.iters, args.warmup)
  row = {"model": model["label"], "coded_ms": 1e3 * t["coded"], "plain_ms": 1e3 * t["plain"],
         "ratio": t["coded"] / t["plain"], "layout_ratio": layout_ratio,
         "work_ratio": work_ratio}
  row["remainder"] = row["ratio"] / layout_ratio
  print(f"coded_value_and_grad {row['coded_ms']:.2f} ms, plain {row['plain_ms']:.2f} ms, "
        f"ratio {row['ratio']:.2f}, layout {layout_ratio:.2f} (computed {work_ratio:.2f}), "
        f"remainder {row['remainder']:.2f}")
  if not args.quick:
    row.update(update_coded_ms=1e3 * t["coded_update"], update_plain_ms=1e3 * t["plain_update"])
    row["update_ratio"] = t["coded_update"] / t["plain_update"]
    row["update_remainder"] = row["update_ratio"] / layout_ratio
    print(f"make_coded_step.update {row['update_coded_ms']:.2f} ms, plain + sgd "
          f"{row['update_plain_ms']:.2f} ms, ratio {row['update_ratio']:.2f}, remainder "
          f"{row['update_remainder']:.2f}")
  if not args.no_phases:
    row["phases"] = phases(step, params, worker_chunks, local, extra, coded, plain, mesh,
                           num_chunks, has_aux, loss_fn, keys, args)
  return row


def phases(step, params, worker_chunks, local, extra, coded, plain, mesh, num_chunks, has_aux,
           loss_fn, keys, args) -> dict:
  """Median ms of the coded step's phases, jitted one by one, interleaved with the whole
  coded step, the plain step's stream (no ``psum``) and the whole plain step."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

  from jaxgc.backends.spmd import gradient as _g  # pylint: disable=import-outside-toplevel
  from jaxgc.backends.spmd.collectives import pvary  # pylint: disable=import-outside-toplevel
  from jaxgc.backends.spmd.placement import placement  # pylint: disable=import-outside-toplevel
  from jaxgc.backends.spmd.sharding import MessageLayout  # pylint: disable=import-outside-toplevel
  from jaxgc.backends.spmd.stream import chunk_inputs  # pylint: disable=import-outside-toplevel
  spec, lay, look = step.spec, step.layout, step.lookahead
  ax = spec.axis_name

  @jax.jit
  def plan(key):
    draw, _ = look.draw(key, look.init_straggler_state(key), look.init_adaptive_state())
    return look.plan(*draw)

  @jax.jit
  def at_plan(params, wc_data, plan, key, *extra):
    wc = _worker_chunks(wc_data)
    return _g.sharded_gradient(spec, params, wc, plan, None,
                               key if spec.chunk_loss.uses_rng else None, extra)[:2]

  msg = MessageLayout(placement(spec.placement, params), look.protocol.ell)

  @jax.jit
  def stream_only(params, wc_data, plan, key, *extra):
    def body(params, local, plan, key, extra):
      wids = jax.lax.axis_index(ax) * lay.per_device + jnp.arange(lay.per_device)
      dev = _g.DeviceShare(wids, pvary(params, ax), local,
                           jnp.asarray(lay.loss_owner, jnp.float32)[wids],
                           chunk_inputs(lay, wids, key, extra))
      z, bad, loss, computed, _ = _g.stream_round(spec, dev, plan, msg)
      return jax.tree.map(lambda a: a[None], (z, bad, loss, computed))
    key = key if spec.chunk_loss.uses_rng else None
    return jax.shard_map(body, mesh=mesh, in_specs=(P(), P(ax), P(), P(), P()),
                         out_specs=P(ax), axis_names={ax})(params, wc_data, plan, key, extra)

  plain_stream = jax.jit(plain_value_and_grad(loss_fn, mesh, num_chunks, has_aux,
                                              stream_only=True))
  plans = {}

  def get_plan(i):
    if i not in plans:
      plans[i] = jax.block_until_ready(plan(keys(i)))
    return plans[i]
  for i in range(args.warmup + args.iters + 1):
    get_plan(i)
  fns = {"plan": plan, "coded": coded, "gradient_at_plan": at_plan, "stream": stream_only,
         "plain_stream": plain_stream, "plain": plain}
  data = worker_chunks.data

  def make(name, i):
    if name == "plan":
      return (keys(i),)
    if name == "coded":
      return (params, worker_chunks, keys(i), *extra)
    if name.startswith("plain"):
      return (params, local, keys(i), *extra)
    return (params, data, get_plan(i), keys(i), *extra)

  t = interleaved(fns, make, args.iters, args.warmup)
  out = {k: 1e3 * v for k, v in t.items()}
  # The plan made inside coded_value_and_grad (replicated), and its coverage outputs.
  out["plan_in_step"] = out["coded"] - out["gradient_at_plan"]
  out["decode_psum_metrics"] = out["gradient_at_plan"] - out["stream"]
  out["plain_psum"] = out["plain"] - out["plain_stream"]
  print("phases (ms, medians): " + ", ".join(f"{k} {v:.2f}" for k, v in out.items()))
  return out


def _worker_chunks(data):
  from jaxgc.backends.spmd.layout import WorkerChunks  # pylint: disable=import-outside-toplevel
  return WorkerChunks(data)


def print_table(rows):
  print("\n| model | coded ms | plain ms | ratio | load-implied (layout) | remainder | "
        "computed | ratio / computed |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['model']} | {r['coded_ms']:.2f} | {r['plain_ms']:.2f} | {r['ratio']:.2f} | "
          f"{r['layout_ratio']:.2f} | {r['remainder']:.2f} | {r['work_ratio']:.2f} | "
          f"{r['ratio'] / r['work_ratio']:.2f} |")
  if any("update_ratio" in r for r in rows):
    print("\nmake_coded_step(...).update (plan one step ahead) vs plain gradient + sgd:")
    print("| model | coded ms | plain ms | ratio | remainder |")
    print("|---|---|---|---|---|")
    for r in rows:
      if "update_ratio" in r:
        print(f"| {r['model']} | {r['update_coded_ms']:.2f} | {r['update_plain_ms']:.2f} | "
              f"{r['update_ratio']:.2f} | {r['update_remainder']:.2f} |")
  if any("phases" in r for r in rows):
    print("\nphases (ms, medians, jitted one by one):")
    keys = list(next(r for r in rows if "phases" in r)["phases"])
    print("| model | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for r in rows:
      if "phases" in r:
        print(f"| {r['model']} | " + " | ".join(f"{r['phases'][k]:.2f}" for k in keys) + " |")


if __name__ == "__main__":
  main()

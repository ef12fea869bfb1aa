"""Compiled memory of the coded step against an uncoded step with the same chunks.

For MLPs of about 1e5, 1e6 and 1e7 parameters and loads 2, 4, 8 (m = 8 workers,
one per simulated CPU device, ℓ = 2, partial_straggler), prints the compiled
temp memory (``jax.jit(step.update).lower(...).compile().memory_analysis()
.temp_size_in_bytes``) of

* the coded step (:class:`jaxgc.parallel.CodedStep`), and
* the uncoded data-parallel step that accumulates the same per-device chunks one
  at a time (:class:`jaxgc.parallel.PlainStep`),

and the ratios the step aims at: ``temp(load 8) / temp(load 2)`` (target ≤ 1.5:
memory flat in the load, thanks to the streaming encode) and coded / uncoded
(target ≤ 1.25). Also the per-device input bytes against the global batch bytes
(target: ``load / m``, the per-worker layout). Only compiles, never runs a step.

Then, by group size ``k`` (a ``workers × model`` mesh of ``8/k × k`` devices,
PROTOCOL.md §13), for an MLP and the transformer LM of ``configs/lm_large.py``
(Adam, m = 8, load 3, ℓ = 2): per-device argument and temp bytes
(``memory_analysis()``) and parameter-plus-optimizer bytes per device, against the
targets ``param+opt(k) <= 1.1/k · param+opt(1)`` and ``temp(k) <= temp(1)``.
``--time-steps=N`` also runs N steps per ``k`` and prints the median step time and
whether every step was exact.

  python benchmarks/step_memory.py
  python benchmarks/step_memory.py --widths=300,1000 --loads=2,8
  python benchmarks/step_memory.py --only=groups --ks=1,2,4 --time-steps=5
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FEATURES, CLASSES, CHUNK_BATCH = 64, 10, 8


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--widths", default="280,960,3120",
                  help="hidden widths w of MLP(w, w) (64 -> w -> w -> 10): ~1e5, 1e6, 1e7 params")
  ap.add_argument("--loads", default="2,4,8")
  ap.add_argument("--workers", type=int, default=8)
  ap.add_argument("--ell", type=int, default=2)
  ap.add_argument("--only", choices=("loads", "groups"), default=None)
  ap.add_argument("--ks", default="1,2,4", help="devices per worker (mesh.model)")
  ap.add_argument("--time-steps", type=int, default=0, help="steps to time per k (0: none)")
  args = ap.parse_args()

  from jaxgc import parallel  # pylint: disable=import-outside-toplevel
  parallel.set_cpu_device_count(args.workers)

  if args.only != "groups":
    by_load(args)
  if args.only != "loads":
    by_group_size(args)


def by_load(args):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

  from jaxgc import assignments, models, parallel, protocols, timing  # pylint: disable=import-outside-toplevel

  m = args.workers
  mesh = parallel.make_mesh(m)
  rep = NamedSharding(mesh, P())
  tx = optax.sgd(0.1)
  key = jax.random.key(0)
  abstract = lambda tree, sharding: jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)
  mib = lambda b: b / 2**20
  print(f"{m} workers on {len(mesh.devices.flat)} CPU devices, ell={args.ell}, "
        f"chunk batch {CHUNK_BATCH}, MLP {FEATURES}->w->w->{CLASSES}, SGD")
  print(f"{'params':>10} {'load':>4} {'coded MiB':>10} {'uncoded MiB':>12} {'coded/unc':>9} "
        f"{'params MiB':>10} {'device/global input':>20}")
  start = time.perf_counter()
  for width in (int(w) for w in args.widths.split(",")):
    model = models.get_model("mlp", CLASSES, (width, width))
    params = jax.eval_shape(lambda model=model: models.init_params(
        model, key, jnp.zeros((1, FEATURES), jnp.float32)))
    nparams = sum(x.size for x in jax.tree.leaves(params))
    loss_fn = models.chunk_loss_fn(model.apply, CHUNK_BATCH * m)
    temps = {}
    for load in (int(x) for x in args.loads.split(",")):
      proto = protocols.PartialStraggler(assignments.cyclic(m, load), args.ell)
      coded = parallel.make_coded_step(proto, timing.get_model("slowdown"), loss_fn, tx, mesh)
      plain = parallel.make_plain_step(proto.assignment, loss_fn, tx, mesh,
                                       compute_slots=coded.layout.slots)
      lay = coded.layout
      chunk = (jax.ShapeDtypeStruct((CHUNK_BATCH, FEATURES), jnp.float32),
               jax.ShapeDtypeStruct((CHUNK_BATCH,), jnp.int32))
      per_worker = parallel.WorkerChunks(jax.tree.map(
          lambda s, lay=lay: jax.ShapeDtypeStruct((lay.m_pad, lay.slots) + s.shape, s.dtype,
                                                  sharding=lay.sharding), chunk))
      row = {}
      for name, step in (("coded", coded), ("uncoded", plain)):
        state = abstract(jax.eval_shape(
            (lambda p, step=step: step.init_state(p, key)) if name == "coded"
            else (lambda p: parallel.TrainState.create(p, tx)), params), rep)
        compiled = jax.jit(step.update).lower(state, per_worker, key).compile()
        row[name] = compiled.memory_analysis().temp_size_in_bytes
      temps[load] = row
      chunk_bytes = sum(s.size * s.dtype.itemsize for s in chunk)
      device_in = lay.per_device * lay.slots * chunk_bytes
      global_in = proto.assignment.num_chunks * chunk_bytes
      print(f"{nparams:>10} {load:>4} {mib(row['coded']):>10.2f} {mib(row['uncoded']):>12.2f} "
            f"{row['coded'] / row['uncoded']:>9.3f} {mib(4 * nparams):>10.2f} "
            f"{device_in / global_in:>11.3f} (load/m {load / m:.3f})", flush=True)
    loads = sorted(temps)
    lo, hi = loads[0], loads[-1]
    worst = max(r["coded"] / r["uncoded"] for r in temps.values())
    print(f"  {nparams} params: coded temp(load {hi}) / temp(load {lo}) = "
          f"{temps[hi]['coded'] / temps[lo]['coded']:.3f} (target <= 1.5); "
          f"worst coded/uncoded = {worst:.3f} (target <= 1.25)  "
          f"[{time.perf_counter() - start:.0f} s]", flush=True)


def _group_models():
  """``(name, model, example x, chunk shapes, batch)`` of the MLP and the LM of lm_large."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from jaxgc import models  # pylint: disable=import-outside-toplevel
  mlp = models.get_model("mlp", CLASSES, (960, 960))
  lm = models.get_model("transformer_lm", 256, d_model=256, num_heads=4, num_layers=2,
                        seq_len=32)
  sds = jax.ShapeDtypeStruct
  return [("MLP 64-960-960-10", mlp, jnp.zeros((1, FEATURES), jnp.float32),
           (sds((CHUNK_BATCH, FEATURES), jnp.float32), sds((CHUNK_BATCH,), jnp.int32))),
          ("LM d256 L2 T32", lm, jnp.zeros((1, 32), jnp.int32),
           (sds((2, 32), jnp.int32), sds((2, 32), jnp.int32)))]


def by_group_size(args):
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  from jaxgc import assignments, models, parallel, protocols, timing  # pylint: disable=import-outside-toplevel

  m, key, tx = args.workers, jax.random.key(0), optax.adam(1e-3)
  ks = [int(k) for k in args.ks.split(",")]
  mib = lambda b: b / 2**20
  shard_bytes = lambda tree: sum(
      s.size * s.dtype.itemsize // np.prod([s.sharding.mesh.shape[a] for e in s.sharding.spec
                                            if e for a in ((e,) if isinstance(e, str) else e)])
      for s in jax.tree.leaves(tree))
  print(f"\nby group size k: {m} CPU devices as (8/k) x k, m={m} workers, load 3, "
        f"ell={args.ell}, Adam; MiB per device")
  print(f"{'model':>18} {'k':>2} {'param+opt':>10} {'ratio*k':>8} {'argument':>9} {'temp':>8} "
        f"{'temp/k=1':>8}" + (f" {'step s':>8} {'exact':>6}" if args.time_steps else ""))
  for name, model, example, chunk in _group_models():
    params = jax.eval_shape(lambda model=model, example=example:
                            models.init_params(model, key, example))
    loss_fn = models.chunk_loss_fn(model.apply, m * chunk[0].shape[0])
    proto = protocols.PartialStraggler(assignments.cyclic(m, 3), args.ell)
    base = {}
    for k in ks:
      mesh = parallel.make_mesh(m, model=k)
      step = parallel.make_coded_step(proto, timing.get_model("slowdown"), loss_fn, tx, mesh)
      shapes = jax.eval_shape(lambda p, step=step: step.init_state(p, key), params)
      state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                           shapes, step.state_sharding(shapes))
      lay = step.layout
      inputs = parallel.WorkerChunks(jax.tree.map(
          lambda s, lay=lay: jax.ShapeDtypeStruct((lay.m_pad, lay.slots) + s.shape, s.dtype,
                                                  sharding=lay.sharding), chunk))
      update = jax.jit(step.update)
      mem = update.lower(state, inputs, key).compile().memory_analysis()
      held = shard_bytes((state.params, state.opt_state))
      base.setdefault("held", held)
      base.setdefault("temp", mem.temp_size_in_bytes)
      line = (f"{name:>18} {k:>2} {mib(held):>10.2f} {held * k / base['held']:>8.3f} "
              f"{mib(mem.argument_size_in_bytes):>9.2f} {mib(mem.temp_size_in_bytes):>8.2f} "
              f"{mem.temp_size_in_bytes / base['temp']:>8.3f}")
      if args.time_steps:
        line += " " + _time_steps(step, update, model, example, chunk, args.time_steps)
      print(line, flush=True)


def _time_steps(step, update, model, example, chunk, steps: int) -> str:
  """Median seconds of ``steps`` steps (after one to compile) and whether all were exact."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from jaxgc import models  # pylint: disable=import-outside-toplevel
  key = jax.random.key(0)
  state = jax.jit(lambda: step.init_state(models.init_params(model, key, example), key))()
  rng = np.random.default_rng(0)
  n = step.assignment.num_chunks
  data = tuple(rng.integers(0, 10, (n,) + s.shape).astype(s.dtype) if s.dtype.kind == "i"
               else rng.normal(size=(n,) + s.shape).astype(s.dtype) for s in chunk)
  inputs = step.shard_chunks(data)
  times, exact = [], True
  for i in range(steps + 1):
    t0 = time.perf_counter()
    state, metrics = update(state, inputs, jax.random.fold_in(key, i))
    jax.block_until_ready(state)
    if i:
      times.append(time.perf_counter() - t0)
    exact &= bool(metrics["exact"])
  return f"{np.median(times):>8.3f} {str(exact):>6}"


if __name__ == "__main__":
  main()

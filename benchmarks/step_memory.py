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

  python benchmarks/step_memory.py
  python benchmarks/step_memory.py --widths=300,1000 --loads=2,8
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
  args = ap.parse_args()

  from jaxgc import parallel  # pylint: disable=import-outside-toplevel
  parallel.set_cpu_device_count(args.workers)
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  from jaxgc import assignments, models, protocols, timing  # pylint: disable=import-outside-toplevel

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
    params = jax.eval_shape(lambda: models.init_params(
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
          lambda s: jax.ShapeDtypeStruct((lay.m_pad, lay.slots) + s.shape, s.dtype,
                                         sharding=lay.sharding), chunk))
      row = {}
      for name, step in (("coded", coded), ("uncoded", plain)):
        state = abstract(jax.eval_shape(
            (lambda p: step.init_state(p, key)) if name == "coded"
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


if __name__ == "__main__":
  main()

"""One jitted ``jaxgc.coded_value_and_grad`` step against ``jax.value_and_grad`` on the same chunks.

A CNN with batch norm and dropout (``jaxgc.models.CNNBN``: ``rng`` per chunk,
aux = batch statistics). The reference is
``jax.value_and_grad`` of the summed chunk losses (``vmap`` over the ``N`` chunks,
the same ``chunk_keys``) on one device; the coded step runs on the mesh and
computes each chunk on up to ``load`` workers (the redundancy of the code), plus
the plan, the encode and the decode. Prints the medians and their ratio.

  python benchmarks/own_loop.py                       # 8 CPU devices, 16 workers, load 3
  python benchmarks/own_loop.py --per_chunk=64 --iters=50
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--devices", type=int, default=8)
  ap.add_argument("--workers", type=int, default=16)
  ap.add_argument("--load", type=int, default=3)
  ap.add_argument("--ell", type=int, default=2)
  ap.add_argument("--per_chunk", type=int, default=16, help="examples per chunk")
  ap.add_argument("--iters", type=int, default=30)
  args = ap.parse_args()

  import jaxgc  # pylint: disable=import-outside-toplevel
  jaxgc.parallel.set_cpu_device_count(args.devices)
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  m = args.workers
  # The library's CNN with batch norm and dropout (jaxgc.models.CNNBN) on 8×8 inputs: the
  # model train.py runs as --config.model.name=cnn_bn, with its stateful chunk loss.
  model = jaxgc.models.CNNBN(channels=(8,), hidden=32, num_outputs=2, dropout=0.2)
  loss_fn = jaxgc.models.stateful_chunk_loss_fn(model.apply, m * args.per_chunk)
  x = jax.random.normal(jax.random.key(0), (m, args.per_chunk, 64))
  chunks = (x, (x[:, :, 0] > 0).astype(np.int32))
  params, stats = jaxgc.models.init_variables(model, jax.random.key(1), x[0])

  protocol = jaxgc.PartialStraggler(jaxgc.assignments.cyclic(m, args.load), args.ell)
  straggler = jaxgc.timing.Slowdown(jaxgc.timing.ShiftedExponential(1.0, 1.0), 0.25, 5.0)
  mesh = jaxgc.parallel.make_mesh(args.devices)
  coded = jax.jit(jaxgc.coded_value_and_grad(loss_fn, protocol, straggler, mesh, has_aux=True))

  @jax.jit
  def direct(params, chunks, key, stats):
    def total(p):
      one = lambda c, k: loss_fn(p, c, stats, rng=k)
      losses, aux = jax.vmap(one)(chunks, jaxgc.chunk_keys(key, m))
      return losses.sum(), aux
    return jax.value_and_grad(total, has_aux=True)(params)

  def median_time(fn):
    jax.block_until_ready(fn(params, chunks, jax.random.key(0), stats))   # compile
    times = []
    for i in range(args.iters):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(params, chunks, jax.random.key(i), stats))
      times.append(time.perf_counter() - t0)
    return float(np.median(times))

  t_coded, t_direct = median_time(coded), median_time(direct)
  print(f"{m} workers, load {args.load}, ell {args.ell}, {args.per_chunk} examples/chunk, "
        f"{args.devices} {jax.default_backend()} devices, {args.iters} runs")
  print(f"jax.value_and_grad (summed, 1 device): median {1e3 * t_direct:.2f} ms")
  print(f"coded_value_and_grad (mesh):           median {1e3 * t_coded:.2f} ms")
  print(f"ratio coded / value_and_grad: {t_coded / t_direct:.2f}")


if __name__ == "__main__":
  main()

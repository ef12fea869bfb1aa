"""The coefficient solve at pod sizes: time and memory of each protocol's per-state work.

PartialStraggler (cyclic, load 32, ℓ = 4, 8 candidate matrices): ``coefficients``
and ``condition_number`` for ``m`` in (256, 1024, 4096), jitted: compile time,
median run time, XLA's temp memory and the process's peak RSS (each ``m`` in a
fresh subprocess, so the RSS is its own). Then ``Original`` (Tandon ``ℓ = 1`` and
the polynomial code ``ℓ = 2``, cyclic load 16): build time and one
``coefficients`` call for growing ``m``, until one takes longer than
``--max_seconds``; the last ``m`` that fit is the largest usable one.

  python benchmarks/solve_scale.py                 # everything (~10 min on 2 cores)
  python benchmarks/solve_scale.py --skip_original
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _ps(m: int, load: int, ell: int, repeats: int = 5) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from jaxgc import assignments  # pylint: disable=import-outside-toplevel
  from jaxgc.protocols import PartialStraggler  # pylint: disable=import-outside-toplevel
  t = time.perf_counter()
  proto = PartialStraggler(assignments.cyclic(m, load), ell)
  out = {"m": m, "load": load, "ell": ell, "build_s": time.perf_counter() - t}
  counts = np.random.default_rng(0).integers(0, load + 1, size=m)
  for name, fn in (("coefficients", proto.coefficients),
                   ("condition_number", proto.condition_number)):
    t = time.perf_counter()
    compiled = jax.jit(fn).lower(counts).compile()
    out[f"{name}_compile_s"] = time.perf_counter() - t
    out[f"{name}_temp_MB"] = compiled.memory_analysis().temp_size_in_bytes / 1e6
    runs = []
    for _ in range(repeats):
      t = time.perf_counter()
      jax.block_until_ready(compiled(counts))
      runs.append(time.perf_counter() - t)
    out[f"{name}_run_s"] = float(np.median(runs))
  t = time.perf_counter()
  jax.block_until_ready(proto.coefficients(counts))         # as a user calls it: not jitted
  out["coefficients_eager_s"] = time.perf_counter() - t
  out["peak_rss_MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
  return out


def _original(m: int, load: int, ell: int, construction: str) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from jaxgc import assignments  # pylint: disable=import-outside-toplevel
  from jaxgc.protocols import Original  # pylint: disable=import-outside-toplevel
  t = time.perf_counter()
  proto = Original(assignments.cyclic(m, load), ell, construction=construction)
  out = {"m": m, "construction": construction, "ell": ell, "build_s": time.perf_counter() - t}
  counts = np.full(m, load)
  counts[np.random.default_rng(0).choice(m, proto.straggler_tolerance, replace=False)] = 0
  t = time.perf_counter()
  jax.block_until_ready(jax.jit(proto.coefficients)(counts))
  out["use_s"] = time.perf_counter() - t
  out["peak_rss_MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
  return out


def _child(kind: str, args: list[str], timeout: float, blas_threads: int):
  """Runs one measurement in a fresh process; ``None`` if it ran out of time or failed."""
  cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, *args]
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  if blas_threads:
    env.update({k: str(blas_threads) for k in
                ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")})
  try:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
  except subprocess.TimeoutExpired:
    return None
  if res.returncode:
    print(f"  failed: {res.stderr.strip().splitlines()[-1:]}")
    return None
  return json.loads(res.stdout.strip().splitlines()[-1])


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes", default="256,1024,4096")
  ap.add_argument("--load", type=int, default=32)
  ap.add_argument("--ell", type=int, default=4)
  ap.add_argument("--original_sizes", default="64,128,256,512,1024,2048,4096")
  ap.add_argument("--original_load", type=int, default=16)
  ap.add_argument("--max_seconds", type=float, default=60.0,
                  help="Original: a size whose build + use takes longer is not usable")
  ap.add_argument("--skip_original", action="store_true")
  ap.add_argument("--skip_ps", action="store_true")
  ap.add_argument("--constructions", default="tandon,polynomial")
  ap.add_argument("--blas_threads", type=int, default=1,
                  help="NumPy's BLAS threads in the measurements (0: its default). On a "
                       "busy 2-core host OpenBLAS's threads fight: a batched SVD took 20 s "
                       "with 2 threads and 0.3 s with 1")
  ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    kind, *rest = args.child
    if kind == "ps":
      print(json.dumps(_ps(*map(int, rest))))
    else:
      print(json.dumps(_original(int(rest[0]), int(rest[1]), int(rest[2]), rest[3])))
    return

  if not args.skip_ps:
    print(f"PartialStraggler: cyclic(m, {args.load}), ell={args.ell}, 8 candidates; "
          "jitted, run = median of 5")
  for m in map(int, args.sizes.split(",")) if not args.skip_ps else ():
    r = _child("ps", [str(m), str(args.load), str(args.ell)], 600, args.blas_threads)
    if r is None:
      print(f"  m={m}: did not finish in 600 s")
      continue
    print(f"  m={m:5d}: coefficients compile {r['coefficients_compile_s']:.2f} s, run "
          f"{r['coefficients_run_s']:.3f} s (eager {r['coefficients_eager_s']:.2f} s), temp "
          f"{r['coefficients_temp_MB']:.1f} MB | condition_number compile "
          f"{r['condition_number_compile_s']:.2f} s, run {r['condition_number_run_s']:.3f} s, temp "
          f"{r['condition_number_temp_MB']:.1f} MB | peak RSS {r['peak_rss_MB']:.0f} MB",
          flush=True)
  if args.skip_original:
    return
  for construction in args.constructions.split(","):
    ell = 1 if construction == "tandon" else 2
    print(f"Original {construction} (ell={ell}): cyclic(m, {args.original_load}); "
          f"build, then one jitted coefficients call (compile included)")
    largest = None
    for m in map(int, args.original_sizes.split(",")):
      r = _child("original", [str(m), str(args.original_load), str(ell), construction],
                 args.max_seconds, args.blas_threads)
      if r is None:
        print(f"  m={m:5d}: over {args.max_seconds:.0f} s", flush=True)
        break
      print(f"  m={m:5d}: build {r['build_s']:.1f} s, use {r['use_s']:.1f} s, "
            f"peak RSS {r['peak_rss_MB']:.0f} MB", flush=True)
      largest = m
    print(f"  largest m built and used within {args.max_seconds:.0f} s: {largest}")


if __name__ == "__main__":
  main()

"""Numerical stability: relative decode error of PartialStraggler vs the polynomial code.

For each ``m`` and ``ℓ`` (cyclic assignment, load ``ℓ + 2``, so ``s = 2``), draws
random decodable states — the state at each protocol's own exact-recovery time
under shifted-exponential durations — and random Gaussian chunk gradients, and
reports ``‖ĝ − g‖ / ‖g‖`` in float32 and float64. The polynomial code is Ye & Abbe's
construction (Chebyshev points, monomial basis), decoded by Vandermonde solve.

    python benchmarks/stability.py             # 1000 states per cell
    python benchmarks/stability.py --quick     # 100 states, m <= 64
"""
from __future__ import annotations

import argparse
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxgc  # noqa: E402
from jaxgc import assignments, timing  # noqa: E402

D = 64


def errors(proto, states, grads, batch=100):
  """Relative decode errors ``[trials]`` for chunk gradients ``grads [trials, N, D]``."""
  order = jnp.asarray(np.maximum(proto.assignment.order, 0))

  def one(counts, g):
    est = jaxgc.estimate(proto, g[order], counts)
    true = jnp.sum(g.astype(jnp.float64), axis=0)
    return jnp.linalg.norm(est.astype(jnp.float64) - true) / jnp.linalg.norm(true)

  f = jax.jit(jax.vmap(one))
  return np.concatenate([np.asarray(f(states[i:i + batch], grads[i:i + batch]))
                         for i in range(0, len(states), batch)])


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--trials", type=int, default=1000)
  p.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128])
  p.add_argument("--ells", type=int, nargs="+", default=[1, 2, 4])
  p.add_argument("--quick", action="store_true")
  args = p.parse_args()
  trials, sizes = args.trials, args.sizes
  if args.quick:
    trials, sizes = 100, [s for s in sizes if s <= 64]
  print(f"relative decode error over {trials} random decodable states per cell "
        f"(d={D}; median / worst)\n")
  print(f"{'m':>4}{'ell':>4}{'load':>5} | {'partial f32':>18} | {'partial f64':>18} | "
        f"{'poly f32':>18} | {'poly f64':>18} | {'worst cond(A_S)':>15}")
  worst32 = 0.0
  for m in sizes:
    for ell in args.ells:
      load = ell + 2
      asg = assignments.cyclic(m, load)
      t0 = time.perf_counter()
      key = jax.random.PRNGKey(m * 10 + ell)
      tau = timing.ShiftedExponential().sample(key, asg, (trials,))
      grads = np.asarray(jax.random.normal(jax.random.fold_in(key, 1), (trials, m, D), jnp.float64))
      cells, conds = [], None
      for cls, kw in ((jaxgc.PartialStraggler, {}),
                      (jaxgc.Original, {"construction": "polynomial"})):
        for dt in (jnp.float32, jnp.float64):
          proto = cls(asg, ell, dtype=dt, **kw)
          states = timing.progress(tau, jaxgc.stop_time(proto, tau))
          err = errors(proto, states, grads.astype(dt))
          cells.append(err)
          if cls is jaxgc.PartialStraggler and dt == jnp.float32:
            worst32 = max(worst32, float(err.max()))
            conds = np.asarray(jax.jit(jax.vmap(proto.condition_number))(states[:200]))
      fmt = lambda e: (f"{np.median(e):8.1e} / {e.max():7.1e}" if np.isfinite(e).all() else
                       f"{np.nanmedian(np.where(np.isfinite(e), e, np.nan)):8.1e} / "
                       f"nf {np.mean(~np.isfinite(e)):4.1%}")
      print(f"{m:>4}{ell:>4}{load:>5} | " + " | ".join(fmt(e) for e in cells) +
            f" | {conds.max():>15.1f}   ({time.perf_counter() - t0:.0f}s)", flush=True)
  print("nf X%: the decode gave NaN/Inf in X% of the states (the Vandermonde solve overflowed);\n"
        "the median is over the finite ones.")
  print(f"\nPartialStraggler worst float32 relative error over all cells: {worst32:.1e} "
        f"(target <= 1e-4: {'met' if worst32 <= 1e-4 else 'NOT met'})")


if __name__ == "__main__":
  main()

"""Exact-recovery completion time: PartialStraggler vs Original vs wait-for-all vs oracle.

All protocols are evaluated on the *same* duration draws; ratios are per-draw
means/medians. Also times the vectorised simulator against a Python event loop.

    python benchmarks/completion_time.py            # full table (~1 min on 2 cores)
    python benchmarks/completion_time.py --quick    # fewer trials
"""
from __future__ import annotations

import argparse
import heapq
import time

import jax
import numpy as np

import jaxgc
from jaxgc import assignments, timing

MODELS = {
    "shifted_exp": timing.ShiftedExponential(1.0, 1.0),
    "slowdown": timing.Slowdown(timing.ShiftedExponential(1.0, 1.0), fraction=0.2, factor=5.0),
    "pareto": timing.Pareto(1.0, 2.0),
}


def table(trials: int, seed: int):
  cases = [(m, load, ell) for m in (20,) for load in (4, 6) for ell in (1, 2, 3)]
  cases += [(120, 10, 2), (120, 10, 4)]
  # "partial": PartialStraggler (not the parameter server).
  print(f"{'model':<12}{'m':>5}{'load':>5}{'ell':>4} | {'partial':>8} | "
        f"{'Orig/partial':>12}{'median':>8} | {'part/oracle':>11}{'Orig/oracle':>12} | "
        f"{'waitall(δ=1)/partial':>20}")
  rows = []
  for name, model in MODELS.items():
    for m, load, ell in cases:
      asg = assignments.cyclic(m, load)
      partial, orig, unc = (jaxgc.PartialStraggler(asg, ell), jaxgc.Original(asg, ell),
                            jaxgc.Uncoded(asg))

      @jax.jit
      def run(key, asg=asg, partial=partial, orig=orig, unc=unc, ell=ell, model=model):
        tau = model.sample(key, asg, (trials,))
        return (partial.completion_time(tau), orig.completion_time(tau),
                unc.completion_time(tau), timing.oracle_time(tau, asg, ell))

      t_part, t_or, t_un, t_oc = map(np.asarray, run(jax.random.PRNGKey(seed)))
      r_or, r_oc, r_ocb, r_un = t_or / t_part, t_part / t_oc, t_or / t_oc, t_un / t_part
      print(f"{name:<12}{m:>5}{load:>5}{ell:>4} | {t_part.mean():>8.2f} | "
            f"{r_or.mean():>12.2f}{np.median(r_or):>8.2f} | "
            f"{r_oc.mean():>11.2f}{r_ocb.mean():>12.2f} | "
            f"{r_un.mean():>20.2f}")
      rows.append((name, m, load, ell, r_or.mean(), np.median(r_or)))
  return rows


def event_loop(tau: np.ndarray, order: np.ndarray, num_chunks: int, ell: int) -> float:
  """A straightforward Python event loop with incremental coverage counts."""
  m, width = tau.shape
  cov = np.zeros(num_chunks, np.int64)
  missing = num_chunks
  heap = [(tau[j, 0], j, 0) for j in range(m) if order[j, 0] >= 0]
  heapq.heapify(heap)
  while heap:
    t, j, s = heapq.heappop(heap)
    i = order[j, s]
    cov[i] += 1
    if cov[i] == ell:
      missing -= 1
      if missing == 0:
        return t
    if s + 1 < width and order[j, s + 1] >= 0:
      heapq.heappush(heap, (t + tau[j, s + 1], j, s + 1))
  return float("inf")


def speed(trials: int, loop_trials: int, seed: int):
  m, load, ell = 256, 16, 2
  asg = assignments.cyclic(m, load)
  partial = jaxgc.PartialStraggler(asg, ell)
  model = timing.ShiftedExponential()
  tau = model.sample(jax.random.PRNGKey(seed), asg, (trials,))
  fn = jax.jit(partial.completion_time)
  fn(tau).block_until_ready()                       # compile outside the timing
  times = []
  for _ in range(5):
    t0 = time.perf_counter()
    out = fn(tau).block_until_ready()
    times.append(time.perf_counter() - t0)
  vec = float(np.median(times))
  tau_np = np.asarray(tau, np.float64)
  t0 = time.perf_counter()
  ref = np.array([event_loop(tau_np[b], asg.order, m, ell) for b in range(loop_trials)])
  loop_per_trial = (time.perf_counter() - t0) / loop_trials
  np.testing.assert_allclose(np.asarray(out)[:loop_trials], ref, rtol=1e-4)
  print(f"\nsimulator speed, m={m}, load={load}, ell={ell}, {trials} trials:")
  print(f"  vectorised completion_time: {vec:.3f} s (median of 5, jitted)")
  print(f"  Python event loop: {loop_per_trial * 1e3:.1f} ms/trial -> "
        f"{loop_per_trial * trials:.1f} s for {trials} trials (extrapolated from {loop_trials})")
  print(f"  speed-up: {loop_per_trial * trials / vec:.0f}x "
        f"(results agree on the {loop_trials} checked)")


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--trials", type=int, default=4000)
  p.add_argument("--quick", action="store_true", help="500 trials, smaller speed test")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  trials = 500 if args.quick else args.trials
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {trials} trials per case\n")
  table(trials, args.seed)
  speed(2000 if args.quick else 10_000, 20 if args.quick else 100, args.seed)


if __name__ == "__main__":
  main()

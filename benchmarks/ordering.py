"""Chunk ordering: optimised order vs random orders, on the same duration draws.

For each assignment and ``ℓ``, ``jaxgc.ordering.optimize`` picks an order, and
``--orders`` random orders (``ordering.shuffled``) serve as the baseline. All
orders of one assignment see the *same* shifted-exponential durations (1 + Exp(1)
per chunk slot), so differences come from the order alone. Reported:

- ``Q_max`` (worst-case chunk computations to exact recovery): random mean / optimised;
- exact-mode completion time of ``PartialStraggler``: mean over trials, random / optimised;
- deadline-mode MSE ``σ²⌈d/ℓ⌉ Σ_i max(0, ℓ − c_i)`` (PROTOCOL.md §2) at deadlines
  ``T = f · mean(t*_opt)``: mean over trials, random / optimised (> 1: optimised better);
- for reference, the edge-colouring order (optimal for ``ℓ = 1``; for ``ℓ > 1`` the
  ``Q``-optimal order can differ): its ``Q`` and mean completion time / optimised.

Then the optimiser's own cost: the colouring on large random regular graphs
(``ℓ = 1``, optimal by construction) and the MILP / local search for ``ℓ > 1``.

    python benchmarks/ordering.py            # 2000 trials, 20 random orders (~1-2 min on 2 cores)
    python benchmarks/ordering.py --quick    # 300 trials, 10 random orders
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from jaxgc import assignments, ordering, protocols, timing

DEADLINE_FRACTIONS = (0.5, 0.75, 0.9)


def compare(asg, ell, *, trials, orders, seed, time_limit):
  """One row: optimised vs ``orders`` random orders of ``asg`` on the same draws."""
  t0 = time.perf_counter()
  opt, info = ordering.optimize_with_info(asg, ell, time_limit=time_limit, seed=seed)
  opt_s = time.perf_counter() - t0
  rand = [ordering.shuffled(asg, seed=1000 + r) for r in range(orders)]

  tau = timing.ShiftedExponential(1.0, 1.0).sample(jax.random.PRNGKey(seed), asg, (trials,))
  t_opt = np.asarray(protocols.PartialStraggler(opt, ell).completion_time(tau))
  t_rand = np.stack([np.asarray(protocols.PartialStraggler(r, ell).completion_time(tau))
                     for r in rand])  # [orders, trials]
  deadlines = [f * float(t_opt.mean()) for f in DEADLINE_FRACTIONS]
  # The state k(T) depends on the slot durations only, so it is shared by all orders.
  counts = [timing.progress(tau, t) for t in deadlines]

  def mse(a):
    proto = protocols.PartialStraggler(a, ell)
    return np.array([float(np.mean(protocols.expected_mse(proto.coverage(k), ell, d=1)))
                     for k in counts])

  col = ordering.coloring(asg)
  t_col = np.asarray(protocols.PartialStraggler(col, ell).completion_time(tau))
  mse_opt = mse(opt)
  mse_col = mse(col)
  mse_rand = np.mean([mse(r) for r in rand], axis=0)
  q_rand = np.array([ordering.q_max(r, ell) for r in rand])
  return dict(info=info, opt_s=opt_s, q_opt=info.q, q_rand=q_rand, t_opt=t_opt, t_rand=t_rand,
              mse_opt=mse_opt, mse_rand=mse_rand, q_col=ordering.q_max(col, ell), t_col=t_col,
              mse_col=mse_col)


def _ratio(a, b):
  if b == 0:
    return "inf" if a > 0 else "—"
  return f"{a / b:.2f}"


def quality_table(args):
  cases = [("random_regular", 20, 4), ("random_regular", 20, 6),
           ("cyclic", 20, 4), ("cyclic", 20, 6)]
  mse_hdr = "".join(f"{f'MSE@{f:g}T':>10}" for f in DEADLINE_FRACTIONS)
  print(f"optimised vs mean of {args.orders} random orders; {args.trials} draws of 1 + Exp(1); "
        "ratios are random / optimised\n")
  print(f"{'assignment':<16}{'m':>3}{'δ':>3}{'ℓ':>3} | {'method':<12}{'Q_opt':>6}{'LB':>5}"
        f"{'cert':>5} | {'Q_rand':>7}{'ratio':>6} | {'t*_opt':>7}{'t*_rand':>8}{'ratio':>6}"
        f"{'med':>6} |{mse_hdr} | {'Q_col':>5}{'t*col/opt':>10}")
  rows = []
  for kind, m, load in cases:
    asg = (assignments.random_regular(m, load, seed=args.seed) if kind == "random_regular"
           else assignments.cyclic(m, load))
    for ell in (1, 2, 3):
      r = compare(asg, ell, trials=args.trials, orders=args.orders, seed=args.seed,
                  time_limit=args.time_limit)
      info = r["info"]
      t_ratio = r["t_rand"].mean() / r["t_opt"].mean()
      t_med = np.median(r["t_rand"] / r["t_opt"][None])  # per draw and order
      mse_cols = "".join(f"{_ratio(a, b):>10}" for a, b in zip(r["mse_rand"], r["mse_opt"],
                                                                strict=True))
      print(f"{kind:<16}{m:>3}{load:>3}{ell:>3} | {info.method:<12}{info.q:>6}"
            f"{info.lower_bound:>5}{'yes' if info.optimal else 'no':>5} | "
            f"{r['q_rand'].mean():>7.1f}{r['q_rand'].mean() / info.q:>6.2f} | "
            f"{r['t_opt'].mean():>7.2f}{r['t_rand'].mean():>8.2f}{t_ratio:>6.3f}{t_med:>6.3f} |"
            f"{mse_cols} | {r['q_col']:>5}{r['t_col'].mean() / r['t_opt'].mean():>10.3f}",
            flush=True)
      rows.append((kind, m, load, ell, r))
  print("\nmean MSE (σ² = 1, d = 1) at T = f · mean t*_opt, f = "
        f"{', '.join(map(str, DEADLINE_FRACTIONS))}:")
  for kind, m, load, ell, r in rows:
    vals = ", ".join(f"{v:.3f}" for v in r["mse_opt"])
    print(f"  {kind:<16} m={m} δ={load} ℓ={ell}: optimised [{vals}]  "
          f"colouring [{', '.join(f'{v:.3f}' for v in r['mse_col'])}]  "
          f"random [{', '.join(f'{v:.3f}' for v in r['mse_rand'])}]")
  return rows


def cost_table(args):
  print("\noptimiser cost (wall time, this machine)")
  print(f"{'assignment':<22}{'ℓ':>3} | {'method':<13}{'Q':>6}{'LB':>6}{'gap':>4}{'colour Q':>9}"
        f"{'shuffled Q':>11}{'seconds':>9}")
  sizes = ([(50, 8), (100, 10), (200, 16)] if args.quick
           else [(50, 8), (100, 10), (200, 8), (200, 16)])
  cases = [(m, d, 1) for m, d in sizes]
  cases += [(20, 6, 2), (20, 6, 3), (30, 8, 2), (12, 5, 3)]
  if not args.quick:
    cases += [(100, 10, 2)]
  for m, d, ell in cases:
    asg = ordering.shuffled(assignments.random_regular(m, d, seed=args.seed), args.seed)
    t0 = time.perf_counter()
    res, info = ordering.optimize_with_info(asg, ell, time_limit=args.time_limit, seed=args.seed)
    dt = time.perf_counter() - t0
    q_col = ordering.q_max(ordering.coloring(asg), ell)
    print(f"{f'random_regular({m},{d})':<22}{ell:>3} | {info.method:<13}{info.q:>6}"
          f"{info.lower_bound:>6}{info.gap:>4}{q_col:>9}{ordering.q_max(asg, ell):>11}{dt:>9.3f}",
          flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--trials", type=int, default=2000)
  p.add_argument("--orders", type=int, default=20, help="random orders per assignment")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--time-limit", type=float, default=10.0, help="per optimize call, seconds")
  p.add_argument("--quick", action="store_true")
  args = p.parse_args()
  if args.quick:
    args.trials, args.orders, args.time_limit = 300, 10, min(args.time_limit, 5.0)
  quality_table(args)
  cost_table(args)


if __name__ == "__main__":
  main()

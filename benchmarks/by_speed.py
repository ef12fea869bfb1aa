"""Loads matched to speeds (PROTOCOL.md §17): by_speed against cyclic and the oracle bound.

m = N = 20 workers, 4 of them (0-3, adjacent) 5x slower at every step
(timing.FixedSlowdown), total work N·load with load 6. Each trial draws every
worker's durations for N slots once; cyclic uses the first 6 slots of each worker,
by_speed (jaxgc.assignments.by_speed with the true speeds 1/5 and 1) the first
δ_j, and the oracle bound (§4: the first time the fleet has done N·ℓ chunk
computations, any worker any chunk) all of them. Exact completion times of the
partial-straggler protocol; medians over trials, and the median of the per-trial
ratio to the oracle.

    python benchmarks/by_speed.py                  # 4000 trials (~10 s)
    python benchmarks/by_speed.py --quick --json by_speed.json
"""
from __future__ import annotations

import argparse
import json

import jax
import numpy as np

import jaxgc
from jaxgc import assignments, timing

M, LOAD, ELLS, SLOW, FACTOR = 20, 6, (1, 2, 3), (0, 1, 2, 3), 5.0


def run(trials: int, seed: int) -> list[dict]:
  model = timing.FixedSlowdown(timing.ShiftedExponential(1.0, 1.0), SLOW, FACTOR)
  speeds = np.ones(M)
  speeds[list(SLOW)] = 1.0 / FACTOR
  carrier = assignments.cyclic(M, M)
  tau = np.asarray(model.sample(jax.random.PRNGKey(seed), carrier, (trials,)))
  asgs = {"cyclic": assignments.cyclic(M, LOAD), "by_speed": assignments.by_speed(speeds, LOAD)}
  print(f"by_speed loads {asgs['by_speed'].loads.tolist()}, replication "
        f"{sorted(set(asgs['by_speed'].replication.tolist()))}")
  rows = []
  for ell in ELLS:
    oracle = np.asarray(timing.oracle_time(tau, carrier, ell))
    times = {}
    for name, a in asgs.items():
      d = np.where(a.slot_mask, tau[..., : a.max_load], np.inf)
      times[name] = np.asarray(jax.jit(jaxgc.PartialStraggler(a, ell).completion_time)(d))
    med = {k: float(np.median(v)) for k, v in times.items()}
    rows.append({
        "ell": ell, "oracle": float(np.median(oracle)), "cyclic": med["cyclic"],
        "by_speed": med["by_speed"], "by_speed/cyclic": med["by_speed"] / med["cyclic"],
        "cyclic/oracle": float(np.median(times["cyclic"] / oracle)),
        "by_speed/oracle": float(np.median(times["by_speed"] / oracle))})
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--trials", type=int, default=4000)
  p.add_argument("--quick", action="store_true", help="1000 trials")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", metavar="PATH", help='write {"rows": [{"ell", ...}]}')
  args = p.parse_args()
  trials = 1000 if args.quick else args.trials
  print(f"m=N={M}, load {LOAD}, workers {SLOW} {FACTOR:g}x slower, {trials} trials; "
        "exact completion time, medians")
  rows = run(trials, args.seed)
  cols = ["oracle", "cyclic", "by_speed", "by_speed/cyclic", "cyclic/oracle", "by_speed/oracle"]
  print(f"{'ℓ':>2} | " + " ".join(f"{c:>15}" for c in cols))
  for r in rows:
    print(f"{r['ell']:>2} | " + " ".join(f"{r[c]:>15.2f}" for c in cols))
  worst = max(r["by_speed/cyclic"] for r in rows if r["ell"] <= 2)
  print(f"\nby_speed / cyclic at ℓ = 1, 2: at most {worst:.2f} (target <= 0.85)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"trials": trials, "seed": args.seed, "rows": rows}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()

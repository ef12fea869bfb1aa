"""Completion time under stragglers as real clusters have them (PROTOCOL.md §10).

m = 20 workers, cyclic load 6, ℓ ∈ {1, 2, 3}; each case is one run of T
consecutive steps (the straggler chain advances with the step). Every column is
the median over steps of a per-step ratio, all on the same durations:

  static/oracle   PartialStraggler with the fixed placement / the oracle bound
  adapt/oracle    the adaptive PS / oracle: jaxgc.adaptive.AdaptivePS with the straggler
                  detector (jaxgc.detector.Detector) and unequal loads (reassign=True:
                  jaxgc.assignments.by_speed of the estimated speeds when it pays)
  place/oracle    the adaptive PS that only re-places the equal-load lists (no detector,
                  no unequal loads) / oracle
  unequal         share of the steps the adaptive PS ran unequal loads
  assign/oracle   simulator only: re-choosing the whole assignment each step
                  (unequal loads, jaxgc.adaptive.simulate_assignment) / its oracle
  Orig/adapt      Original (Tandon / polynomial code) / adaptive PS
  backup b        backup workers (one chunk per worker, stop at the (m-b)-th finish)
                  time / adaptive PS time; it drops b/m of the batch every step

All runs draw WIDTH = 2·load slots per worker (adaptive.simulate(width=...)), so every
series sees the same durations.

    python benchmarks/real_stragglers.py            # 2000 steps per case (~25 min on 2 busy cores)
    python benchmarks/real_stragglers.py --quick    # 300 steps (~10 min: compile-bound)
    python benchmarks/real_stragglers.py --quick --models fixed_adjacent   # ~2 min
    python benchmarks/real_stragglers.py --json rows.json
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

import jaxgc
from jaxgc import adaptive, assignments, protocols, timing
from jaxgc.detector import Detector

M, LOAD, ELLS, BACKUPS = 20, 6, (1, 2, 3), (2, 4)
WIDTH = 2 * LOAD
BASE = timing.ShiftedExponential(1.0, 1.0)


def models():
  return {
      "gilbert_elliott": timing.GilbertElliott(BASE, p_slow=0.02, p_recover=0.1, factor=5.0),
      "fixed_adjacent": timing.FixedSlowdown(BASE, (0, 1, 2, 3), 5.0),
      "alibaba_job4": timing.TraceReplay("alibaba_pai_job4"),
      "iid_shifted_exp": BASE,
      "iid_slowdown": timing.Slowdown(BASE, fraction=0.2, factor=5.0),
  }


def run_case(model, ell: int, steps: int, seed: int, assign: bool = True) -> dict:
  """Per-step arrays for one (model, ℓ): times of every series on the same durations."""
  asg = assignments.cyclic(M, LOAD)
  ps = jaxgc.PartialStraggler(asg, ell)
  others = {"original": jaxgc.Original(asg, ell),
            **{f"backup{b}": protocols.BackupWorkers(asg, num_backup=b) for b in BACKUPS}}

  ada_ps = adaptive.AdaptivePS(ps, detector=Detector(), reassign=True, width=WIDTH)

  @jax.jit
  def go(key):
    static = adaptive.simulate(ps, model, key, steps, others=others, width=WIDTH)
    place = adaptive.simulate(ps, model, key, steps, adaptive.AdaptivePS(ps), width=WIDTH)
    ada = adaptive.simulate(ps, model, key, steps, ada_ps, width=WIDTH)
    return static, place, ada

  static, place, ada = jax.tree.map(np.asarray, go(jax.random.PRNGKey(seed)))
  out = {"static": static["time"], "adaptive": ada["time"], "place": place["time"],
         "oracle": static["oracle"], "unequal": ada["unequal"],
         "slow": ada["slow_workers"].sum(-1), **{k: static[k] for k in others}}
  if assign:
    r = adaptive.simulate_assignment(model, jax.random.PRNGKey(seed), steps, num_workers=M,
                                     load=LOAD, ell=ell)
    out["assign"], out["assign_oracle"] = r["time"], r["oracle"]
  return out


def ratios(r: dict) -> dict:
  med = lambda x: float(np.median(x))
  row = {"static/oracle": med(r["static"] / r["oracle"]),
         "adapt/oracle": med(r["adaptive"] / r["oracle"]),
         "place/oracle": med(r["place"] / r["oracle"]),
         "unequal": float(np.mean(r["unequal"])),
         "assign/oracle": med(r["assign"] / r["assign_oracle"]) if "assign" in r else np.nan,
         "Orig/adapt": med(r["original"] / r["adaptive"])}
  for b in BACKUPS:
    row[f"backup{b}/adapt"] = med(r[f"backup{b}"] / r["adaptive"])
  return row


def table(steps: int, seed: int, assign: bool = True, only=None):
  cols = ["static/oracle", "adapt/oracle", "place/oracle", "unequal", "assign/oracle",
          "Orig/adapt",
          *[f"backup{b}/adapt" for b in BACKUPS]]
  print(f"m={M}, cyclic load {LOAD}, {steps} steps per case, medians of per-step ratios; "
        f"backup b drops b/m = {', '.join(f'{b / M:.0%}' for b in BACKUPS)} of each batch\n")
  print(f"{'straggler model':<17}{'ℓ':>2} | " + " ".join(f"{c:>13}" for c in cols))
  rows = []
  for name, model in models().items():
    if only and name not in only:
      continue
    for ell in ELLS:
      t0 = time.perf_counter()
      row = ratios(run_case(model, ell, steps, seed, assign))
      rows.append((name, ell, row))
      print(f"{name:<17}{ell:>2} | " + " ".join(f"{row[c]:>13.2f}" for c in cols) +
            f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=2000)
  p.add_argument("--quick", action="store_true", help="300 steps per case")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no-assign", action="store_true", help="skip the assignment re-choice column")
  p.add_argument("--json", metavar="PATH", help='write {"rows": [{"model", "ell", ...}]}')
  p.add_argument("--models", help=f"comma-separated subset of {', '.join(models())}")
  args = p.parse_args()
  only = args.models.split(",") if args.models else None
  if only and set(only) - set(models()):
    p.error(f"--models: unknown {sorted(set(only) - set(models()))}; choose from "
            f"{', '.join(models())}")
  steps = 300 if args.quick else args.steps
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
  rows = table(steps, args.seed, not args.no_assign, only)
  persistent = [r for n, _, r in rows if not n.startswith("iid")]
  iid = [(r["adapt/oracle"], r["static/oracle"]) for n, _, r in rows if n.startswith("iid")]
  if persistent:
    print(f"\nadaptive PS / oracle under persistent stragglers: "
          f"{min(r['adapt/oracle'] for r in persistent):.2f}-"
          f"{max(r['adapt/oracle'] for r in persistent):.2f} (target <= 1.5); static PS: "
          f"{min(r['static/oracle'] for r in persistent):.2f}-"
          f"{max(r['static/oracle'] for r in persistent):.2f}")
  if iid:
    print(f"i.i.d. models, adaptive/static: "
          f"{', '.join(f'{a / s:.3f}' for a, s in iid)} (target <= 1, up to sampling noise)")
  if args.json:
    out = [{"model": n, "ell": ell, **{k: (None if np.isnan(v) else round(float(v), 4))
                                         for k, v in r.items()}} for n, ell, r in rows]
    with open(args.json, "w") as f:
      json.dump({"steps": steps, "seed": args.seed, "rows": out}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()

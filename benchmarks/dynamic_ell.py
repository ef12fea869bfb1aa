"""ℓ chosen per step (PROTOCOL.md §14) against the best static ℓ of the set, over a grid.

m = 20 workers, cyclic load 3, the set L = (1, 2), a PS-ingress network
(``comm = S · ⌈d/ℓ⌉ · 4 / B``, float32). For each straggler model, gradient size d
(parameters) and bandwidth B, T consecutive steps of durations (seconds per chunk:
shifted exponential base, 1 s + Exp(1)); every series sees the same durations:

  static ℓ      mean over steps of T_ℓ + comm_ℓ(S(T_ℓ))
  dynamic       mean of the causal rule's stop + comm of its ℓ (jaxgc.protocols.choose_ell)
  oracle        mean of the clairvoyant min_ℓ (T_ℓ + comm_ℓ): a bound, never a rule
  gain          1 − dynamic / best static (positive: dynamic is faster)
  bound         1 − oracle / best static (the most any rule could gain)

    python benchmarks/dynamic_ell.py                    # 2000 steps, 6 models, 4×4 grid
    python benchmarks/dynamic_ell.py --quick --json out.json   # 400 steps, 3 models, 3×3
    python benchmarks/dynamic_ell.py --quick --png docs/dynamic_ell_gain.png \\
        --markdown docs/guides/dynamic_ell_table.md

The JSON holds ``flags`` (train.py flags of the setting with the largest gain), ``gain``
(its fraction), ``worst`` (the most negative gain over the grid) and ``rows``.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxgc import assignments, protocols, timing
from jaxgc.protocols import dynamic_ell as dyn

M, LOAD, ELLS = 20, 3, (1, 2)
BASE = timing.ShiftedExponential(1.0, 1.0)
BYTES = 4                    # float32 messages


def models(quick: bool) -> dict:
  """Name -> (model, train.py straggler flags)."""
  out = {
      "slowdown_0.1x10": (timing.Slowdown(BASE, fraction=0.1, factor=10.0),
                          ["--config.straggler.name=slowdown", "--config.straggler.fraction=0.1",
                           "--config.straggler.factor=10"]),
      "gilbert_elliott": (timing.GilbertElliott(BASE, p_slow=0.02, p_recover=0.1, factor=5.0),
                          ["--config.straggler.name=gilbert_elliott"]),
      "alibaba_job4": (timing.TraceReplay("alibaba_pai_job4"),
                       ["--config.straggler.name=trace"]),
  }
  if not quick:
    out["slowdown"] = (timing.Slowdown(BASE, fraction=0.2, factor=5.0),
                       ["--config.straggler.name=slowdown"])
    out["shifted_exponential"] = (BASE, ["--config.straggler.name=shifted_exponential"])
    out["pareto"] = (timing.Pareto(1.0, 1.5), ["--config.straggler.name=pareto",
                                               "--config.straggler.alpha=1.5"])
  return out


def evaluate(proto, model, steps: int, sizes, bandwidths, seed: int = 0) -> list[dict]:
  """One row per (d, B): mean step times of each static ℓ, the rule and the bound."""
  asg = proto.assignment
  tau = timing.sample_steps(model, jax.random.key(seed), asg, steps)        # [T, m, W]
  scenarios = dyn.scenarios_of(model, asg)
  f = timing.finish_times(tau)
  t_static = jnp.stack([p.completion_time(tau) for p in proto.members])     # [K, T]
  senders_static = jnp.sum(f[None, :, :, 0] <= t_static[..., None], -1)     # [K, T]

  @jax.jit
  def run(per_sender, tau, f, t_static, senders_static):
    # per_sender [K]: seconds per sender of member k's message (S · n_k · b / B). The
    # durations are arguments, not constants: XLA would constant-fold the rule on them.
    comm = lambda k, s: s * per_sender[k]
    c = jax.vmap(lambda t: dyn.choose_ell(proto, t, scenarios, comm))(tau)
    s = jnp.sum(f[..., 0] <= c.stop[:, None], -1)
    dynamic = c.stop + per_sender[c.member] * s
    static = t_static + per_sender[:, None] * senders_static
    counts = jnp.stack([jnp.sum(c.member == k) for k in range(len(proto.ells))])
    return jnp.mean(static, -1), jnp.mean(dynamic), jnp.mean(c.oracle), counts

  rows = []
  for d in sizes:
    for b in bandwidths:
      per = jnp.asarray([protocols.base.num_blocks(int(d), e) * BYTES / b for e in proto.ells],
                        jnp.float32)
      static, dynamic, oracle, counts = (np.asarray(x) for x in run(per, tau, f, t_static,
                                                                    senders_static))
      best = float(static.min())
      rows.append({"d": int(d), "bandwidth": float(b),
                   "static": {str(e): float(v) for e, v in zip(proto.ells, static, strict=True)},
                   "best_static_ell": int(proto.ells[int(static.argmin())]),
                   "dynamic": float(dynamic), "oracle": float(oracle),
                   "gain": 1 - float(dynamic) / best, "bound": 1 - float(oracle) / best,
                   "chosen": {str(e): int(n) for e, n in zip(proto.ells, counts, strict=True)}})
  return rows


def markdown(results: dict, sizes, bandwidths) -> str:
  lines = []
  for name, rows in results.items():
    lines += [f"**{name}** — gain of dynamic ℓ over the best static ℓ in {ELLS} "
              "(bound: clairvoyant)", "",
              "| d \\ B (GB/s) | " + " | ".join(f"{b / 1e9:g}" for b in bandwidths) + " |",
              "|---|" + "---|" * len(bandwidths)]
    for d in sizes:
      cells = [f"{r['gain']:+.1%} (≤ {r['bound']:.1%}, ℓ* {r['best_static_ell']})"
               for r in rows if r["d"] == d]
      lines.append(f"| {d:.0e} | " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


def plot(results: dict, sizes, bandwidths, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, len(results), figsize=(4.6 * len(results), 3.6), squeeze=False)
  for ax, (name, rows) in zip(axes[0], results.items(), strict=True):
    grid = np.array([[r["gain"] for r in rows if r["d"] == d] for d in sizes]) * 100
    im = ax.imshow(grid, origin="lower", cmap="RdYlGn", vmin=-5, vmax=10)
    ax.set_xticks(range(len(bandwidths)), [f"{b / 1e9:g}" for b in bandwidths])
    first = ax is axes[0][0]
    ax.set_yticks(range(len(sizes)), [f"{d:.0e}" for d in sizes] if first else [])
    ax.set_xlabel("PS bandwidth (GB/s)")
    if first:
      ax.set_ylabel("parameters d")
    ax.set_title(name)
    for i in range(len(sizes)):
      for j in range(len(bandwidths)):
        ax.text(j, i, f"{grid[i, j]:+.1f}%", ha="center", va="center", fontsize=8)
  fig.colorbar(im, ax=axes[0].tolist(), label="gain over best static ℓ (%)")
  fig.suptitle(f"dynamic ℓ ∈ {ELLS}: m = {M}, cyclic load {LOAD}, PS ingress")
  fig.savefig(path, dpi=110, bbox_inches="tight")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="400 steps, 3 models, a 3×3 grid")
  p.add_argument("--steps", type=int, default=None)
  p.add_argument("--json", default=None, help="write the results here")
  p.add_argument("--png", default=None, help="write the gain map here")
  p.add_argument("--markdown", default=None, help="write the gain table here")
  args = p.parse_args()
  steps = args.steps or (400 if args.quick else 2000)
  sizes = (3e7, 1e8, 3e8) if args.quick else (1e7, 3e7, 1e8, 3e8)
  bandwidths = ((3.125e8, 6.25e8, 1.25e9) if args.quick
                else (3.125e8, 6.25e8, 1.25e9, 3.125e9))
  proto = protocols.PartialStraggler(assignments.cyclic(M, LOAD), ell=ELLS)
  results, flags = {}, {}
  start = time.time()
  for name, (model, model_flags) in models(args.quick).items():
    results[name] = evaluate(proto, model, steps, sizes, bandwidths)
    flags[name] = model_flags
    for r in results[name]:
      print(f"{name:16s} d={r['d']:.0e} B={r['bandwidth']:.3g}  static "
            + " ".join(f"{e}:{v:.3f}" for e, v in r["static"].items())
            + f"  dynamic {r['dynamic']:.3f}  oracle {r['oracle']:.3f}  gain {r['gain']:+.2%}"
            f"  bound {r['bound']:+.2%}  chosen {r['chosen']}", flush=True)
  rows = [dict(r, model=name) for name, rs in results.items() for r in rs]
  top = max(rows, key=lambda r: r["gain"])
  worst = min(rows, key=lambda r: r["gain"])
  out = {
      "flags": [f"--config.ell={ELLS}", f"--config.num_workers={M}", f"--config.load={LOAD}",
                "--config.network.name=ps", f"--config.network.bandwidth={top['bandwidth']:g}",
                *flags[top["model"]]],
      "gain": top["gain"], "bound": top["bound"], "model": top["model"], "d": top["d"],
      "bandwidth": top["bandwidth"], "worst": worst["gain"],
      "worst_setting": {k: worst[k] for k in ("model", "d", "bandwidth")},
      "steps": steps, "seconds": time.time() - start, "rows": rows,
  }
  print(f"largest gain {top['gain']:+.2%} ({top['model']}, d={top['d']:.0e}, "
        f"B={top['bandwidth']:.3g}); worst {worst['gain']:+.2%}; {out['seconds']:.0f} s")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(out, fh, indent=1)
  if args.markdown:
    with open(args.markdown, "w") as fh:
      fh.write(markdown(results, sizes, bandwidths))
  if args.png:
    plot(results, sizes, bandwidths, args.png)


if __name__ == "__main__":
  main()

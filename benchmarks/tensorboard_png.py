"""A picture of the TensorBoard scalars of a train.py run, read back from its event files.

Runs the default config (``configs/default.py``: digits, an MLP, 20 workers, partial-
straggler coding, 8 simulated CPU devices) in a temporary workdir, or reads the run already
in ``--workdir``; reads ``workdir/tensorboard/`` with TensorBoard's own
``EventAccumulator`` (as ``tensorboard --logdir`` does) and draws a grid of the scalars,
one panel per tag, against the step. Prints, per tag, the number of points and whether each
step holds one point (a resumed run must not show a step twice).

  python benchmarks/tensorboard_png.py              # -> docs/tensorboard_scalars.png
  python benchmarks/tensorboard_png.py --workdir=workdir --out=/tmp/tb.png
  python benchmarks/tensorboard_png.py --flags=--config.num_steps=100
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The panels, in order (tags missing from the run are left out); the rest follow.
FIRST = ("train/loss", "eval/test_accuracy", "train/step_sim_time", "train/sim_time",
         "train/exact", "train/condition_number", "train/erasures", "train/min_coverage",
         "train/senders", "train/computed_fraction", "eval/test_loss", "train/step_comm_time")


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """``{tag: [(step, value), ...]}`` as TensorBoard reads them."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
  acc.Reload()
  return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def plot(scalars: dict, path: str, title: str, columns: int = 4) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  tags = [t for t in FIRST if t in scalars] + sorted(t for t in scalars if t not in FIRST)
  rows = -(-len(tags) // columns)
  fig = Figure(figsize=(3.6 * columns, 2.4 * rows))
  FigureCanvasAgg(fig)
  for i, tag in enumerate(tags):
    ax = fig.add_subplot(rows, columns, i + 1)
    steps, values = zip(*scalars[tag], strict=True)
    ax.plot(steps, values, lw=1, color="#e8710a" if tag.startswith("eval/") else "#1967d2",
            marker="." if len(steps) < 50 else None)
    ax.set_title(tag, fontsize="small", loc="left")
    ax.tick_params(labelsize="x-small")
    ax.grid(alpha=0.3)
  fig.suptitle(title, fontsize="medium")
  fig.tight_layout()
  tmp = f"{path}.tmp{os.getpid()}.png"
  fig.savefig(tmp, dpi=90)
  os.replace(tmp, path)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", help="a train.py workdir to read (default: a new run of "
                      "the default config in a temporary folder)")
  parser.add_argument("--out", default=os.path.join(ROOT, "docs", "tensorboard_scalars.png"))
  parser.add_argument("--flags", nargs="*", default=[],
                      help="extra train.py flags for the new run, e.g. --config.num_steps=100")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    workdir = args.workdir
    if workdir is None:
      workdir = os.path.join(tmp, "run")
      subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"--workdir={workdir}",
                      *args.flags], check=True, cwd=ROOT)
    scalars = read_scalars(os.path.join(workdir, "tensorboard"))
    if not scalars:
      sys.exit(f"{workdir}/tensorboard holds no scalars (run with --config.tensorboard=True)")
    for tag, points in sorted(scalars.items()):
      steps = [s for s, _ in points]
      print(f"{tag:32s} {len(points):5d} points, steps {steps[0]}..{steps[-1]}, "
            f"{'each step once' if len(set(steps)) == len(steps) else 'STEPS TWICE'}")
    plot(scalars, args.out, "TensorBoard scalars of a train.py run (workdir/tensorboard/), "
         "read back with TensorBoard's EventAccumulator")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()

"""Test accuracy against simulated time, with the time to the target marked."""
from __future__ import annotations

import os
import textwrap

from jaxgc.experiment.runs import read_metrics

__all__ = ["time_to_target", "plot_accuracy_vs_time"]


def time_to_target(records: list[dict], target: float, key: str = "test_accuracy"):
  """First simulated time at which an eval line reaches ``target`` (``None`` if never)."""
  for r in records:
    if key in r and r[key] >= target:
      return r["sim_time"]
  return None


def plot_accuracy_vs_time(runs: dict[str, str], path: str, target: float | None = None,
                          title: str | None = None):
  """One curve per run directory; a dotted line where each reaches ``target``.

  Saves the figure to ``path`` and returns it (a ``matplotlib.figure.Figure``).
  """
  # A bare Figure on the Agg canvas: no pyplot, so no global backend switch (which
  # would silence inline figures in a notebook that calls this).
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(7, 4.5))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for name, wd in runs.items():
    ev = [r for r in read_metrics(wd) if "test_accuracy" in r]
    line, = ax.plot([r["sim_time"] for r in ev], [r["test_accuracy"] for r in ev], label=name)
    hit = time_to_target(ev, target) if target is not None else None
    if hit is not None:
      ax.axvline(hit, color=line.get_color(), ls=":", lw=1,
                 label=f"{name} reaches {target:.0%} at t = {hit:.4g}")
  if target is not None:
    ax.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:.0%}")
  ax.set_xlabel("simulated wall-clock time (s)")
  ax.set_ylabel("test accuracy")
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small")
  # Wrapped: a comparison's title lists every protocol and would run off the figure.
  ax.set_title(textwrap.fill(title or "Test accuracy against simulated time", 70),
               fontsize="medium")
  fig.tight_layout()
  tmp = f"{path}.tmp{os.getpid()}"       # renamed into place: never half a PNG
  fig.savefig(tmp, dpi=120, format="png")
  os.replace(tmp, path)
  return fig

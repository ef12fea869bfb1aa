"""TensorBoard event files of a run: ``workdir/tensorboard/`` mirrors ``metrics.jsonl``.

``tensorboard --logdir workdir`` shows every number of every record as a scalar:
a step record's under ``train/`` (``loss``, ``step_sim_time``, ``step_comm_time``,
``exact``, ``erasures``, ``condition_number``, ...), an evaluation's under ``eval/``
(``test_accuracy``, ``test_loss``, ...); booleans are 0/1 and non-finite numbers
(``null`` in the log) NaN. A list of numbers (the per-worker finish ``counts [m]``,
where a step reports them) is a histogram, and the run's config is text (``config``).

The events hold exactly what ``metrics.jsonl`` holds, so a resumed run shows each
step once: :class:`EventLog` writes a fresh event file holding the kept records
(``MetricsLog`` has cut the log back to the restored step), and only then removes
the older event files. A kill in between leaves both, until the next start.
Events are written synchronously, and flushed at each evaluation and every few
seconds (:meth:`EventLog.write`). Written with ``tensorboardX``'s event writer (no
TensorFlow) and read back by TensorBoard's ``EventAccumulator`` in the tests.
"""
from __future__ import annotations

import json
import math
import os
import time
import uuid
import weakref
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["DIRNAME", "FLUSH_SECONDS", "EventLog", "open_event_log", "config_markdown",
           "event_files"]

DIRNAME = "tensorboard"            # in the workdir
_EVENTS = "events.out.tfevents."   # TensorBoard reads the files whose names hold this
FLUSH_SECONDS = 5.0                # between flushes of step records (TensorBoard's view lags)


def event_files(logdir: str) -> list[str]:
  """The event files in ``logdir`` (paths, sorted)."""
  if not os.path.isdir(logdir):
    return []
  return sorted(os.path.join(logdir, n) for n in os.listdir(logdir) if _EVENTS in n)


def config_markdown(config: dict) -> str:
  """The config as a markdown table of its flat fields (TensorBoard's text tab renders it)."""
  from jaxgc.experiment.config import flatten  # pylint: disable=import-outside-toplevel
  rows = [f"| `{k}` | `{json.dumps(v)}` |" for k, v in sorted(flatten(config).items())]
  return "\n".join(["| field | value |", "|---|---|", *rows])


def _is_number(v) -> bool:
  return v is None or (isinstance(v, (bool, int, float, np.number)) and not isinstance(v, str))


class EventLog:
  """One event file in ``logdir``, rebuilt from the run's kept records.

  Args:
    logdir: the folder (created if missing).
    records: the records already in ``metrics.jsonl``, written first, in order.
    config: the run's config (a dict), written as text at step 0; ``None``: none.
  """

  def __init__(self, logdir: str, records: Iterable[dict] = (), config: dict | None = None):
    # pylint: disable=import-outside-toplevel
    from tensorboardX import summary
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto import event_pb2, summary_pb2
    self._summary, self._event_pb2, self._summary_pb2 = summary, event_pb2, summary_pb2
    self._flushed = 0.0
    os.makedirs(logdir, exist_ok=True)
    older = event_files(logdir)
    # A name of its own: EventsWriter's names differ only by the second otherwise.
    self._writer = EventsWriter(os.path.join(logdir, "events"),
                                f".{os.getpid()}.{uuid.uuid4().hex[:8]}.jaxgc")
    self.path = self._writer._file_name   # pylint: disable=protected-access
    self._close = weakref.finalize(self, self._writer.close)   # when dropped, or at exit
    if config is not None:
      self._emit(0, list(summary.text("config", config_markdown(config)).value))
    for record in records:
      self.write(record, flush=False)
    self.flush()             # (with an fsync)
    # The new file is complete on disk before the old ones go: a kill between the two
    # leaves steps twice (until the next start rebuilds), never a step missing.
    for path in older:
      if os.path.abspath(path) != os.path.abspath(self.path):
        os.remove(path)

  def values(self, record: dict) -> list:
    """The summary values of one ``metrics.jsonl`` record (``step`` is the event's step)."""
    group = "train" if "loss" in record else "eval"   # as MetricsLog tells them apart
    out: list = []
    for key, v in record.items():
      if key == "step":
        continue
      tag = f"{group}/{key}"
      if _is_number(v):
        out.append(self._summary_pb2.Summary.Value(
            tag=tag, simple_value=math.nan if v is None else float(v)))
      elif isinstance(v, (list, tuple, np.ndarray)) and len(v) and all(map(_is_number, v)):
        a = np.asarray([math.nan if x is None else x for x in v], np.float64)
        a = a[np.isfinite(a)]
        if a.size:
          out.extend(self._summary.histogram(tag, a, _bins(a)).value)
    return out

  def write(self, record: dict, flush: bool = True) -> None:
    """Appends one record (a step's metrics or an evaluation) as one event.

    Flushed (with an fsync, a few ms) at an evaluation and at most every
    :data:`FLUSH_SECONDS` otherwise; at exit in any case. What a kill loses is
    rebuilt from ``metrics.jsonl`` at the next start.
    """
    self._emit(int(record.get("step", 0)), self.values(record))
    if flush and ("loss" not in record or time.time() - self._flushed > FLUSH_SECONDS):
      self.flush()

  def flush(self) -> None:
    self._writer.flush()
    self._flushed = time.time()

  def _emit(self, step: int, values: list) -> None:
    if values:
      self._writer.write_event(self._event_pb2.Event(
          wall_time=time.time(), step=step, summary=self._summary_pb2.Summary(value=values)))

  def close(self) -> None:
    self._close()            # once (flushes)


def _bins(a: np.ndarray) -> Any:
  """Integer-centred bins for integer values (counts), else numpy's ``"auto"``."""
  if np.all(a == np.round(a)) and a.max() - a.min() <= 1000:
    return np.arange(a.min(), a.max() + 2) - 0.5
  return "auto"


def open_event_log(workdir: str, records: Iterable[dict]) -> EventLog | None:
  """The run's :class:`EventLog` in ``workdir/tensorboard/``, from ``workdir/config.json``
  (its ``tensorboard`` field; a config saved before the field existed means on);
  ``None`` when it is off."""
  config: dict | None = None
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      config = json.load(f)
  if config is not None and not config.get("tensorboard", True):
    return None
  return EventLog(os.path.join(workdir, DIRNAME), records, config)

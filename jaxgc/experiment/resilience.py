"""What lets a run survive preemption: stop signals, exit codes, non-finite inputs.

* :class:`StopSignals`: SIGTERM (preemption on TPU and spot VMs) and SIGINT
  (Ctrl-C) ask the loop to stop after the current step; it then saves that step
  and raises :class:`Preempted`. With several processes every process stops at
  the same step: the loop agrees on the request with an all-gather between steps.
* Checkpoints (saved, sealed, verified, free of the layout):
  :mod:`jaxgc.experiment.checkpoints`.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

import jax
import numpy as np

__all__ = ["Preempted", "StopSignals", "EXIT_CODES", "ABORT_LINE", "nonfinite_inputs"]

# The exit status of a stopped run: the shell's for death by that signal (128 + signum),
# so a scheduler or `set -e` sees an interrupted run, not a finished one.
EXIT_CODES = {"SIGTERM": 128 + signal.SIGTERM, "SIGINT": 128 + signal.SIGINT}

# The one line of a second Ctrl-C, which gives up the save under way.
ABORT_LINE = ("interrupted again (SIGINT): exiting at once without saving the stop step; a "
              "rerun resumes from the newest checkpoint saved before it")


class Preempted(Exception):
  """A run stopped by a signal after saving ``step`` (``signal``: ``"SIGTERM"``/``"SIGINT"``)."""

  def __init__(self, step: int, signal_name: str, saved: bool = True):
    self.step, self.signal, self.saved = step, signal_name, saved
    self.exit_code = EXIT_CODES.get(signal_name, 1)
    rerun = ("rerun the same command to resume" if saved else
             "checkpoints are off (--config.checkpoint_every=0), so a rerun starts over")
    super().__init__(f"stopped at step {step} ({signal_name}); {rerun}")


class StopSignals:
  """Turns SIGTERM and SIGINT into a request that the loop polls between steps.

  The handlers stay for the whole stop, the save included: the grace period after a
  SIGTERM belongs to the save, so repeated SIGTERMs (schedulers send several) are
  ignored. A SIGINT after the request (a second Ctrl-C) is the one way out at once:
  it prints :data:`ABORT_LINE` and exits with status 130, saving nothing more.
  Handlers can only be set from the main thread; elsewhere this does nothing and
  signals keep their handlers.
  """

  def __init__(self):
    self.received: str | None = None
    self._aborting = False
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.received is None:
      self.received = name
    elif signum == signal.SIGINT and not self._aborting:
      # A third Ctrl-C can run this handler again inside the print below: it returns, and
      # the line is printed once.
      self._aborting = True
      # os._exit: no exception may unwind through a save in flight (or print a traceback).
      # (on a line of its own: a progress bar may hold the current one)
      print(f"\n{ABORT_LINE}", file=sys.stderr, flush=True)
      os._exit(EXIT_CODES["SIGINT"])

  def requested(self) -> str | None:
    """The signal that asks to stop (``None``: keep going), the same on every process."""
    if jax.process_count() == 1:
      return self.received
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    mine = {None: 0, "SIGINT": 1, "SIGTERM": 2}[self.received]
    agreed = int(np.max(multihost_utils.process_allgather(np.int32(mine))))
    return {0: None, 1: "SIGINT", 2: "SIGTERM"}[agreed]


def nonfinite_inputs(ds) -> int:
  """How many training inputs are NaN/Inf (host arrays; integer data has none)."""
  return sum(int(np.size(a) - np.count_nonzero(np.isfinite(a))) for a in (ds.x_train, ds.y_train)
             if np.issubdtype(np.asarray(a).dtype, np.inexact))

"""What lets a run survive the real world: preemption and checkpoints free of the layout.

* :class:`StopSignals`: SIGTERM (preemption on TPU and spot VMs) and SIGINT
  (Ctrl-C) ask the loop to stop after the current step; it then saves that step
  and raises :class:`Preempted`. With several processes every process stops at
  the same step: the loop agrees on the request with an all-gather between steps.
* :func:`logical_state` / :func:`layout_state`: a checkpoint holds the *logical*
  state, the per-worker arrays of the step's plan cut to the ``m`` real workers
  (the phantom workers that pad ``m`` to a multiple of the device count are zeros
  and never send), so a checkpoint restores on any device count.
"""
from __future__ import annotations

import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np

from jaxgc import parallel

__all__ = ["Preempted", "StopSignals", "logical_state", "layout_state", "EXIT_CODES",
           "CHECKPOINT_FORMAT"]

# The exit status of a stopped run: the shell's for death by that signal (128 + signum),
# so a scheduler or `set -e` sees an interrupted run, not a finished one.
EXIT_CODES = {"SIGTERM": 128 + signal.SIGTERM, "SIGINT": 128 + signal.SIGINT}

# meta["format"] of a checkpoint holding the logical state (absent: an older, padded one).
CHECKPOINT_FORMAT = 2


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

  A second signal of the same kind gets the previous handler (a second Ctrl-C
  interrupts at once). Handlers can only be set from the main thread; elsewhere
  this does nothing and signals keep their handlers.
  """

  def __init__(self):
    self.received: str | None = None
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
    signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

  def requested(self) -> str | None:
    """The signal that asks to stop (``None``: keep going), the same on every process."""
    if jax.process_count() == 1:
      return self.received
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    mine = {None: 0, "SIGINT": 1, "SIGTERM": 2}[self.received]
    agreed = int(np.max(multihost_utils.process_allgather(np.int32(mine))))
    return {0: None, 1: "SIGINT", 2: "SIGTERM"}[agreed]


def _worker_axes(layout: parallel.WorkerLayout):
  """``(path in the plan, worker axis)`` of the plan's padded per-worker arrays."""
  del layout
  return (("lost",), 0), (("corrupt",), 0), (("solve", "enc"), 0), (("solve", "dec"), 1), \
      (("solve", "senders"), 0)


def _map_plan(state, layout, fn):
  plan = state.plan
  if not isinstance(plan, parallel.Plan) or not isinstance(layout, parallel.WorkerLayout):
    return state
  for path, axis in _worker_axes(layout):
    if len(path) == 1:
      plan = plan._replace(**{path[0]: fn(getattr(plan, path[0]), axis)})
    else:
      solve = plan.solve
      plan = plan._replace(solve=solve._replace(**{path[1]: fn(getattr(solve, path[1]), axis)}))
  return state.replace(plan=plan)


def logical_state(state, layout):
  """``state`` with the plan's per-worker arrays cut from ``m_pad`` to the ``m`` real
  workers (what a checkpoint holds); a state without a plan is returned as it is."""
  def cut(x, axis):
    return jax.lax.slice_in_dim(x, 0, layout.m, axis=axis)
  return _map_plan(state, layout, cut)


def layout_state(state, layout, sharding=None):
  """The inverse of :func:`logical_state`: per-worker arrays padded with zeros (phantom
  workers: no coefficients, never send) to ``layout.m_pad``, placed with ``sharding``."""
  def pad(x, axis):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, layout.m_pad - x.shape[axis])
    out = jnp.pad(x, widths)
    return out if sharding is None else jax.device_put(out, sharding)
  return _map_plan(state, layout, pad)

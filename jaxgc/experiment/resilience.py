"""What lets a run survive the real world: preemption, checkpoints free of the layout.

* :class:`StopSignals`: SIGTERM (preemption on TPU and spot VMs) and SIGINT
  (Ctrl-C) ask the loop to stop after the current step; it then saves that step
  and raises :class:`Preempted`. With several processes every process stops at
  the same step: the loop agrees on the request with an all-gather between steps.
* :func:`logical_state` / :func:`layout_state`: a checkpoint holds the *logical*
  state, the per-worker arrays of the step's plan cut to the ``m`` real workers
  (the phantom workers that pad ``m`` to a multiple of the device count are zeros
  and never send), so a checkpoint restores on any device count.
* :func:`restore` / :func:`save`: a run's checkpoints in that form; a run that
  cannot resume stops instead of starting over its results.
"""
from __future__ import annotations

import os
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np

from jaxgc.backends import spmd
from jaxgc.experiment import runs
from jaxgc.experiment.config import ConfigError

__all__ = ["Preempted", "StopSignals", "logical_state", "layout_state", "EXIT_CODES",
           "CHECKPOINT_FORMAT", "restore", "save", "nonfinite_inputs"]

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


# (path in the plan, worker axis) of the plan's padded per-worker arrays.
_WORKER_AXES = ((("lost",), 0), (("corrupt",), 0), (("solve", "enc"), 0), (("solve", "dec"), 1),
                (("solve", "senders"), 0))


def _map_plan(state, layout, fn):
  plan = state.plan
  if not isinstance(plan, spmd.Plan) or not isinstance(layout, spmd.WorkerLayout):
    return state
  for path, axis in _WORKER_AXES:
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


# -- checkpoints of a run ------------------------------------------------------------------

def _layout(exp):
  layout = exp.step.layout
  return layout if isinstance(layout, spmd.WorkerLayout) else None


def restore(exp, workdir: str, state, sharding, lead: bool):
  """``(state, checkpoints or None, meta)``: the newest checkpoint that restores, if any.

  Checkpoints hold the logical state (:func:`logical_state`), laid out
  here for this run's devices.

  Raises:
    ConfigError: checkpoints exist (or a finished run's summary) but none restores:
      starting over would overwrite the run's results.
  """
  cfg, layout = exp.config, _layout(exp)
  if cfg.checkpoint_every <= 0:
    return state, None, {}
  ckpt = runs.Checkpoints(os.path.join(workdir, "checkpoints"), cfg.checkpoint_every,
                          cfg.max_checkpoints, lead)

  def abstract_for(meta):
    logical = meta.get("format") == CHECKPOINT_FORMAT
    shapes = jax.eval_shape(lambda s: logical_state(s, layout) if logical else s,
                            state)
    # Each leaf restores where this run keeps it: parameters and optimizer state sharded
    # over a group of devices on a 2-D mesh, the rest replicated.
    where = jax.tree.map(lambda x: getattr(x, "sharding", sharding), state)
    return jax.tree.map(lambda x, w: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=w),
                        shapes, where)

  restored, meta, skipped = ckpt.restore(abstract_for)
  for step, reason in skipped:
    if lead:
      runs.note(f"skipped checkpoint {step} (moved to broken_checkpoints/), it does not "
                f"restore: {reason}")
  if restored is None:
    broken = os.path.join(workdir, "broken_checkpoints")
    left = [n for n, there in (("broken checkpoints", skipped or os.path.isdir(broken)),
                               ("summary.json", os.path.exists(os.path.join(workdir,
                                                                            "summary.json"))))
            if there]
    if left:
      ckpt.close()
      raise ConfigError(f"--workdir={workdir}", f"holds a run that cannot resume: no "
                        f"checkpoint restores, but it holds {' and '.join(left)}. Starting "
                        "over would overwrite its results; add --restart to start over in "
                        "this workdir, or use a new --workdir.")
    return state, ckpt, meta
  if meta.get("format") == CHECKPOINT_FORMAT:
    restored = layout_state(restored, layout, sharding)
  return restored, ckpt, meta


def save(ckpt, exp, step: int, state, wall: float, force: bool = False) -> None:
  """Saves the logical state at ``step`` (when due, or ``force``)."""
  if ckpt is not None and (force or ckpt.due(step)):
    ckpt.save(step, logical_state(state, _layout(exp)),
              {"wall_time": wall, "format": CHECKPOINT_FORMAT}, force=force)


def nonfinite_inputs(ds) -> int:
  """How many training inputs are NaN/Inf (host arrays; integer data has none)."""
  return sum(int(np.size(a) - np.count_nonzero(np.isfinite(a))) for a in (ds.x_train, ds.y_train)
             if np.issubdtype(np.asarray(a).dtype, np.inexact))

"""Straggler timing: duration models, state at a time, oracle bound (PROTOCOL.md §4).

Durations are arrays ``τ[..., m, max_load]``: ``τ[..., j, t]`` is how long worker
``j`` takes for the ``t``-th chunk *it processes*. Empty slots and failed workers
have ``τ = inf``. ``F = cumsum(τ, -1)`` are the finish times.

Every model samples through ``jax.random``, so it runs under ``jit``/``vmap`` and
draws a batch of trials with ``shape=(trials,)``. Models check their parameters
when they are built (a :class:`~jaxgc.errors.ParamError` naming the parameter).

Modules: :mod:`~jaxgc.timing.iid` (i.i.d. per chunk), :mod:`~jaxgc.timing.slowdown`,
:mod:`~jaxgc.timing.failures`, :mod:`~jaxgc.timing.markov` (persistent stragglers),
:mod:`~jaxgc.timing.traces` (durations from data), :mod:`~jaxgc.timing.state`
(models with memory), :mod:`~jaxgc.timing.completion` (times from durations),
:mod:`~jaxgc.timing.registry` (models by name).
"""
from __future__ import annotations

import warnings
from typing import Any

from jaxgc.timing.base import StragglerModel
from jaxgc.timing.completion import (
  check_durations,
  event_loop_completion_time,
  finish_times,
  kth_smallest,
  oracle_time,
  progress,
  worker_finish_times,
)
from jaxgc.timing.failures import Failures
from jaxgc.timing.iid import Pareto, ShiftedExponential
from jaxgc.timing.markov import GilbertElliott
from jaxgc.timing.registry import (
  MODEL_PARAMS,
  STRAGGLER_MODELS,
  check_model,
  get_model,
  get_straggler_model,
)
from jaxgc.timing.slowdown import FixedSlowdown, Slowdown
from jaxgc.timing.state import init_state, sample_step, sample_steps
from jaxgc.timing.traces import MAPPINGS, TRACES, RecordedDurations, TraceReplay, load_trace

__all__ = [
    "StragglerModel", "ShiftedExponential", "Pareto", "Slowdown", "FixedSlowdown", "Failures",
    "GilbertElliott", "TraceReplay", "RecordedDurations", "TRACES", "MAPPINGS", "load_trace",
    "STRAGGLER_MODELS", "get_straggler_model", "get_model", "MODEL_PARAMS", "check_model",
    "init_state", "sample_step", "sample_steps",
    "finish_times", "progress", "worker_finish_times", "oracle_time", "kth_smallest",
    "check_durations", "event_loop_completion_time",
]

_DEPRECATED = {"Trace": ("RecordedDurations", RecordedDurations)}


def __getattr__(name: str) -> Any:
  if name in _DEPRECATED:
    new, obj = _DEPRECATED[name]
    warnings.warn(f"jaxgc.timing.{name} is deprecated; use jaxgc.timing.{new} (the same "
                  "class).", DeprecationWarning, stacklevel=2)
    return obj
  raise AttributeError(f"module 'jaxgc.timing' has no attribute {name!r}")

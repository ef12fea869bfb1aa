"""What every straggler model shares: the interface, empty slots, parameter checks, the name table.

A model's durations are ``τ[..., m, max_load]`` (PROTOCOL.md §4); empty slots are
``inf``. Models are frozen dataclasses: hashable and equal by value, so a model can
be a static argument of ``jit``. Each checks its parameters when it is built.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from jaxgc.assignments import Assignment
from jaxgc.errors import ParamError
from jaxgc.registry import Registry

__all__ = ["StragglerModel", "Rule", "check_params", "param_error", "finalize",
           "STRAGGLER_MODELS"]

STRAGGLER_MODELS: Registry[Any] = Registry("straggler model")
"""Name -> constructor of every registered straggler model. Here, below every model,
so that a model module registers itself without importing the builder
(:mod:`jaxgc.timing.registry`, which imports the :class:`~jaxgc.timing.Failures` wrapper)."""


@runtime_checkable
class StragglerModel(Protocol):
  """Anything with ``sample(key, assignment, shape=()) -> τ [*shape, m, max_load]``.

  A model with memory across steps also sets ``stateful = True`` and implements
  ``init_state(key, num_workers)`` and ``sample_step(key, state, assignment)``
  (see :mod:`jaxgc.timing.state`).
  """

  def sample(self, key: Any, assignment: Assignment, shape: tuple[int, ...] = ()) -> jax.Array:
    ...


def finalize(tau: jax.Array, assignment: Assignment) -> jax.Array:
  """``τ`` as float32 with ``inf`` in the assignment's empty slots."""
  return jnp.where(jnp.asarray(assignment.slot_mask), tau, jnp.inf).astype(jnp.float32)


class Rule(NamedTuple):
  """A parameter's valid range: ``ok(value)``, what a bad value is, and the fix."""
  ok: Callable[[float], bool]
  want: str
  fix: str


def param_error(name: str, value: Any, want: str, fix: str) -> ParamError:
  return ParamError(f"straggler parameter {name}={value!r} {want}; {fix}.", name)


def _concrete(value: Any) -> float | None:
  """``value`` as a float when it is a concrete real scalar; ``None`` for anything else
  (a tracer, a nested model, a string), which is then not checked here."""
  if isinstance(value, (jax.core.Tracer, str, bytes)):
    return None
  try:
    a = np.asarray(value)
  except Exception:          # an object numpy cannot hold: not a number
    return None
  if a.ndim != 0 or a.dtype.kind not in "biuf":
    return None
  return float(a)


def check_params(model: Any, rules: Mapping[str, Rule]) -> None:
  """Every numeric field of the dataclass ``model`` is finite and obeys its rule.

  Raises :class:`~jaxgc.errors.ParamError` naming the field. Values that are not
  concrete numbers (e.g. tracers, when a model is built inside ``jit``) are skipped.
  """
  values = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)}
  concrete = {k: _concrete(v) for k, v in values.items()}
  for k, v in concrete.items():
    if v is not None and not math.isfinite(v):
      raise param_error(k, values[k], "must be finite", "give a finite number")
  for k, rule in rules.items():
    v = concrete.get(k)
    if v is not None and not rule.ok(v):
      raise param_error(k, values[k], rule.want, rule.fix)


def check_base(base: Any, name: str = "base") -> None:
  """A nested model must be a straggler model (have ``sample``)."""
  if not callable(getattr(base, "sample", None)):
    raise ParamError(f"straggler parameter {name}={base!r} is not a straggler model; give "
                     "one, e.g. ShiftedExponential().", name)


POSITIVE = Rule(lambda v: v > 0, "must be > 0", "use a positive value")
PROBABILITY = Rule(lambda v: 0 <= v <= 1, "is outside [0, 1]", "give a probability, e.g. 0.1")
FACTOR = Rule(lambda v: v >= 1, "is below 1 (slow workers would be faster)", "use factor >= 1")

"""Independent per-chunk durations: shifted exponential and Pareto (PROTOCOL.md §4)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax

from jaxgc.assignments import Assignment
from jaxgc.errors import ParamError
from jaxgc.timing.base import STRAGGLER_MODELS, Rule, check_params, finalize

__all__ = ["ShiftedExponential", "Pareto"]


@STRAGGLER_MODELS.register("shifted_exponential")
@dataclasses.dataclass(frozen=True)
class ShiftedExponential:
  """``τ = shift + Exp(rate)`` per chunk, i.i.d.; mean ``shift + 1/rate``."""
  shift: float = 1.0
  rate: float = 1.0

  RULES: ClassVar[dict[str, Rule]] = {
      "shift": Rule(lambda v: v >= 0, "is negative", "use shift >= 0 (the minimum chunk time)"),
      "rate": Rule(lambda v: v > 0, "must be > 0",
                   "the exponential part has mean 1/rate; use a positive rate"),
  }

  def __post_init__(self):
    check_params(self, self.RULES)

  @property
  def mean(self) -> float:
    """``E[τ] = shift + 1/rate``."""
    return self.shift + 1.0 / self.rate

  def sample(self, key, assignment: Assignment, shape=()):
    full = (*shape, assignment.num_workers, assignment.max_load)
    return finalize(self.shift + jax.random.exponential(key, full) / self.rate, assignment)


@STRAGGLER_MODELS.register("pareto")
@dataclasses.dataclass(frozen=True)
class Pareto:
  """``τ = scale · U^{-1/alpha}`` per chunk: heavy-tailed, minimum ``scale``."""
  scale: float = 1.0
  alpha: float = 2.0

  RULES: ClassVar[dict[str, Rule]] = {
      "scale": Rule(lambda v: v > 0, "must be > 0", "use a positive scale"),
      "alpha": Rule(lambda v: v > 0, "must be > 0", "use a positive alpha"),
  }

  def __post_init__(self):
    check_params(self, self.RULES)

  @property
  def mean(self) -> float:
    """``E[τ] = scale · alpha / (alpha − 1)``; exists only for ``alpha > 1``."""
    if self.alpha <= 1:
      raise ParamError(f"Pareto durations have no mean for alpha={self.alpha} <= 1; use "
                       "alpha > 1 where a mean is needed (e.g. as trace noise).", "alpha")
    return self.scale * self.alpha / (self.alpha - 1)

  def sample(self, key, assignment: Assignment, shape=()):
    full = (*shape, assignment.num_workers, assignment.max_load)
    return finalize(self.scale * jax.random.pareto(key, self.alpha, full), assignment)

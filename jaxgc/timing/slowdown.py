"""A share of the workers is slower by a factor: fresh each step, or always the same ones."""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxgc.assignments import Assignment
from jaxgc.errors import ParamError
from jaxgc.timing.base import FACTOR, STRAGGLER_MODELS, Rule, check_base, check_params
from jaxgc.timing.iid import ShiftedExponential

__all__ = ["Slowdown", "FixedSlowdown"]


@dataclasses.dataclass(frozen=True)
class Slowdown:
  """``base`` durations; a random ``fraction`` of the workers is ``factor`` times slower.

  Exactly ``round(fraction · m)`` workers are slow in each trial, drawn afresh.
  """
  base: Any = ShiftedExponential()
  fraction: float = 0.2
  factor: float = 5.0

  RULES: ClassVar[dict[str, Rule]] = {
      "fraction": Rule(lambda v: 0 <= v <= 1, "is outside [0, 1]",
                       "give the share of slow workers, e.g. 0.2"),
      "factor": FACTOR,
  }

  def __post_init__(self):
    check_base(self.base)
    check_params(self, self.RULES)

  def sample(self, key, assignment: Assignment, shape=()):
    kb, ks = jax.random.split(key)
    tau = self.base.sample(kb, assignment, shape)
    m = assignment.num_workers
    u = jax.random.uniform(ks, (*shape, m))
    rank = jnp.argsort(jnp.argsort(u, axis=-1), axis=-1)
    slow = rank < jnp.round(self.fraction * m)
    return jnp.where(slow[..., None], tau * self.factor, tau)


@STRAGGLER_MODELS.register("slowdown")
def _slowdown(shift: float = 1.0, rate: float = 1.0, fraction: float = 0.2,
              factor: float = 5.0) -> Slowdown:
  """:class:`Slowdown` of a :class:`ShiftedExponential` ``(shift, rate)``."""
  return Slowdown(ShiftedExponential(shift, rate), fraction, factor)


@dataclasses.dataclass(frozen=True)
class FixedSlowdown:
  """``base`` durations; the workers in ``workers`` are ``factor`` times slower at every step.

  The extreme of persistence (a fail-slow GPU, a throttled host), e.g. the
  adjacent workers ``(0, 1, 2, 3)`` that defeat a cyclic assignment.
  """
  base: Any = ShiftedExponential()
  workers: tuple[int, ...] = (0, 1, 2, 3)
  factor: float = 5.0

  RULES: ClassVar[dict[str, Rule]] = {"factor": FACTOR}

  def __post_init__(self):
    check_base(self.base)
    try:
      workers = tuple(operator.index(w) for w in np.asarray(self.workers).reshape(-1))
    except TypeError:
      workers = (-1,)
    if any(w < 0 for w in workers):
      raise ParamError(f"straggler parameter workers={self.workers!r} must be worker indices "
                       ">= 0; give e.g. (0, 1, 2, 3).", "workers")
    object.__setattr__(self, "workers", workers)   # a tuple keeps the model hashable
    check_params(self, self.RULES)

  def sample(self, key, assignment: Assignment, shape=()):
    tau = self.base.sample(key, assignment, shape)
    m = assignment.num_workers
    if any(w >= m for w in self.workers):
      raise ParamError(f"FixedSlowdown slows workers {self.workers}, but the assignment has "
                       f"only {m} workers; give indices below {m}.", "workers")
    slow = np.zeros(m, bool)
    slow[list(self.workers)] = True
    return jnp.where(jnp.asarray(slow)[:, None], tau * self.factor, tau)

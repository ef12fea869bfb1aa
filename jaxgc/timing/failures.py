"""Whole-worker failures on top of any model: a failed worker never finishes a chunk."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxgc.assignments import Assignment
from jaxgc.timing.base import PROBABILITY, Rule, check_base, check_params
from jaxgc.timing.iid import ShiftedExponential
from jaxgc.timing.state import init_state, sample_step

__all__ = ["Failures"]


@dataclasses.dataclass(frozen=True)
class Failures:
  """``base`` durations; each worker independently fails with probability ``p`` (``τ = inf``)."""
  base: Any = ShiftedExponential()
  p: float = 0.1

  RULES: ClassVar[dict[str, Rule]] = {"p": PROBABILITY}

  def __post_init__(self):
    check_base(self.base)
    check_params(self, self.RULES)

  def sample(self, key, assignment: Assignment, shape=()):
    kb, kf = jax.random.split(key)
    tau = self.base.sample(kb, assignment, shape)
    return self._fail(kf, tau, assignment, shape)

  def _fail(self, key, tau, assignment, shape=()):
    failed = jax.random.bernoulli(key, self.p, (*shape, assignment.num_workers))
    return jnp.where(failed[..., None], jnp.inf, tau)

  # A base with memory keeps it: failures are drawn fresh each step on top.
  @property
  def stateful(self) -> bool:
    return getattr(self.base, "stateful", False)

  def init_state(self, key, num_workers: int):
    return init_state(self.base, key, num_workers)

  def sample_step(self, key, state, assignment: Assignment):
    kb, kf = jax.random.split(key)
    tau, state = sample_step(self.base, kb, state, assignment)
    return self._fail(kf, tau, assignment), state

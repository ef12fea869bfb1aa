"""Persistent stragglers: a fast/slow Markov chain per worker (Gilbert-Elliott, PROTOCOL.md §10)."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxgc.assignments import Assignment
from jaxgc.errors import ParamError
from jaxgc.timing.base import FACTOR, STRAGGLER_MODELS, Rule, check_base, check_params
from jaxgc.timing.iid import ShiftedExponential

__all__ = ["GilbertElliott"]

_STEP_PROBABILITY = Rule(lambda v: 0 <= v <= 1, "is outside [0, 1]",
                         "give a per-step probability")


@dataclasses.dataclass(frozen=True)
class GilbertElliott:
  """Persistent stragglers (PROTOCOL.md §10): a fast/slow Markov chain per worker.

  ``s_j(t+1)``: fast → slow with probability ``p_slow``, slow → fast with
  ``p_recover``, independently per worker. Step ``t``'s durations are ``base``'s,
  times ``factor`` where ``s_j(t)`` is slow. The state is bool ``[m]`` (slow);
  it starts from the stationary law ``P(slow) = p_slow / (p_slow + p_recover)``,
  and a slow spell lasts ``1 / p_recover`` steps on average.

  :meth:`sample` draws each trial from the stationary law (no memory), so the
  stateless callers work; :func:`~jaxgc.timing.sample_steps` simulates the chain.
  """
  base: Any = ShiftedExponential()
  p_slow: float = 0.02
  p_recover: float = 0.1
  factor: float = 5.0

  stateful: ClassVar[bool] = True
  RULES: ClassVar[dict[str, Rule]] = {
      "p_slow": _STEP_PROBABILITY, "p_recover": _STEP_PROBABILITY, "factor": FACTOR}

  def __post_init__(self):
    check_base(self.base)
    check_params(self, self.RULES)
    if self.p_slow + self.p_recover == 0:
      # Named after p_recover: making it positive is the usual fix.
      raise ParamError("straggler parameter p_slow + p_recover=0 is 0 (no stationary law); "
                       "make at least one of them positive.", "p_recover")

  @property
  def slow_fraction(self) -> float:
    """The stationary ``P(slow)``."""
    return self.p_slow / (self.p_slow + self.p_recover)

  def init_state(self, key, num_workers: int):
    return jax.random.bernoulli(key, self.slow_fraction, (num_workers,))

  def durations(self, key, slow, assignment: Assignment, shape=()):
    """``base`` durations ``[*shape, m, max_load]``, times ``factor`` where ``slow``
    ``[*shape, m]``."""
    tau = self.base.sample(key, assignment, shape)
    return jnp.where(slow[..., None], tau * self.factor, tau)

  def advance(self, key, slow):
    """One step of the chain: ``slow`` ``[..., m]`` -> next ``slow``."""
    u = jax.random.uniform(key, slow.shape)
    return jnp.where(slow, u >= self.p_recover, u < self.p_slow)

  def sample_step(self, key, state, assignment: Assignment):
    kd, kt = jax.random.split(key)
    return self.durations(kd, state, assignment), self.advance(kt, state)

  def sample(self, key, assignment: Assignment, shape=()):
    ks, kd = jax.random.split(key)
    slow = jax.random.bernoulli(ks, self.slow_fraction, (*shape, assignment.num_workers))
    return self.durations(kd, slow, assignment, shape)


@STRAGGLER_MODELS.register("gilbert_elliott")
def _gilbert_elliott(shift: float = 1.0, rate: float = 1.0, p_slow: float = 0.02,
                     p_recover: float = 0.1, factor: float = 5.0) -> GilbertElliott:
  """:class:`GilbertElliott` over a :class:`ShiftedExponential` ``(shift, rate)``."""
  return GilbertElliott(ShiftedExponential(shift, rate), p_slow, p_recover, factor)

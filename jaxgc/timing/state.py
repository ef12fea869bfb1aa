"""Models with memory across steps: the initial state and one step (or ``T`` steps) of draws."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxgc.assignments import Assignment

__all__ = ["init_state", "sample_step", "sample_steps"]


def init_state(model: Any, key, num_workers: int):
  """The model's state before step 0: ``()`` for i.i.d. models.

  A model that remembers across steps (persistent stragglers) declares
  ``stateful = True`` and implements ``init_state(key, num_workers)`` and
  ``sample_step(key, state, assignment) -> (durations, state)``. The state is a
  pytree of arrays, so it lives in the training state and in checkpoints.
  """
  return model.init_state(key, num_workers) if getattr(model, "stateful", False) else ()


def sample_step(model: Any, key, state, assignment: Assignment):
  """One step's durations ``[m, max_load]`` and the model's next state."""
  if getattr(model, "stateful", False):
    return model.sample_step(key, state, assignment)
  return model.sample(key, assignment), state


def sample_steps(model: Any, key, assignment: Assignment, num_steps: int, state=None):
  """Durations of ``num_steps`` consecutive steps, ``[T, m, max_load]`` (``lax.scan``).

  Step ``t`` draws from ``fold_in(key, t)``; the chain starts at ``state``, or at
  :func:`init_state` (from a split of ``key``) when ``None``. For an i.i.d. model this is
  ``T`` independent draws.
  """
  if state is None:
    k0, key = jax.random.split(key)
    state = init_state(model, k0, assignment.num_workers)

  def body(state, t):
    tau, state = sample_step(model, jax.random.fold_in(key, t), state, assignment)
    return state, tau

  return jax.lax.scan(body, state, jnp.arange(num_steps))[1]

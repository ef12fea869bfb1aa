"""Straggler timing: duration models, state at a time, oracle bound (PROTOCOL.md §4).

Durations are arrays ``τ[..., m, max_load]``: ``τ[..., j, t]`` is how long worker
``j`` takes for the ``t``-th chunk *it processes*. Empty slots and failed workers
have ``τ = inf``. ``F = cumsum(τ, -1)`` are the finish times.

Every model samples through ``jax.random``, so it runs under ``jit``/``vmap`` and
draws a batch of trials with ``shape=(trials,)``.
"""
from __future__ import annotations

import heapq
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgc.assignments import Assignment

__all__ = [
    "ShiftedExponential", "Pareto", "Slowdown", "Failures", "Trace", "get_model",
    "finish_times", "progress", "worker_finish_times", "oracle_time",
    "kth_smallest", "check_durations", "event_loop_completion_time",
    "init_state", "sample_step",
]


def _finalize(tau, assignment: Assignment):
  return jnp.where(jnp.asarray(assignment.slot_mask), tau, jnp.inf).astype(jnp.float32)


class ShiftedExponential(NamedTuple):
  """``τ = shift + Exp(rate)`` per chunk, i.i.d."""
  shift: float = 1.0
  rate: float = 1.0

  def sample(self, key, assignment: Assignment, shape=()):
    full = (*shape, assignment.num_workers, assignment.max_load)
    return _finalize(self.shift + jax.random.exponential(key, full) / self.rate, assignment)


class Pareto(NamedTuple):
  """``τ = scale · U^{-1/alpha}`` per chunk: heavy-tailed, minimum ``scale``."""
  scale: float = 1.0
  alpha: float = 2.0

  def sample(self, key, assignment: Assignment, shape=()):
    full = (*shape, assignment.num_workers, assignment.max_load)
    return _finalize(self.scale * jax.random.pareto(key, self.alpha, full), assignment)


class Slowdown(NamedTuple):
  """``base`` durations; a random ``fraction`` of the workers is ``factor`` times slower.

  Exactly ``round(fraction · m)`` workers are slow in each trial.
  """
  base: Any = ShiftedExponential()
  fraction: float = 0.2
  factor: float = 5.0

  def sample(self, key, assignment: Assignment, shape=()):
    kb, ks = jax.random.split(key)
    tau = self.base.sample(kb, assignment, shape)
    m = assignment.num_workers
    u = jax.random.uniform(ks, (*shape, m))
    rank = jnp.argsort(jnp.argsort(u, axis=-1), axis=-1)
    slow = rank < jnp.round(self.fraction * m)
    return jnp.where(slow[..., None], tau * self.factor, tau)


class Failures(NamedTuple):
  """``base`` durations; each worker independently fails with probability ``p`` (``τ = inf``)."""
  base: Any = ShiftedExponential()
  p: float = 0.1

  def sample(self, key, assignment: Assignment, shape=()):
    kb, kf = jax.random.split(key)
    tau = self.base.sample(kb, assignment, shape)
    failed = jax.random.bernoulli(kf, self.p, (*shape, assignment.num_workers))
    return jnp.where(failed[..., None], jnp.inf, tau)


class Trace:
  """Replays explicit durations ``[..., m, max_load]`` (e.g. measured ones)."""

  def __init__(self, durations):
    self.durations = check_durations(durations)

  def sample(self, key, assignment: Assignment, shape=()):
    del key
    d = jnp.asarray(self.durations, jnp.float32)
    want = (assignment.num_workers, assignment.max_load)
    if d.shape[-2:] != want:
      raise ValueError(
          f"trace durations have trailing shape {d.shape[-2:]}, but the assignment "
          f"needs [..., num_workers, max_load] = [..., {want[0]}, {want[1]}].")
    return _finalize(jnp.broadcast_to(d, (*shape, *want)) if shape else d, assignment)


_MODELS = {
    "shifted_exponential": ShiftedExponential,
    "pareto": Pareto,
    "slowdown": Slowdown,
}


def get_model(name: str, failure_prob: float = 0.0, **params):
  """Builds a model from its config name; ``failure_prob > 0`` wraps it in :class:`Failures`.

  ``slowdown`` takes ``fraction``, ``factor`` and the shifted-exponential ``shift``/``rate``.
  """
  if name not in _MODELS:
    raise ValueError(f"unknown straggler model {name!r}; choose one of {sorted(_MODELS)}.")
  if name == "slowdown":
    base = ShiftedExponential(**{k: params.pop(k) for k in ("shift", "rate") if k in params})
    model = Slowdown(base, **params)
  else:
    model = _MODELS[name](**params)
  for k, v in model._asdict().items():
    if isinstance(v, (int, float)) and not np.isfinite(v):
      raise ValueError(f"straggler model parameter {k}={v} must be finite.")
  if not 0.0 <= failure_prob <= 1.0:
    raise ValueError(f"failure_prob must be in [0, 1], got {failure_prob}.")
  return Failures(model, failure_prob) if failure_prob > 0 else model


# -- models with memory across steps ---------------------------------------------

def init_state(model, key, num_workers: int):
  """The model's state before step 0: ``()`` for i.i.d. models.

  A model that remembers across steps (persistent stragglers) declares
  ``stateful = True`` and implements ``init_state(key, num_workers)`` and
  ``sample_step(key, state, assignment) -> (durations, state)``. The state is a
  pytree of arrays, so it lives in the training state and in checkpoints.
  """
  return model.init_state(key, num_workers) if getattr(model, "stateful", False) else ()


def sample_step(model, key, state, assignment: Assignment):
  """One step's durations ``[m, max_load]`` and the model's next state."""
  if getattr(model, "stateful", False):
    return model.sample_step(key, state, assignment)
  return model.sample(key, assignment), state


# -- state from durations ------------------------------------------------------

def check_durations(durations):
  """Rejects NaN or negative durations when they are concrete (a no-op under ``jit``)."""
  if isinstance(durations, jax.core.Tracer):
    return durations
  d = np.asarray(durations)
  if d.ndim < 2:
    raise ValueError(f"durations must be [..., num_workers, max_load], got shape {d.shape}.")
  if np.isnan(d).any():
    idx = tuple(int(i) for i in np.argwhere(np.isnan(d))[0])
    raise ValueError(
        f"durations contain NaN (first at index {idx}). Use inf for a failed worker "
        "or an empty slot; NaN has no meaning as a time.")
  if (d < 0).any():
    raise ValueError("durations must be non-negative.")
  return durations


def finish_times(durations):
  """``F[..., j, t] = Σ_{u≤t} τ[..., j, u]``."""
  return jnp.cumsum(jnp.asarray(check_durations(durations)), axis=-1)


def progress(durations, t):
  """State at time ``t``: ``k_j = #{t' : F[j, t'] ≤ t}``, int32 ``[..., m]``.

  ``t`` broadcasts against the batch shape ``[...]``. Failed or empty slots never finish.
  """
  f = finish_times(durations)
  t = jnp.asarray(t, f.dtype)[..., None, None]
  return jnp.sum((f <= t) & jnp.isfinite(f), axis=-1, dtype=jnp.int32)


def worker_finish_times(durations, assignment: Assignment):
  """Time at which each worker finishes its whole list, ``F[j, δ_j]``, ``[..., m]``."""
  f = finish_times(durations)
  last = jnp.asarray(np.maximum(assignment.loads - 1, 0))
  out = jnp.take_along_axis(f, jnp.broadcast_to(last[:, None], f.shape[:-1] + (1,)), axis=-1)
  return out[..., 0]


def kth_smallest(x, k: int, axis: int = -1):
  """The ``k``-th smallest (1-based) along ``axis``; ``inf`` if ``k`` exceeds the size."""
  x = jnp.moveaxis(jnp.asarray(x), axis, -1)
  if k > x.shape[-1]:
    return jnp.full(x.shape[:-1], jnp.inf, x.dtype)
  # top_k of -x is a partial sort: cheaper than a full sort when k is small.
  return -jax.lax.top_k(-x, k)[0][..., k - 1]


def oracle_time(durations, assignment: Assignment, ell: int):
  """Lower bound on any protocol: first time the fleet has done ``N·ℓ`` chunk computations.

  Pretends any worker may process any chunk, so the ``(N·ℓ)``-th smallest finish
  time over all slots; ``[...]``.
  """
  f = finish_times(durations)
  f = jnp.where(jnp.asarray(assignment.slot_mask), f, jnp.inf)
  return kth_smallest(f.reshape(*f.shape[:-2], -1), assignment.num_chunks * ell)


def event_loop_completion_time(durations, is_decodable: Callable[[np.ndarray], bool]) -> float:
  """Reference simulator: a Python event loop over chunk completions.

  Pops chunk-finish events in time order, updates the state ``k`` and returns the
  first time ``is_decodable(k)`` holds (``inf`` if never). Slow; for tests and for
  benchmarking the vectorised ``completion_time`` against.
  """
  tau = np.asarray(check_durations(durations), np.float64)
  m, _ = tau.shape
  k = np.zeros(m, np.int64)
  if is_decodable(k):
    return 0.0
  heap = [(tau[j, 0], j) for j in range(m) if np.isfinite(tau[j, 0])]
  heapq.heapify(heap)
  while heap:
    t, j = heapq.heappop(heap)
    k[j] += 1
    if is_decodable(k):
      return float(t)
    if k[j] < tau.shape[1] and np.isfinite(tau[j, k[j]]):
      heapq.heappush(heap, (t + tau[j, k[j]], j))
  return float("inf")

"""From durations to times: finish times, the state at a time, order statistics, the oracle.

``F = cumsum(τ, -1)`` are the finish times; the state at time ``t`` is how many
chunks each worker has finished (PROTOCOL.md §4). A reference event loop checks
the vectorised completion times in tests.
"""
from __future__ import annotations

import heapq
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxgc.assignments import Assignment

__all__ = ["check_durations", "finish_times", "progress", "worker_finish_times",
           "kth_smallest", "oracle_time", "event_loop_completion_time"]


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

"""Uncoded references (PROTOCOL.md §3): each chunk is computed once.

Chunk ``i`` is *designated* to the holder where it comes earliest (ties: lowest
worker), and each worker processes only its designated chunks, in list order.
With a cyclic assignment that is slot 0 of every worker: plain data parallelism.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxgc import timing
from jaxgc.assignments import Assignment
from jaxgc.protocols.base import Protocol


def designated_slots(assignment: Assignment) -> np.ndarray:
  """bool ``[m, max_load]``: the one slot where each chunk is computed."""
  pos = np.where(assignment.positions >= 0, assignment.positions, np.iinfo(np.int32).max)
  owner = np.argmin(pos, axis=0)           # argmin takes the lowest worker on ties
  mask = np.zeros(assignment.order.shape, bool)
  mask[owner, assignment.positions[owner, np.arange(assignment.num_chunks)]] = True
  return mask


class Uncoded(Protocol):
  """Synchronous data parallel: wait until every chunk has been computed once."""

  name = "uncoded"

  def __init__(self, assignment: Assignment, dtype=jnp.float32):
    super().__init__(assignment, 1, dtype)
    self.designated = designated_slots(assignment)
    # r-th designated slot of a worker is its r-th processed chunk.
    self.rank = np.cumsum(self.designated, axis=1) - 1
    self.num_designated = self.designated.sum(axis=1).astype(np.int32)

  def chunks_done(self, counts):
    """bool ``[m, max_load]``: designated slots finished at state ``counts``."""
    return jnp.asarray(self.designated) & (jnp.asarray(self.rank) < jnp.asarray(counts)[:, None])

  def coefficients(self, counts):
    counts = self.check_counts(counts)
    enc = jnp.where(self.chunks_done(counts), 1.0, 0.0)[..., None].astype(self.dtype)
    return enc, self._decoding(counts)

  def _decoding(self, counts):
    return jnp.where(jnp.asarray(counts) > 0, 1.0, 0.0)[None].astype(self.dtype)

  def is_decodable(self, counts):
    return jnp.all(jnp.asarray(counts) >= self.num_designated, axis=-1)

  def coverage(self, counts):
    """Each chunk is covered at most once: by its designated worker."""
    done = self.chunks_done(counts)
    order = np.maximum(self.assignment.order, 0)
    return jnp.zeros(self.assignment.num_chunks, jnp.int32).at[order].add(done.astype(jnp.int32))

  def completion_time(self, durations):
    """``max_j F_{j, u_j}`` over workers with ``u_j`` designated chunks."""
    f = timing.finish_times(durations)
    u = self.num_designated
    last = jnp.asarray(np.maximum(u - 1, 0))
    t = jnp.take_along_axis(f, jnp.broadcast_to(last[:, None], f.shape[:-1] + (1,)), -1)[..., 0]
    return jnp.max(jnp.where(jnp.asarray(u > 0), t, 0.0), axis=-1)


class IgnoreStragglers(Uncoded):
  """Ignore-stragglers SGD (deadline mode): sum whatever designated chunks are done.

  With ``rescale``, the sum is scaled by ``N / #done`` (an unbiased-in-expectation
  estimate of the full sum when stragglers are random).
  """

  name = "ignore_stragglers"

  def __init__(self, assignment: Assignment, rescale: bool = True, dtype=jnp.float32):
    super().__init__(assignment, dtype)
    self.rescale = bool(rescale)

  def _decoding(self, counts):
    dec = super()._decoding(counts)
    if not self.rescale:
      return dec
    done = jnp.sum(self.chunks_done(counts))
    return dec * (self.assignment.num_chunks / jnp.maximum(done, 1)).astype(self.dtype)

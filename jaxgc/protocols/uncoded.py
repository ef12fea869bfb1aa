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
from jaxgc.errors import ParamError
from jaxgc.protocols.base import Coefficients, Protocol

__all__ = ["Uncoded", "IgnoreStragglers", "designated_slots"]


def designated_slots(assignment: Assignment) -> np.ndarray:
  """bool ``[m, max_load]``: the one slot where each chunk is computed."""
  pos = np.where(assignment.positions >= 0, assignment.positions, np.iinfo(np.int32).max)
  owner = np.argmin(pos, axis=0)           # argmin takes the lowest worker on ties
  mask = np.zeros(assignment.order.shape, bool)
  mask[owner, assignment.positions[owner, np.arange(assignment.num_chunks)]] = True
  return mask


class Uncoded(Protocol):
  """Synchronous data parallel: wait until every chunk has been computed once.

  Messages are whole (sums of) chunk gradients, so there is no communication
  parameter: ``ell`` is accepted for the uniform constructor (a sweep can switch
  protocols without special cases) and must be a positive integer, but the
  protocol always works with ``self.ell == 1``. The state ``k_j`` counts the
  designated chunks worker ``j`` has computed.
  """

  name = "uncoded"

  def __init__(self, assignment: Assignment, ell: int = 1, *, dtype=jnp.float32, **options):
    if isinstance(ell, bool) or not isinstance(ell, (int, np.integer)) or ell < 1:
      raise ParamError(f"ell must be a positive integer, got {ell!r}.", "ell")
    super().__init__(assignment, 1, dtype=dtype, **options)
    self.designated = designated_slots(assignment)
    # r-th designated slot of a worker is its r-th processed chunk.
    self.rank = np.cumsum(self.designated, axis=1) - 1
    self.num_designated = self.designated.sum(axis=1).astype(np.int32)

  def finished_slots(self, counts):
    """bool ``[..., m, max_load]``: designated slots computed at state ``counts``."""
    counts = self.check_counts(counts, batched=True, what="finished_slots")
    done = jnp.asarray(self.rank) < jnp.asarray(counts)[..., :, None]
    return jnp.asarray(self.designated) & done

  def solve(self, counts) -> Coefficients:
    counts = self.check_counts(counts)
    finished = self.finished_slots(counts)
    enc = jnp.where(finished, 1.0, 0.0)[..., None].astype(self.dtype)
    senders = jnp.any(finished, axis=-1)
    return Coefficients(enc, self._decoding(senders, finished), senders, jnp.ones((), self.dtype))

  def _decoding(self, senders, finished):
    return jnp.where(senders, 1.0, 0.0)[None].astype(self.dtype)

  def is_decodable(self, counts):
    counts = self.check_counts(counts, batched=True, what="is_decodable")
    return jnp.all(jnp.asarray(counts) >= self.num_designated, axis=-1)

  def coverage(self, counts):
    """Each chunk is covered at most once: by its designated worker. ``[..., N]``."""
    finished = self.finished_slots(counts)
    onehot = jnp.asarray(self.assignment.order)[..., None] == jnp.arange(self.assignment.num_chunks)
    return jnp.sum(finished[..., None] & onehot, axis=(-3, -2), dtype=jnp.int32)

  def completion_time(self, durations):
    """``max_j F_{j, u_j}`` over workers with ``u_j`` designated chunks."""
    f = timing.finish_times(self.check_durations(durations))
    u = self.num_designated
    last = jnp.asarray(np.maximum(u - 1, 0))
    t = jnp.take_along_axis(f, jnp.broadcast_to(last[:, None], f.shape[:-1] + (1,)), -1)[..., 0]
    return jnp.max(jnp.where(jnp.asarray(u > 0), t, 0.0), axis=-1)


class IgnoreStragglers(Uncoded):
  """Ignore-stragglers SGD (deadline mode): sum whatever designated chunks are done.

  With ``rescale``, the sum is scaled by ``N / #done`` (an unbiased-in-expectation
  estimate of the full sum when stragglers are random). It never claims exactness,
  so it has no exact mode (``has_exact_mode = False``).
  """

  name = "ignore_stragglers"
  has_exact_mode = False

  def __init__(self, assignment: Assignment, ell: int = 1, *, rescale: bool = True,
               dtype=jnp.float32, **options):
    super().__init__(assignment, ell, dtype=dtype, **options)
    self.rescale = bool(rescale)

  def _decoding(self, senders, finished):
    dec = super()._decoding(senders, finished)
    if not self.rescale:
      return dec
    done = jnp.sum(finished)
    return dec * (self.assignment.num_chunks / jnp.maximum(done, 1)).astype(self.dtype)

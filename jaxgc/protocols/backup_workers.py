"""Backup workers (PROTOCOL.md §10): synchronous SGD that drops the last ``b`` workers.

Chen et al. 2016; TensorFlow's ``SyncReplicasOptimizer``. Each worker computes one
uncoded chunk, its designated slot (slot 0 of a cyclic assignment). The PS stops
at the ``(m − b)``-th worker finish and sums the received chunk gradients rescaled
by ``N / #received``. It is not exact unless every chunk arrived, and it is biased
when slowness correlates with data.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxgc import timing
from jaxgc.assignments import Assignment
from jaxgc.errors import ParamError
from jaxgc.protocols.base import Coefficients, Protocol
from jaxgc.protocols.uncoded import designated_slots

__all__ = ["BackupWorkers"]


class BackupWorkers(Protocol):
  """Wait for the first ``m − num_backup`` workers' designated chunks; rescale their sum.

  Messages are whole chunk gradients: ``ell`` is accepted for the uniform
  constructor (a positive integer) but the protocol works with ``self.ell == 1``.
  Needs one designated chunk per worker (``N = m``, e.g. a cyclic assignment).
  The stop rule is :meth:`completion_time`; :meth:`is_decodable` (the ``exact``
  metric) holds only once every chunk arrived.
  """

  name = "backup_workers"

  def __init__(self, assignment: Assignment, ell: int = 1, *, num_backup: int = 1,
               dtype=jnp.float32, **options):
    if isinstance(ell, bool) or not isinstance(ell, (int, np.integer)) or ell < 1:
      raise ParamError(f"ell must be a positive integer, got {ell!r}.", "ell")
    super().__init__(assignment, 1, dtype=dtype, **options)
    m = assignment.num_workers
    if (isinstance(num_backup, bool) or not isinstance(num_backup, (int, np.integer))
        or not 0 <= num_backup < m):
      raise ParamError(f"num_backup must be an integer with 0 <= num_backup < num_workers={m}, "
                       f"got {num_backup!r}; the PS waits for num_workers - num_backup workers.",
                       "num_backup")
    self.designated = designated_slots(assignment)
    if not np.all(self.designated.sum(axis=1) == 1):
      raise ValueError(
          f"backup_workers needs exactly one chunk per worker, but this assignment has "
          f"{assignment.num_chunks} chunks on {m} workers; use an assignment with "
          "num_chunks = num_workers (e.g. cyclic).")
    self.num_backup = int(num_backup)
    self.slot = np.argmax(self.designated, axis=1).astype(np.int32)   # [m]

  def received(self, counts):
    """bool ``[..., m]``: worker ``j``'s designated chunk has arrived."""
    counts = self.check_counts(counts, batched=True, what="received")
    return jnp.asarray(counts) > jnp.asarray(self.slot)

  def solve(self, counts) -> Coefficients:
    got = self.received(self.check_counts(counts))
    enc = (jnp.asarray(self.designated) & got[:, None])[..., None].astype(self.dtype)
    scale = self.assignment.num_chunks / jnp.maximum(jnp.sum(got), 1)
    dec = jnp.where(got, scale, 0.0)[None].astype(self.dtype)
    return Coefficients(enc, dec, got, jnp.ones((), self.dtype))

  def is_decodable(self, counts):
    """Exact only when every chunk arrived (the ``exact`` metric stays honest)."""
    return jnp.all(self.received(counts), axis=-1)

  def coverage(self, counts):
    """``[..., N]``: 1 for the chunks that arrived, 0 otherwise."""
    got = self.received(counts).astype(jnp.int32)
    chunk = self.assignment.order[np.arange(self.assignment.num_workers), self.slot]
    return jnp.zeros(got.shape[:-1] + (self.assignment.num_chunks,), jnp.int32).at[
        ..., chunk].add(got)

  def finish_times(self, durations):
    """When each worker's designated chunk arrives, ``[..., m]``."""
    f = timing.finish_times(self.check_durations(durations))
    idx = jnp.broadcast_to(jnp.asarray(self.slot)[:, None], f.shape[:-1] + (1,))
    return jnp.take_along_axis(f, idx, axis=-1)[..., 0]

  def completion_time(self, durations):
    """The ``(m − b)``-th smallest designated finish time, ``[...]``."""
    m = self.assignment.num_workers
    return timing.kth_smallest(self.finish_times(durations), m - self.num_backup)

  def dropped_share(self, counts):
    """Share of the ``N`` chunks not in the estimate at state ``counts``, ``[...]``."""
    return 1.0 - jnp.mean(self.received(counts).astype(jnp.float32), axis=-1)

  def __repr__(self):
    return f"BackupWorkers({self.assignment!r}, num_backup={self.num_backup})"

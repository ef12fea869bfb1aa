"""Approximate gradient coding with graph codes and optimal decoding (PROTOCOL.md §3).

The code of the approximate-gradient-coding literature (Charles, Papailiopoulos &
Ellenberg 2017; Raviv, Tamo, Tandon & Dimakis 2018; Glasgow & Wootters 2021):

* encoding is 0/1: a worker that finished its whole list sends the plain sum of its
  chunk gradients, ``z_j = Σ_{i ∈ π_j} g_i``; partial work is discarded;
* the PS decodes with the least-squares weights over the finished set ``F``,
  ``w = argmin_w ‖B_F w − 1‖`` (``B``: the ``N × m`` chunk×worker biadjacency), the
  minimum-norm one, so ``ĝ = Σ_{j∈F} w_j z_j = Σ_i α_i g_i`` with ``α = B_F w``;
* its error ``‖α − 1‖²`` is Glasgow & Wootters' optimal decoding error; divided by
  ``N`` it is the relative MSE ``E‖ĝ − g‖² / E‖g‖²`` for i.i.d. isotropic chunk
  gradients (:func:`decoding_error`, the per-step metric ``decoding_error``).

It is exact when ``1 ∈ span(B_F)``, e.g. FRC with one finisher per group, or every
worker of a regular assignment. Otherwise it is a deadline-mode code: Raviv et al.
bound ``‖α − 1‖ ≤ (λ₂/d)·√(n s/(n − s))`` (:func:`jaxgc.spectral.raviv_bound`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxgc import timing
from jaxgc.assignments import Assignment
from jaxgc.errors import ParamError
from jaxgc.protocols.base import Coefficients, Protocol, min_norm_decoder

__all__ = ["GraphCode", "decoding_error", "effective_weights"]


def effective_weights(protocol: Protocol, counts):
  """``R[r, i, k]``: block ``r`` of the estimate is ``Σ_{i,k} R[r,i,k] g_i^{(k)}``; ``[ℓ, N, ℓ]``.

  ``R = dec · coef`` from the protocol's own coefficients at state ``counts`` ``[m]``;
  exact recovery is ``R[r, i, k] = [r = k]``.
  """
  asg = protocol.assignment
  enc, dec = protocol.coefficients(counts)[:2]                     # [m, δ, ℓ], [ℓ, m]
  rows = jnp.arange(asg.num_workers)[:, None]
  coef = jnp.zeros((asg.num_workers, asg.num_chunks, enc.shape[-1]), enc.dtype)
  coef = coef.at[rows, jnp.asarray(np.maximum(asg.order, 0))].add(
      jnp.where(jnp.asarray(asg.slot_mask)[..., None], enc, 0))
  return jnp.einsum("rj,jik->rik", dec, coef)


def decoding_error(protocol: Protocol, counts):
  """``‖R − E‖_F² / (Nℓ)``: ``E‖ĝ − g‖² / E‖g‖²`` for i.i.d. isotropic chunk gradients.

  Any protocol, one state ``counts`` ``[m]`` (``vmap`` for a batch). For ``ℓ = 1``
  it is ``‖α − 1‖² / N`` with ``α_i`` the weight chunk ``i`` gets in the estimate.
  """
  r = effective_weights(protocol, counts)
  ell, n = r.shape[0], r.shape[1]
  return jnp.sum((r - jnp.eye(ell, dtype=r.dtype)[:, None, :]) ** 2) / (n * ell)


class GraphCode(Protocol):
  """0/1 graph code on any assignment, decoded optimally by least squares; ``ℓ = 1``.

  Args:
    assignment: any; the literature uses sparse regular graphs
      (:func:`jaxgc.assignments.random_regular`, :func:`jaxgc.assignments.expander`).
    ell: must be 1 (each finished worker sends one full-length sum).
    dtype: arithmetic of the least-squares solve.

  A state is decodable when ``‖α − 1‖ ≤ 100·eps·√N`` (``eps`` of ``dtype``). That sits
  between the round-off of an exact solve (``O(eps·cond)``) and the error of an
  inexact one, which the integer structure of a 0/1 system keeps well away from 0 at
  the sizes used here; the tests check the decision against numpy's float64 optimum.
  """

  name = "graph_code"
  reports_condition = True

  def __init__(self, assignment: Assignment, ell: int = 1, *, dtype=jnp.float32, **options):
    if ell != 1:
      raise ParamError(
          f"graph_code sends the plain sum of a worker's chunk gradients, so ell must be 1, "
          f"got ell={ell!r}. For ell > 1 use partial_straggler (any ell, uses partial work) "
          "or original (construction='polynomial').", "ell")
    super().__init__(assignment, 1, dtype=dtype, **options)
    self.chunk_matrix = jnp.asarray(assignment.biadjacency.T, self.dtype)   # B: [N, m]
    self.tol = float((100 * jnp.finfo(self.dtype).eps) ** 2)

  def done(self, counts, what: str = "done"):
    """bool ``[..., m]``: worker finished its whole list (only those send)."""
    counts = self.check_counts(counts, batched=True, what=what)
    return self.assignment.finished_workers(counts)

  def weights(self, done):
    """Least-squares ``w = argmin ‖B_F w − 1‖`` (minimum norm), ``[..., m]``, 0 outside ``F``.

    ``done``: bool ``[..., m]``, the finished set ``F``.
    """
    done = jnp.asarray(done)
    n = self.assignment.num_chunks

    def one(f):
      coef = jnp.where(f[:, None], self.chunk_matrix.T, 0)[:, :, None]   # [m, N, 1]
      return min_norm_decoder(coef, jnp.ones((1, n, 1), self.dtype))[0]
    flat = done.reshape(-1, done.shape[-1])
    w = jax.vmap(one)(flat).reshape(done.shape).astype(self.dtype)
    # The SVD leaves round-off on the zeroed columns; a silent worker must get exactly 0.
    return jnp.where(done, w, 0)

  def chunk_weights(self, counts):
    """``α = B_F w``: the weight of each chunk in the estimate, ``[..., N]``."""
    return self.weights(self.done(counts, "chunk_weights")) @ self.chunk_matrix.T

  def optimal_error(self, counts):
    """Glasgow & Wootters' optimal decoding error ``min_w ‖B_F w − 1‖² = ‖α − 1‖²``, ``[...]``."""
    return self._squared_error(self.done(counts, "optimal_error"))

  def _squared_error(self, done):
    alpha = self.weights(done) @ self.chunk_matrix.T
    return jnp.sum((alpha - 1) ** 2, axis=-1)

  def decoding_error(self, counts):
    """``‖α − 1‖² / N`` (the relative MSE for isotropic gradients), ``[...]``.

    The same value as the module's :func:`decoding_error` for this protocol, batched.
    """
    return self.optimal_error(counts) / self.assignment.num_chunks

  def solve(self, counts) -> Coefficients:
    """0/1 encoding on finished workers, ``dec = wᵀ``, condition of ``B_F`` on its rank."""
    counts = self.check_counts(counts)
    done = self.assignment.finished_workers(counts)
    enc = jnp.where(done[:, None] & jnp.asarray(self.assignment.slot_mask), 1, 0)
    w = self.weights(done)
    mat = jnp.where(done[None, :], self.chunk_matrix, 0)
    s = jnp.linalg.svd(mat, compute_uv=False)
    # min_norm_decoder's cutoff: the singular values the solve keeps.
    kept = s > max(mat.shape) * jnp.finfo(self.dtype).eps * s[0]
    cond = jnp.where(jnp.any(kept), s[0] / jnp.min(jnp.where(kept, s, jnp.inf)), 1.0)
    return Coefficients(enc[..., None].astype(self.dtype), w[None], done, cond.astype(self.dtype))

  def is_decodable(self, counts):
    """``1 ∈ span(B_F)``, numerically ``‖α − 1‖²/N ≤ (100·eps)²``, ``[...]``."""
    err = self._squared_error(self.done(counts, "is_decodable"))
    return err / self.assignment.num_chunks <= self.tol

  def completion_time(self, durations):
    """First time the finished set's columns span ``1``, ``[...]``; ``inf`` if never.

    The finished set grows along the workers sorted by full-list finish time, and
    the least-squares error only falls as columns are added, so a binary search on
    the prefix length needs ``⌈log₂(m+1)⌉`` batched least-squares solves, not ``m``.
    Ties are harmless: at a tied time all tied workers are finished together.
    """
    t = timing.worker_finish_times(self.check_durations(durations), self.assignment)   # [..., m]
    m = self.assignment.num_workers
    rank = jnp.argsort(jnp.argsort(t, axis=-1), axis=-1)
    finite = jnp.isfinite(t)
    n = self.assignment.num_chunks

    def bisect(_, bounds):
      lo, hi = bounds          # prefix lo is not decodable (0: empty), prefix hi is (m+1: never)
      mid = (lo + hi) // 2
      ok = self._squared_error((rank < mid[..., None]) & finite) / n <= self.tol
      return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)
    start = (jnp.zeros(t.shape[:-1], jnp.int32), jnp.full(t.shape[:-1], m + 1, jnp.int32))
    _, hi = jax.lax.fori_loop(0, math.ceil(math.log2(m + 1)), bisect, start)
    t_sorted = jnp.sort(t, axis=-1)
    at = jnp.take_along_axis(t_sorted, jnp.minimum(hi, m)[..., None] - 1, axis=-1)[..., 0]
    return jnp.where(hi <= m, at, jnp.inf)

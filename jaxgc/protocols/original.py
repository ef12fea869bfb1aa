"""The "original class" of gradient codes (PROTOCOL.md §3): finished or failed.

A worker counts only once it has processed its whole list; partial work is
discarded. With replication ``r`` and ``ℓ``, any ``m − s`` finished workers
suffice, ``s = r − ℓ``. Constructions:

* ``frc``: fractional repetition (Tandon et al.), ``ℓ = 1``: a worker sends the sum of
  its group's chunks; one finished worker per group suffices.
* ``tandon``: ``ℓ = 1``. Rows ``b_j`` (supported on worker ``j``'s chunks, ``b_j[first] = 1``)
  solve ``H b_j = 0`` for a random ``H ∈ R^{s×N}`` with ``H·1 = 0``, so any ``m − s``
  rows span ``null(H) ∋ 1``. Decoded by ``a = lstsq(B_F^T, 1)``. Of several random
  ``H``, the best conditioned is kept.
* ``polynomial``: Ye & Abbe, any ``ℓ``. ``q_i(x) = Π_{j∉W(i)} (x − α_j) · r_i(x)``, the top
  ``ℓ`` coefficients of ``q_i`` equal to ``g_i^{(1..ℓ)}``; worker ``j`` sends
  ``Σ_i q_i(α_j)``, and the PS interpolates (Vandermonde, monomial basis) from ``m − s``
  values. Chebyshev points. Deliberately the real construction: its decode error
  grows quickly with ``m``.

Below the threshold (deadline mode) every construction decodes with the optimal
least-squares decoder ``min ‖dec · M_F − E‖``.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxgc import timing
from jaxgc.assignments import Assignment
from jaxgc.errors import ParamError
from jaxgc.protocols.base import Coefficients, Protocol, min_norm_decoder

__all__ = ["Original", "CONSTRUCTIONS", "frc_groups", "chebyshev_points",
           "polynomial_coefficients", "tandon_coefficients"]

CONSTRUCTIONS = ("auto", "frc", "tandon", "polynomial")


def frc_groups(assignment: Assignment) -> np.ndarray | None:
  """Group id per worker if the assignment is a fractional repetition, else ``None``.

  Groups: workers with identical chunk sets; sets of different groups are disjoint.
  """
  _, group = np.unique(assignment.biadjacency, axis=0, return_inverse=True)
  group = group.reshape(-1)
  sizes = np.bincount(group)
  per_chunk = group[assignment.holders[0][:, 0]]
  ok = all(np.all(group[w[w >= 0]] == per_chunk[i]) for i, w in enumerate(assignment.holders[0]))
  return group if ok and np.all(sizes == assignment.replication[0]) else None


def chebyshev_points(m: int) -> np.ndarray:
  """``α_j = cos((2j+1)π / 2m)``: the best-conditioned real nodes for interpolation."""
  return np.cos((2 * np.arange(m) + 1) * np.pi / (2 * m))


def polynomial_coefficients(assignment: Assignment, ell: int, alpha: np.ndarray,
                            dtype) -> np.ndarray:
  """``C[j, i, k]`` with ``q_i(α_j) = Σ_k C[j,i,k] g_i^{(k)}``, computed in ``dtype``."""
  m, n_chunks = assignment.num_workers, assignment.num_chunks
  a = alpha.astype(dtype)
  coef = np.zeros((m, n_chunks, ell), dtype)
  held = assignment.biadjacency
  powers = a[:, None] ** np.arange(ell - 1, -1, -1, dtype=dtype)[None]  # [m, ℓ]: α^{ℓ-1..0}
  # The top ℓ coefficients of every chunk's monic Π_{u∉W(i)} (x − α_u), descending
  # powers, all chunks at once: a product's top coefficients depend only on its
  # factors' top ones, so the other m − ℓ are never formed (same arithmetic, same order).
  top = np.zeros((n_chunks, ell), dtype)
  top[:, 0] = 1
  for u in range(m):
    shifted = np.concatenate([np.zeros((n_chunks, 1), dtype), top[:, :-1]], axis=1)
    top = np.where(held[u][:, None], top, top + shifted * -a[u]).astype(dtype)
  for i in range(n_chunks):
    roots = a[~held[:, i]]
    p = top[i]
    toeplitz = np.zeros((ell, ell), dtype)  # g = T ρ', ρ' = (ρ_{ℓ-1}, …, ρ_0)
    for r in range(ell):
      toeplitz[r, : r + 1] = p[r::-1]
    tinv = np.linalg.inv(toeplitz).astype(dtype)
    (w,) = np.nonzero(held[:, i])
    pi_at = np.prod(a[w][:, None] - roots[None, :], axis=1, dtype=dtype)
    coef[w, i] = pi_at[:, None] * (powers[w] @ tinv)
  return coef


def _tandon_rows(assignment: Assignment, h: np.ndarray) -> np.ndarray:
  """``B [m, N]``: ``b_j`` on worker ``j``'s chunks, ``b_j[first] = 1``, ``H b_j = 0``."""
  s = h.shape[0]
  b = np.zeros((assignment.num_workers, assignment.num_chunks))
  for j, chunks in enumerate(assignment.lists()):
    first, rest = chunks[0], chunks[1:]
    b[j, first] = 1.0
    if s:
      if len(rest) < s:
        raise ValueError(f"worker {j} holds {len(chunks)} chunks; the Tandon code needs "
                         f"at least s+1={s + 1} to tolerate s={s} stragglers.")
      b[j, rest] = np.linalg.lstsq(h[:, rest], -h[:, first], rcond=None)[0]
  return b


def _worst_condition(b: np.ndarray, s: int, rng, exhaustive: int = 2048,
                     samples: int = 128) -> float:
  """Worst ``cond(B_F)`` over finisher sets ``|F| = m − s``: all of them, when there
  are at most ``exhaustive``, else ``samples`` random ones."""
  m = b.shape[0]
  if s == 0:
    return float(np.linalg.cond(b))
  drops: Iterable[Any]
  if math.comb(m, s) <= exhaustive:
    drops = itertools.combinations(range(m), s)
  else:
    drops = (rng.choice(m, s, replace=False) for _ in range(samples))
  keep = [np.setdiff1d(np.arange(m), list(d)) for d in drops]
  return float(np.max(np.linalg.cond(np.stack([b[k] for k in keep]))))


def tandon_coefficients(assignment: Assignment, s: int, seed: int,
                        num_candidates: int = 8) -> np.ndarray:
  """``B[j, i]`` of Tandon et al.'s construction as ``[m, N, 1]`` (float64).

  ``H`` is random, and some draws leave ``B_F`` with condition numbers of 1e7
  (float32 decoding then fails). Of ``num_candidates`` draws, the one with the
  smallest worst ``cond(B_F)`` over (sampled) finisher sets is kept.
  """
  if num_candidates < 1:
    raise ParamError(f"num_candidates must be >= 1, got {num_candidates}.", "num_candidates")
  rng = np.random.default_rng(seed)
  best: np.ndarray | None = None
  best_cond = np.inf
  for _ in range(num_candidates):
    h = rng.standard_normal((s, assignment.num_chunks))
    h[:, -1] = -h[:, :-1].sum(axis=1)
    b = _tandon_rows(assignment, h)
    cond = _worst_condition(b, s, rng)
    # The first draw is kept even when every condition number is inf or NaN.
    if best is None or cond < best_cond:
      best, best_cond = b, cond
  assert best is not None       # num_candidates >= 1
  return best[:, :, None]


class Original(Protocol):
  """The original gradient-coding protocols: exact once ``m − s`` workers finish.

  Args:
    assignment: needs equal replication ``r`` for every chunk; ``s = r − ℓ``.
    ell: communication parameter.
    construction: ``"auto"`` (``frc`` for a fractional-repetition assignment with
      ``ℓ = 1``, else ``tandon`` for ``ℓ = 1``, else ``polynomial``), or one of them.
    seed: for Tandon's random ``H``.
    dtype: arithmetic of the coefficients and of the decode.
  """

  name = "original"

  def __init__(self, assignment: Assignment, ell: int = 1, *, construction: str = "auto",
               seed: int = 0, dtype=jnp.float32, **options):
    super().__init__(assignment, ell, dtype=dtype, **options)
    rep = assignment.replication
    if rep.min() != rep.max():
      raise ValueError(
          "the original gradient codes need every chunk held by the same number of "
          f"workers; replication ranges over {int(rep.min())}..{int(rep.max())}. Use a "
          "regular assignment (cyclic, fractional_repetition, random_regular), or "
          "PartialStraggler, which handles any assignment.")
    self.straggler_tolerance = int(rep[0]) - self.ell
    if construction not in CONSTRUCTIONS:
      raise ParamError(f"unknown construction {construction!r}; choose one of {CONSTRUCTIONS}.",
                       "construction")
    groups = frc_groups(assignment)
    if construction == "auto":
      construction = ("frc" if groups is not None and ell == 1
                      else "tandon" if ell == 1 else "polynomial")
    if construction in ("frc", "tandon") and ell != 1:
      raise ParamError(f"the {construction} code has ell=1; use construction='polynomial' "
                       f"for ell={ell}.", "ell")
    if construction == "frc" and groups is None:
      raise ParamError("construction='frc' needs a fractional-repetition assignment "
                       "(jaxgc.assignments.fractional_repetition).", "construction")
    self.construction = construction
    self.groups = groups
    self.num_groups = 0 if groups is None else int(groups.max()) + 1
    np_dtype = np.dtype(self.dtype.name)
    if construction == "frc":
      coef = assignment.biadjacency[:, :, None].astype(np_dtype)
    elif construction == "tandon":
      coef = tandon_coefficients(assignment, self.straggler_tolerance, seed).astype(np_dtype)
    else:
      self.points = chebyshev_points(assignment.num_workers)
      coef = polynomial_coefficients(assignment, self.ell, self.points, np_dtype)
    self.coef = jnp.asarray(coef, self.dtype)                       # [m, N, ℓ]

  @property
  def threshold(self) -> int:
    """``m − s``: finished workers needed for exact recovery."""
    return self.assignment.num_workers - self.straggler_tolerance

  def solve(self, counts) -> Coefficients:
    """Workers that finished their whole list send; the rest count as stragglers."""
    counts = self.check_counts(counts)
    done = self.assignment.finished_workers(counts)
    enc = self.slot_coefficients(self.coef, done[:, None] & jnp.asarray(self.assignment.slot_mask))
    # pinv leaves O(eps) weights on non-senders; exact zeros keep their garbage (NaN) out.
    dec = jnp.where(done[None, :], self._decoding(done), 0).astype(self.dtype)
    return Coefficients(enc, dec, done, jnp.ones((), self.dtype))

  def _frc_groups(self) -> np.ndarray:
    """Each worker's FRC group; ``__init__`` refuses ``construction="frc"`` without them."""
    if self.groups is None:
      raise ValueError("this Original code has no FRC groups: it was built with "
                       f"construction={self.construction!r}, not 'frc'.")
    return self.groups

  def _decoding(self, done):
    if self.construction == "frc":
      g = jnp.asarray(self._frc_groups())
      per_group = jnp.zeros(self.num_groups, jnp.int32).at[g].add(done.astype(jnp.int32))
      return (done / jnp.maximum(per_group[g], 1))[None].astype(self.dtype)
    coef = jnp.where(done[:, None, None], self.coef, 0)
    target = jnp.broadcast_to(jnp.eye(self.ell, dtype=self.dtype)[:, None, :],
                              (self.ell, self.assignment.num_chunks, self.ell))
    lstsq = min_norm_decoder(coef, target).astype(self.dtype)
    if self.construction == "tandon":
      return lstsq                        # Tandon's own decoder is this least squares
    exact = self._interpolate(done)
    return jnp.where(jnp.sum(done) >= self.threshold, exact, lstsq)

  def _interpolate(self, done):
    """Rows of ``V_F^{-1}`` giving the top ``ℓ`` coefficients of ``p = Σ_i q_i``."""
    n, m = self.threshold, self.assignment.num_workers
    first = jnp.argsort(~done, stable=True)[:n]        # the first n finished workers
    x = jnp.asarray(self.points, self.dtype)[first]
    vander = x[:, None] ** jnp.arange(n, dtype=self.dtype)[None]
    top = jnp.arange(self.ell)
    pick = jnp.zeros((n, self.ell), self.dtype).at[n - 1 - top, top].set(1)
    rows = jnp.linalg.solve(vander.T, pick)            # [n, ℓ]: column k = row n-1-k of V^{-1}
    return jnp.zeros((self.ell, m), self.dtype).at[:, first].set(rows.T)

  def is_decodable(self, counts):
    counts = self.check_counts(counts, batched=True, what="is_decodable")
    done = self.assignment.finished_workers(counts)
    if self.construction == "frc":
      groups = self._frc_groups()
      onehot = jnp.asarray(groups)[:, None] == jnp.arange(int(groups.max()) + 1)[None]
      return jnp.all(jnp.any(done[..., :, None] & onehot, axis=-2), axis=-1)
    return jnp.sum(done, axis=-1) >= self.threshold

  def completion_time(self, durations):
    """FRC: ``max_groups min_{j∈group} F_j``; else the ``(m−s)``-th smallest ``F_j``."""
    t = timing.worker_finish_times(self.check_durations(durations), self.assignment)
    if self.construction == "frc":
      g = self._frc_groups()
      per_group = jnp.stack([jnp.min(t[..., g == k], axis=-1) for k in range(int(g.max()) + 1)], -1)
      return jnp.max(per_group, axis=-1)
    return timing.kth_smallest(t, self.threshold)

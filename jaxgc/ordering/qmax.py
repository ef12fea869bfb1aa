"""``Q_max`` in closed form, by brute force over states, and over all orderings.

``Q(π) = 1 + max_i term_i``, ``term_i = Σ_{j∉W(i)} δ_j + Σ_{j∈W(i)} (pos_j(i) − 1)
+ top_{ℓ−1}(δ_j − pos_j(i) + 1 : j ∈ W(i))`` (PROTOCOL.md §5).
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from jaxgc.assignments import Assignment

__all__ = [
    "MAX_STATES",
    "MAX_ORDERINGS",
    "chunk_terms",
    "q_max",
    "q_max_brute_force",
    "q_max_all_orderings",
    "exhaustive_optimum",
    "orderings_count",
    "terms",
    "topk_sum",
]

MAX_STATES = 2_000_000       # q_max_brute_force refuses more states than this
MAX_ORDERINGS = 500_000      # q_max_all_orderings refuses more orderings than this
# Work arrays of the enumerations are cut into batches of about this many int64s.
STATE_BATCH_ELEMENTS = 4_000_000
ORDERING_BATCH_ELEMENTS = 2_000_000


def topk_sum(x: np.ndarray, k: int, axis: int) -> np.ndarray:
  """Sum of the ``k`` largest entries along ``axis`` (0 when ``k = 0``)."""
  if k == 0:
    return np.zeros(np.delete(x.shape, axis % x.ndim), x.dtype)
  part = -np.partition(-x, k - 1, axis=axis)
  return np.take(part, np.arange(k), axis=axis).sum(axis=axis)


def terms(pos0: np.ndarray, loads: np.ndarray, k: int) -> np.ndarray:
  """``term_i`` ``[..., N]`` for 0-based positions ``pos0[..., m, N]`` (−1 = not held),
  ``k = ℓ−1``."""
  held = pos0 >= 0
  lj = loads.astype(np.int64)[:, None]
  outside = np.where(held, 0, lj).sum(axis=-2)
  base = np.where(held, pos0, 0).sum(axis=-2)
  # Holders' gains are ≥ 1 and k < |W(i)|, so the zero padding is never among the top k.
  gains = np.where(held, lj - pos0, 0)
  return outside + base + topk_sum(gains, k, axis=-2)


def chunk_terms(assignment: Assignment, ell: int = 1) -> np.ndarray:
  """``term_i`` of every chunk, int64 ``[N]``; ``Q = 1 + max_i term_i``."""
  assignment.check_ell(ell)
  return terms(assignment.positions.astype(np.int64), assignment.loads, ell - 1)


def q_max(assignment: Assignment, ell: int = 1) -> int:
  """``Q(π)`` of the assignment's ordering, by the closed form of §5.

  ``Q = 1 + max_i [Σ_{j∉W(i)} δ_j + Σ_{j∈W(i)} (pos_j(i)−1) + top_{ℓ−1}(δ_j − pos_j(i) + 1)]``.
  Valid for any assignment (any loads, any replication).
  """
  return 1 + int(chunk_terms(assignment, ell).max())


def q_max_brute_force(assignment: Assignment, ell: int = 1, max_states: int = MAX_STATES) -> int:
  """``Q`` by enumerating every state ``0 ≤ k_j ≤ δ_j``: ``1 + max Σ k`` over undecodable ones.

  For tests and tiny instances; raises ``ValueError`` beyond ``max_states`` states.
  """
  assignment.check_ell(ell)
  radix = assignment.loads.astype(np.int64) + 1
  total = math.prod(int(r) for r in radix)
  if total > max_states:
    raise ValueError(
        f"q_max_brute_force would enumerate {total} states (> max_states={max_states}); "
        "use q_max, the closed form, for this assignment.")
  pos = assignment.positions.astype(np.int64)
  held = pos >= 0
  batch = max(1, min(total, STATE_BATCH_ELEMENTS // max(1, assignment.num_chunks)))
  worst = -1
  for start in range(0, total, batch):
    idx = np.arange(start, min(total, start + batch))
    k = np.stack(np.unravel_index(idx, tuple(radix)), axis=-1)  # [B, m]
    cov = np.zeros((len(idx), assignment.num_chunks), np.int64)
    for j in range(assignment.num_workers):
      cov += held[j] & (pos[j] < k[:, j:j + 1])
    bad = cov.min(axis=1) < ell
    if bad.any():
      worst = max(worst, int(k[bad].sum(axis=1).max()))
  return worst + 1


def orderings_count(assignment: Assignment) -> int:
  """``Π_j δ_j!``: how many orderings the chunk sets allow."""
  return math.prod(math.factorial(int(d)) for d in assignment.loads)


def q_max_all_orderings(assignment: Assignment, ell: int = 1,
                        max_orderings: int = MAX_ORDERINGS) -> np.ndarray:
  """``Q`` of every ordering (product over workers of permutations of its list).

  Returns int64 ``[Π_j δ_j!]``, in lexicographic order of the per-worker
  permutations of the current lists. Raises ``ValueError`` beyond ``max_orderings``.
  """
  assignment.check_ell(ell)
  total = orderings_count(assignment)
  if total > max_orderings:
    raise ValueError(
        f"{total} orderings exceed max_orderings={max_orderings}; exhaustive search is "
        "for tiny instances only. Use optimize(..., method='milp') instead.")
  m, n = assignment.num_workers, assignment.num_chunks
  rows = []  # rows[j]: [δ_j!, N] 0-based positions of each chunk under each permutation
  for chunks in assignment.lists():
    perms = list(itertools.permutations(chunks)) or [()]
    p = np.full((len(perms), n), -1, np.int64)
    for r, perm in enumerate(perms):
      p[r, list(perm)] = np.arange(len(perm))
    rows.append(p)
  sizes = tuple(len(r) for r in rows)
  out = np.empty(total, np.int64)
  batch = max(1, ORDERING_BATCH_ELEMENTS // (m * n))
  for start in range(0, total, batch):
    idx = np.arange(start, min(total, start + batch))
    sel = np.unravel_index(idx, sizes)
    pos0 = np.stack([rows[j][sel[j]] for j in range(m)], axis=1)  # [B, m, N]
    out[start:start + len(idx)] = 1 + terms(pos0, assignment.loads, ell - 1).max(axis=-1)
  return out


def exhaustive_optimum(assignment: Assignment, ell: int = 1,
                       max_orderings: int = MAX_ORDERINGS) -> int:
  """``min_π Q(π)`` over all orderings of the given chunk sets (tiny instances only)."""
  return int(q_max_all_orderings(assignment, ell, max_orderings).min())

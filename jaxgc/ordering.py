"""Chunk ordering: ``Q_max`` and orderings that minimise it (PROTOCOL.md §5).

An assignment fixes *which* chunks worker ``j`` holds; the ordering fixes the
order ``π_j`` in which it processes them. ``Q(π)`` is the smallest number of
chunk computations after which every state is decodable (every ``c_i ≥ ℓ``):

  ``Q(π) = 1 + max_i term_i``,  ``term_i = Σ_{j∉W(i)} δ_j + Σ_{j∈W(i)} (pos_j(i) − 1)
  + (sum of the ℓ−1 largest gains δ_j − pos_j(i) + 1 over j ∈ W(i))``.

``term_i`` is the largest total work of a state in which chunk ``i`` is
covered fewer than ``ℓ`` times: every non-holder finishes, ``ℓ−1`` holders
finish (those that gain the most by doing so) and every other holder stops
just before chunk ``i``.

Functions here are static NumPy / SciPy (HiGHS); an ordering is chosen once,
before training, and returned as a new :class:`~jaxgc.assignments.Assignment`
with the same chunk set per worker.
"""
from __future__ import annotations

import itertools
import math
import time
from typing import NamedTuple

import numpy as np

from jaxgc.assignments import Assignment

__all__ = [
    "METHODS",
    "OrderingInfo",
    "chunk_terms",
    "q_max",
    "q_max_brute_force",
    "q_lower_bound",
    "q_max_all_orderings",
    "exhaustive_optimum",
    "coloring",
    "shuffled",
    "optimize",
    "optimize_with_info",
]

METHODS = ("auto", "coloring", "milp", "local_search")

# `auto` uses the MILP when it has at most this many placement binaries Σ_j δ_j².
MILP_MAX_BINARIES = 2500
# The configuration bound enumerates multisets of positions; skip it beyond this.
_CONFIG_MAX_MULTISETS = 20_000


class OrderingInfo(NamedTuple):
  """Certificate of an ordering.

  Attributes:
    method: what produced it: ``"coloring"``, ``"milp"``, ``"local_search"``, or
      ``"input"`` (the given order was kept).
    q: ``Q_max`` of the returned ordering.
    lower_bound: a proven lower bound on ``min_π Q(π)`` for this chunk set.
    optimal: ``q`` is certified minimal (``q == lower_bound``).
    gap: ``q − lower_bound`` (0 when certified).
  """
  method: str
  q: int
  lower_bound: int
  optimal: bool
  gap: int


# -- Q_max ------------------------------------------------------------------

def _topk_sum(x: np.ndarray, k: int, axis: int) -> np.ndarray:
  """Sum of the ``k`` largest entries along ``axis`` (0 when ``k = 0``)."""
  if k == 0:
    return np.zeros(np.delete(x.shape, axis % x.ndim), x.dtype)
  part = -np.partition(-x, k - 1, axis=axis)
  return np.take(part, np.arange(k), axis=axis).sum(axis=axis)


def _terms(pos0: np.ndarray, loads: np.ndarray, k: int) -> np.ndarray:
  """``term_i`` for 0-based positions ``pos0[..., m, N]`` (−1 = not held)."""
  held = pos0 >= 0
  lj = loads.astype(np.int64)[:, None]
  outside = np.where(held, 0, lj).sum(axis=-2)
  base = np.where(held, pos0, 0).sum(axis=-2)
  # Holders' gains are ≥ 1 and k < |W(i)|, so the zero padding is never among the top k.
  gains = np.where(held, lj - pos0, 0)
  return outside + base + _topk_sum(gains, k, axis=-2)


def chunk_terms(assignment: Assignment, ell: int = 1) -> np.ndarray:
  """``term_i`` of every chunk, int64 ``[N]``; ``Q = 1 + max_i term_i``."""
  assignment.check_ell(ell)
  return _terms(assignment.positions.astype(np.int64), assignment.loads, ell - 1)


def q_max(assignment: Assignment, ell: int = 1) -> int:
  """``Q(π)`` of the assignment's ordering, by the closed form of §5.

  ``Q = 1 + max_i [Σ_{j∉W(i)} δ_j + Σ_{j∈W(i)} (pos_j(i)−1) + top_{ℓ−1}(δ_j − pos_j(i) + 1)]``.
  Valid for any assignment (any loads, any replication).
  """
  return 1 + int(chunk_terms(assignment, ell).max())


def q_max_brute_force(assignment: Assignment, ell: int = 1,
                      max_states: int = 2_000_000) -> int:
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
  batch = max(1, min(total, 4_000_000 // max(1, assignment.num_chunks)))
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


# -- exhaustive search (tests, tiny instances) ------------------------------

def _orderings_count(assignment: Assignment) -> int:
  return math.prod(math.factorial(int(d)) for d in assignment.loads)


def q_max_all_orderings(assignment: Assignment, ell: int = 1,
                        max_orderings: int = 500_000) -> np.ndarray:
  """``Q`` of every ordering (product over workers of permutations of its list).

  Returns int64 ``[Π_j δ_j!]``, in lexicographic order of the per-worker
  permutations of the current lists. Raises ``ValueError`` beyond ``max_orderings``.
  """
  assignment.check_ell(ell)
  total = _orderings_count(assignment)
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
  batch = max(1, 2_000_000 // (m * n))
  for start in range(0, total, batch):
    idx = np.arange(start, min(total, start + batch))
    sel = np.unravel_index(idx, sizes)
    pos0 = np.stack([rows[j][sel[j]] for j in range(m)], axis=1)  # [B, m, N]
    out[start:start + len(idx)] = 1 + _terms(pos0, assignment.loads, ell - 1).max(axis=-1)
  return out


def exhaustive_optimum(assignment: Assignment, ell: int = 1,
                       max_orderings: int = 500_000) -> int:
  """``min_π Q(π)`` over all orderings of the given chunk sets (tiny instances only)."""
  return int(q_max_all_orderings(assignment, ell, max_orderings).min())


# -- lower bounds -------------------------------------------------------------

def _per_chunk_bound(assignment: Assignment, k: int) -> int:
  """``max_i [Σ_{j∉W(i)} δ_j + top_k(δ_j : j∈W(i))]``.

  Moving chunk ``i`` one slot later at holder ``j`` adds 1 to ``pos_j(i)−1``
  and removes at most 1 from the top-k gains, so ``term_i`` is smallest when
  ``i`` is first at all its holders.
  """
  held = assignment.biadjacency
  lj = assignment.loads.astype(np.int64)[:, None]
  outside = np.where(held, 0, lj).sum(0)
  return int((outside + _topk_sum(np.where(held, lj, 0), k, axis=0)).max())


def _averaging_bound(assignment: Assignment, k: int) -> float:
  """Uniform average over chunks of a linear lower bound on ``term_i``.

  Proof. The mean of the ``k`` largest of ``r_i`` numbers is at least their
  mean, so with ``a_i = 1 − k/r_i ∈ (0, 1]`` and gains ``g = δ_j − p_j + 1``:

    ``term_i ≥ Σ_{j∉W(i)} δ_j + (k/r_i) Σ_{j∈W(i)} δ_j + a_i Σ_{j∈W(i)} (p_j(i) − 1) =: C_i + a_i Σ_j (p_j(i)−1)``.

  Hence ``max_i term_i ≥ (1/N) Σ_i term_i ≥ (1/N)[Σ_i C_i + Σ_j Σ_{i∈π_j} a_i (p_j(i)−1)]``.
  The last sum is separable over workers, and for each worker the positions
  ``p_j(i) − 1`` are a permutation of ``0..δ_j−1``; by the rearrangement
  inequality it is at least the value with the ``a_i`` sorted in decreasing
  order against ``0, 1, …, δ_j−1``. This minimum holds for every ordering, so
  it bounds ``min_π max_i term_i``. For a ``δ``-regular graph with ``N = m``
  and ``ℓ = 1`` it equals ``(m−δ)δ + δ(δ−1)/2``, which the colouring attains.
  """
  held = assignment.biadjacency
  n = assignment.num_chunks
  lj = assignment.loads.astype(np.float64)[:, None]
  r = assignment.replication.astype(np.float64)
  a = 1.0 - k / r
  c = (np.where(held, 0.0, lj).sum(0) + (k / r) * np.where(held, lj, 0.0).sum(0)).sum()
  for chunks in assignment.lists():
    coef = np.sort(a[chunks])[::-1]
    c += float(coef @ np.arange(len(coef)))
  return c / n


def _configuration_bound(assignment: Assignment, k: int) -> int | None:
  """Exact multiset relaxation for load- and replication-regular assignments.

  When every load is ``δ`` and every replication ``r``,
  ``term_i = (m−r)δ + kδ + f(P_i)`` where ``P_i`` is the multiset of 0-based
  positions of chunk ``i`` at its holders and ``f`` sums its ``r−k`` largest
  values (the ``k`` holders in ``T_i`` are those with the smallest positions).
  Each worker has one slot of each position ``0..δ−1``, so in any ordering the
  ``N`` multisets together contain every value exactly ``m`` times. The
  smallest ``θ`` for which ``N`` multisets with ``f ≤ θ`` and these value counts
  exist (a small integer program, forgetting the graph) is therefore a lower
  bound on ``max_i f(P_i)``. Returns the implied bound on ``max_i term_i``, or
  ``None`` when not applicable or too large.
  """
  loads, rep = assignment.loads, assignment.replication
  if loads.min() != loads.max() or rep.min() != rep.max() or k == 0:
    return None
  d, r, m, n = int(loads[0]), int(rep[0]), assignment.num_workers, assignment.num_chunks
  if math.comb(d + r - 1, r) > _CONFIG_MAX_MULTISETS:
    return None
  from scipy.optimize import Bounds, LinearConstraint, milp  # pylint: disable=import-outside-toplevel
  sets = np.array(list(itertools.combinations_with_replacement(range(d), r)), np.int64)
  f = sets[:, k:].sum(1)  # ascending tuples: the r−k largest are the last r−k
  counts = np.stack([(sets == v).sum(1) for v in range(d)])  # [d, S]
  a_eq = np.vstack([counts, np.ones((1, len(sets)))])
  b_eq = np.concatenate([np.full(d, m), [n]])

  def solve(theta, integer):
    keep = f <= theta
    res = milp(np.zeros(int(keep.sum())),
               constraints=LinearConstraint(a_eq[:, keep], b_eq, b_eq),
               integrality=np.full(int(keep.sum()), int(integer)), bounds=Bounds(0, n),
               options={"time_limit": 5.0, "disp": False})
    return {0: True, 2: False}.get(res.status)  # None: undecided

  # The LP relaxation is already a bound and is fast: binary-search it, then
  # walk up with the integer program (usually one or two solves).
  values = np.unique(f)
  lo, hi = 0, len(values) - 1  # values[hi] allows every multiset: feasible
  while lo < hi:
    mid = (lo + hi) // 2
    if solve(values[mid], False) is False:
      lo = mid + 1
    else:
      hi = mid
  while lo < len(values) - 1 and solve(values[lo], True) is False:
    lo += 1
  return (m - r) * d + k * d + int(values[lo])


def q_lower_bound(assignment: Assignment, ell: int = 1, *, lp: bool = False) -> int:
  """A proven lower bound on ``min_π Q(π)`` over orderings of the given chunk sets.

  The largest of: the per-chunk bound (each chunk first at all its holders),
  the averaging bound (see ``_averaging_bound``: uniform average of a linear
  minorant of ``term_i``, minimised per worker by rearrangement), and, for
  load- and replication-regular assignments with ``ℓ > 1``, the configuration
  bound (counts of positions). With ``lp=True`` also the LP relaxation of the
  MILP of :func:`optimize`, which dominates the first two. ``Q`` is an
  integer, so fractional bounds round up. Exact for ``δ``-regular ``N = m``, ``ℓ = 1``.
  """
  assignment.check_ell(ell)
  k = ell - 1
  best = max(_per_chunk_bound(assignment, k),
             math.ceil(_averaging_bound(assignment, k) - 1e-9))
  cfg = _configuration_bound(assignment, k)
  if cfg is not None:
    best = max(best, cfg)
  if lp:
    res = _milp(assignment, k, lb=0, ub=None, time_limit=60.0, relax=True)
    if res is not None and res.status == 0:
      best = max(best, math.ceil(res.fun - 1 - 1e-7))
  return 1 + best


# -- orderings ----------------------------------------------------------------

def shuffled(assignment: Assignment, seed: int = 0) -> Assignment:
  """Each worker's list in an independent uniformly random order (the baseline)."""
  rng = np.random.default_rng(seed)
  order = np.array(assignment.order)
  for j, d in enumerate(assignment.loads):
    order[j, :d] = rng.permutation(order[j, :d])
  return assignment.with_order(order)


def _is_square_regular(assignment: Assignment) -> bool:
  """Every load and every replication equal ``δ`` (so ``N = m``)."""
  loads, rep = assignment.loads, assignment.replication
  return loads.min() == loads.max() == rep.min() == rep.max()


def _matching_coloring(assignment: Assignment) -> np.ndarray | None:
  """δ perfect matchings of a δ-regular bipartite graph (König); None if one fails."""
  from scipy.sparse import csr_matrix  # pylint: disable=import-outside-toplevel
  from scipy.sparse.csgraph import maximum_bipartite_matching  # pylint: disable=import-outside-toplevel
  remaining = np.array(assignment.biadjacency, np.int8)
  d = int(assignment.loads[0])
  order = np.empty((assignment.num_workers, d), np.int64)
  rows = np.arange(assignment.num_workers)
  for c in range(d):
    match = maximum_bipartite_matching(csr_matrix(remaining), perm_type="column")
    if (match < 0).any():
      return None
    order[:, c] = match
    remaining[rows, match] = 0
  return order


def _path_coloring(assignment: Assignment) -> np.ndarray:
  """König edge colouring with ``Δ`` colours by alternating paths; lists sorted by colour.

  Works for any bipartite graph; a chunk's holders then see pairwise distinct
  colours, which is an optimal ordering for ``δ``-regular ``N = m`` and a
  starting point otherwise.
  """
  m, n = assignment.num_workers, assignment.num_chunks
  ncol = int(max(assignment.loads.max(), assignment.replication.max()))
  at_w = np.full((m, ncol), -1, np.int64)  # at_w[j, c]: chunk on worker j's edge of colour c
  at_c = np.full((n, ncol), -1, np.int64)  # at_c[i, c]: worker on chunk i's edge of colour c
  for j, chunks in enumerate(assignment.lists()):
    for i in chunks:
      a = int(np.argmax(at_w[j] < 0))
      if at_c[i, a] >= 0:
        b = int(np.argmax(at_c[i] < 0))
        # Swap colours a <-> b along the a/b path from chunk i; it cannot end at j.
        path, node, on_chunk, col = [], i, True, a
        while True:
          nxt = at_c[node, col] if on_chunk else at_w[node, col]
          if nxt < 0:
            break
          path.append((node, nxt, on_chunk, col))
          node, on_chunk, col = nxt, not on_chunk, (b if col == a else a)
        for u, v, u_is_chunk, col in path:
          (at_c if u_is_chunk else at_w)[u, col] = -1
          (at_w if u_is_chunk else at_c)[v, col] = -1
        for u, v, u_is_chunk, col in path:
          new = b if col == a else a
          cu, wv = (u, v) if u_is_chunk else (v, u)
          at_c[cu, new] = wv
          at_w[wv, new] = cu
      at_w[j, a] = i
      at_c[i, a] = j
  order = np.full((m, assignment.max_load), -1, np.int64)
  for j in range(m):
    chunks = at_w[j][at_w[j] >= 0]
    order[j, :len(chunks)] = chunks
  return order


def coloring(assignment: Assignment) -> Assignment:
  """Ordering from a proper edge colouring: colour ``c`` = position ``c + 1``.

  For a ``δ``-regular bipartite graph (``N = m``) the colouring is built from
  ``δ`` perfect matchings, so every chunk sits at each position ``1..δ``
  exactly once; this attains ``Q = 1 + (m−δ)δ + δ(δ−1)/2`` for ``ℓ = 1``, the
  averaging lower bound, hence optimal. Other assignments get a König colouring
  with ``max(δ_max, r_max)`` colours, each list sorted by colour (a heuristic).
  """
  order = _matching_coloring(assignment) if _is_square_regular(assignment) else None
  if order is None:
    order = _path_coloring(assignment)
  full = np.full(assignment.order.shape, -1, np.int64)
  full[:, :order.shape[1]] = order
  return assignment.with_order(full)


# -- local search --------------------------------------------------------------

def _local_search(assignment: Assignment, k: int, start: np.ndarray, *, target: int,
                  time_limit: float, seed: int, max_restarts: int = 200) -> np.ndarray:
  """Swap local search on ``(max_i term_i, #argmax, Σ_i term_i²)``, with kicks.

  A move swaps two slots of one worker; only the two chunks involved change
  ``term``, so all ``δ_j(δ_j−1)/2`` swaps of worker ``j`` are scored at once.
  The count at the max and the sum of squares break ties so the search can
  make progress on plateaus of the max. Stops at ``target`` (a lower bound on
  ``max term``), ``time_limit`` seconds, or ``max_restarts`` kicks.
  """
  rng = np.random.default_rng(seed)
  deadline = time.perf_counter() + time_limit
  m, n = assignment.num_workers, assignment.num_chunks
  loads = assignment.loads.astype(np.int64)
  hw, _ = assignment.holders
  valid = hw >= 0
  hw0 = np.where(valid, hw, 0)
  hload = np.where(valid, loads[hw0], 0)
  a_out = loads.sum() - hload.sum(1)
  col = np.full((m, n), -1, np.int64)  # col[j, i]: index of j in chunk i's holder row
  ci, cc = np.nonzero(valid)
  col[hw[ci, cc], ci] = cc

  order = np.array(start, np.int64)
  pos0 = np.full((m, n), -1, np.int64)
  w, t = np.nonzero(order >= 0)
  pos0[w, order[w, t]] = t

  def full_terms():
    return _terms(pos0, loads, k)

  terms = full_terms()
  hist = np.bincount(terms, minlength=int(loads.sum()) + 1)
  sq = int((terms ** 2).sum())
  best_order, best_key = order.copy(), (int(terms.max()), int(hist[terms.max()]), sq)

  def improve(j):
    nonlocal sq
    d = int(loads[j])
    cs = order[j, :d]
    v = valid[cs][:, None, :]
    pq = np.broadcast_to(pos0[hw0[cs], cs[:, None]][:, None, :], (d, d, hw.shape[1])).copy()
    pq[np.arange(d)[:, None], np.arange(d)[None, :], col[j, cs][:, None]] = np.arange(d)[None, :]
    tq = (a_out[cs][:, None] + np.where(v, pq, 0).sum(-1)
          + _topk_sum(np.where(v, hload[cs][:, None, :] - pq, 0), k, axis=-1))
    a, b = np.triu_indices(d, 1)
    ca, cb = cs[a], cs[b]
    new_a, new_b = tq[a, b], tq[b, a]
    old_a, old_b = terms[ca], terms[cb]
    top = np.argsort(terms)[::-1][:3]
    others = np.full(len(a), -1, np.int64)
    for c in top[::-1]:  # later (larger) entries overwrite
      others = np.where((ca != c) & (cb != c), np.maximum(others, terms[c]), others)
    m2 = np.maximum(others, np.maximum(new_a, new_b))
    cnt2 = (hist[m2] - (old_a == m2) - (old_b == m2) + (new_a == m2) + (new_b == m2))
    sq2 = sq - old_a ** 2 - old_b ** 2 + new_a ** 2 + new_b ** 2
    bi = int(np.lexsort((sq2, cnt2, m2))[0])
    cur = int(terms.max())
    if (m2[bi], cnt2[bi], sq2[bi]) >= (cur, hist[cur], sq):
      return False
    x, y = int(a[bi]), int(b[bi])
    i1, i2 = int(ca[bi]), int(cb[bi])
    order[j, x], order[j, y] = i2, i1
    pos0[j, i1], pos0[j, i2] = y, x
    for i, new in ((i1, int(new_a[bi])), (i2, int(new_b[bi]))):
      hist[terms[i]] -= 1
      hist[new] += 1
      terms[i] = new
    sq = int(sq2[bi])
    return True

  movable = np.nonzero(loads >= 2)[0]
  if len(movable) == 0:
    return order
  for restart in range(max_restarts + 1):
    improved = True
    while improved and time.perf_counter() < deadline:
      improved = False
      for j in rng.permutation(movable):
        improved |= improve(int(j))
    cur_key = (int(terms.max()), int(hist[terms.max()]), sq)
    if cur_key < best_key:
      best_order, best_key = order.copy(), cur_key
    if best_key[0] <= target or time.perf_counter() >= deadline or restart == max_restarts:
      break
    # Kick: from the best ordering, move a few of the worst chunks to random slots.
    order[:] = best_order
    pos0.fill(-1)
    w, t = np.nonzero(order >= 0)
    pos0[w, order[w, t]] = t
    terms = full_terms()
    worst = np.nonzero(terms == terms.max())[0]
    for _ in range(int(rng.integers(1, 4))):
      i = int(rng.choice(worst))
      hs = [int(h) for h in hw[i][valid[i]] if loads[h] >= 2] or [int(rng.choice(movable))]
      j = int(rng.choice(hs))
      x = int(pos0[j, i]) if pos0[j, i] >= 0 else int(rng.integers(loads[j]))
      y = int(rng.integers(loads[j] - 1))
      y += y >= x
      i1, i2 = int(order[j, x]), int(order[j, y])
      order[j, x], order[j, y] = i2, i1
      pos0[j, i1], pos0[j, i2] = y, x
    terms = full_terms()
    hist = np.bincount(terms, minlength=int(loads.sum()) + 1)
    sq = int((terms ** 2).sum())
  return best_order


# -- MILP ------------------------------------------------------------------------

def _milp(assignment: Assignment, k: int, *, lb: int, ub: int | None, time_limit: float,
          relax: bool = False):
  """Solve ``min Q`` over orderings with HiGHS; returns (scipy result, decoder) or None.

  Variables: binaries ``x[e, t]`` (edge ``e = (j, i)`` at 0-based slot ``t``),
  each worker's ``x`` a permutation matrix; integer ``Q``; and for ``ℓ > 1``
  ``τ_i`` and ``u_e ≥ 0``. The top-``k`` sum is linearised by LP duality,
  ``top_k(g) = min_τ kτ + Σ_e max(0, g_e − τ)``, so for each chunk ``i``:

    ``Q − 1 ≥ Σ_{j∉W(i)} δ_j + Σ_{e∈W(i)} p_e + kτ_i + Σ_{e∈W(i)} u_e``,
    ``u_e + τ_i + p_e ≥ δ_j``,  with ``p_e = Σ_t t·x[e, t]`` (= ``pos − 1``).
  """
  from scipy import sparse  # pylint: disable=import-outside-toplevel
  from scipy.optimize import Bounds, LinearConstraint, milp  # pylint: disable=import-outside-toplevel
  m, n = assignment.num_workers, assignment.num_chunks
  loads = assignment.loads.astype(np.int64)
  ej, es = np.nonzero(assignment.slot_mask)
  ec = assignment.order[ej, es].astype(np.int64)
  ne = len(ej)
  de = loads[ej]
  woff = np.concatenate([[0], np.cumsum(loads ** 2)])[:-1]
  soff = np.concatenate([[0], np.cumsum(loads)])[:-1]
  nx = int((loads ** 2).sum())
  iq = nx
  itau, iu = nx + 1, nx + 1 + n
  nvar = nx + 1 + (n + ne if k else 0)

  e_rep = np.repeat(np.arange(ne), de)
  t_rep = np.arange(len(e_rep)) - np.repeat(np.cumsum(de) - de, de)
  xi = woff[ej[e_rep]] + es[e_rep] * de[e_rep] + t_rep
  a_out = loads.sum() - np.bincount(ec, weights=de, minlength=n).astype(np.int64)

  rows, cols, vals = [], [], []

  def add(r, c, v):
    rows.append(np.asarray(r, np.int64))
    cols.append(np.asarray(c, np.int64))
    vals.append(np.broadcast_to(np.asarray(v, np.float64), np.shape(r)))

  add(e_rep, xi, 1.0)                                  # each edge in one slot
  add(ne + soff[ej[e_rep]] + t_rep, xi, 1.0)           # each slot holds one chunk
  rq = 2 * ne
  add(rq + ec[e_rep], xi, -t_rep)                      # chunk rows: − Σ p_e
  add(rq + np.arange(n), np.full(n, iq), 1.0)          # + Q
  lo = [np.ones(2 * ne), 1.0 + a_out]
  hi = [np.ones(2 * ne), np.full(n, np.inf)]
  if k:
    add(rq + np.arange(n), itau + np.arange(n), -float(k))
    add(rq + ec, iu + np.arange(ne), -1.0)
    ru = rq + n
    add(ru + e_rep, xi, t_rep)                         # u_e + τ_i + p_e ≥ δ_j
    add(ru + np.arange(ne), itau + ec, 1.0)
    add(ru + np.arange(ne), iu + np.arange(ne), 1.0)
    lo.append(de.astype(np.float64))
    hi.append(np.full(ne, np.inf))
  nrow = 2 * ne + n + (ne if k else 0)
  a_mat = sparse.csr_matrix(
      (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(nrow, nvar))
  cons = LinearConstraint(a_mat, np.concatenate(lo), np.concatenate(hi))
  integrality = np.zeros(nvar)
  if not relax:
    integrality[:nx + 1] = 1
  dmax = float(loads.max())
  lower = np.zeros(nvar)
  upper = np.concatenate([np.ones(nx), [np.inf if ub is None else ub],
                          np.full(nvar - nx - 1, dmax)])
  lower[iq] = lb
  c = np.zeros(nvar)
  c[iq] = 1.0
  res = milp(c, constraints=cons, integrality=integrality, bounds=Bounds(lower, upper),
             options={"time_limit": float(max(time_limit, 0.01)), "disp": False,
                      "mip_rel_gap": 1e-9})
  if relax:
    return res

  def decode(x):
    order = np.full(assignment.order.shape, -1, np.int64)
    t = np.array([np.argmax(x[woff[ej[e]] + es[e] * de[e]:][:de[e]]) for e in range(ne)])
    order[ej, t] = ec
    return order

  res.decode = decode
  return res


# -- driver ----------------------------------------------------------------------

def _check_method(method):
  if method not in METHODS:
    raise ValueError(
        f"unknown ordering method {method!r}; valid choices are {', '.join(METHODS)}.")


def _resolve_method(assignment: Assignment, ell: int, method: str) -> str:
  """What ``"auto"`` runs: see :func:`optimize_with_info`."""
  if method != "auto":
    return method
  if ell == 1 and _is_square_regular(assignment):
    return "coloring"
  if int((assignment.loads.astype(np.int64) ** 2).sum()) <= MILP_MAX_BINARIES:
    return "milp"
  return "local_search"


def optimize_with_info(assignment: Assignment, ell: int = 1, method: str = "auto",
                       time_limit: float = 10.0, seed: int = 0
                       ) -> tuple[Assignment, OrderingInfo]:
  """Reorders each worker's list to minimise ``Q(π)``; returns it and a certificate.

  Methods:
    ``"coloring"``: edge-colouring order (:func:`coloring`); optimal for
      ``δ``-regular ``N = m`` and ``ℓ = 1``, a heuristic otherwise.
    ``"milp"``: HiGHS MILP (see ``_milp``), warm-bounded by the best heuristic
      ordering; certified when HiGHS proves optimality within ``time_limit``.
    ``"local_search"``: swap local search with kicks, started from the best of
      the given order and the colouring.
    ``"auto"``: ``"coloring"`` for ``δ``-regular ``N = m`` with ``ℓ = 1``; else
      ``"milp"`` when ``Σ_j δ_j² ≤ MILP_MAX_BINARIES``; else ``"local_search"``.

  ``Q`` is a worst case over states. For ``ℓ > 1`` the ``Q``-optimal order need
  not be a colouring, and can be slower on average than the colouring (see
  ``benchmarks/ordering.py``); use ``method="coloring"`` to get that order.

  Except for an explicit ``"coloring"``, the result is never worse than the
  input ordering, and every method stops as soon as it meets the lower bound.
  ``info.method`` names what produced the returned ordering: the chosen method,
  or ``"coloring"`` / ``"input"`` when that candidate already met the lower
  bound or was not improved on. ``lower_bound`` is :func:`q_lower_bound`,
  raised to the MILP's proven bound when the MILP runs.
  """
  _check_method(method)
  assignment.check_ell(ell)
  k = ell - 1
  t0 = time.perf_counter()
  lb = q_lower_bound(assignment, ell)
  method = _resolve_method(assignment, ell, method)

  def left():
    return time_limit - (time.perf_counter() - t0)

  def done(source, result, q, lower=lb):
    lower = max(lower, lb)
    return result, OrderingInfo(source, q, lower, q == lower, q - lower)

  col = coloring(assignment)
  q_col = q_max(col, ell)
  if method == "coloring":
    return done("coloring", col, q_col)

  q_in = q_max(assignment, ell)
  source, best, q_best = ("coloring", col, q_col) if q_col < q_in else ("input", assignment, q_in)
  if q_best > lb:
    # For "milp" a short local search gives an upper bound that prunes the tree.
    budget = left() if method == "local_search" else min(5.0, 0.25 * left())
    order = _local_search(assignment, k, best.order, target=lb - 1, time_limit=budget, seed=seed)
    cand = assignment.with_order(order)
    if q_max(cand, ell) < q_best:
      source, best, q_best = "local_search", cand, q_max(cand, ell)
  if method == "local_search" or q_best == lb:
    return done(source, best, q_best)

  res = _milp(assignment, k, lb=lb, ub=q_best, time_limit=left())
  lower = lb
  if res.x is not None:
    cand = assignment.with_order(res.decode(res.x))
    if q_max(cand, ell) < q_best:
      source, best, q_best = "milp", cand, q_max(cand, ell)
  if res.status == 0:
    lower = q_best  # HiGHS proved that no ordering has a smaller Q
  else:
    dual = getattr(res, "mip_dual_bound", None)
    if dual is not None and np.isfinite(dual):
      lower = max(lower, math.ceil(dual - 1e-6))
  return done(source, best, q_best, lower)


def optimize(assignment: Assignment, ell: int = 1, method: str = "auto",
             time_limit: float = 10.0, seed: int = 0) -> Assignment:
  """Same chunk sets, order chosen to minimise ``Q(π)``; see :func:`optimize_with_info`."""
  return optimize_with_info(assignment, ell, method, time_limit, seed)[0]

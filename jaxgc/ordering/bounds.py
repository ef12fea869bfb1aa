"""Proven lower bounds on ``min_π Q(π)`` over orderings of fixed chunk sets."""
from __future__ import annotations

import itertools
import math

import numpy as np

from jaxgc.assignments import Assignment
from jaxgc.ordering import milp
from jaxgc.ordering.qmax import topk_sum

__all__ = ["q_lower_bound", "per_chunk_bound", "averaging_bound", "configuration_bound",
           "CONFIG_MAX_MULTISETS", "CONFIG_SOLVE_SECONDS", "LP_SECONDS"]

CONFIG_MAX_MULTISETS = 20_000   # the configuration bound enumerates multisets of positions
CONFIG_SOLVE_SECONDS = 5.0      # per integer-program solve of the configuration bound
LP_SECONDS = 60.0               # the LP relaxation of the MILP (q_lower_bound(lp=True))


def per_chunk_bound(assignment: Assignment, k: int) -> int:
  """``max_i [Σ_{j∉W(i)} δ_j + top_k(δ_j : j∈W(i))]``.

  Moving chunk ``i`` one slot later at holder ``j`` adds 1 to ``pos_j(i)−1``
  and removes at most 1 from the top-k gains, so ``term_i`` is smallest when
  ``i`` is first at all its holders.
  """
  held = assignment.biadjacency
  lj = assignment.loads.astype(np.int64)[:, None]
  outside = np.where(held, 0, lj).sum(0)
  return int((outside + topk_sum(np.where(held, lj, 0), k, axis=0)).max())


def averaging_bound(assignment: Assignment, k: int) -> float:
  """Uniform average over chunks of a linear lower bound on ``term_i``.

  Proof. The mean of the ``k`` largest of ``r_i`` numbers is at least their
  mean, so with ``a_i = 1 − k/r_i ∈ (0, 1]`` and gains ``g = δ_j − p_j + 1``:

    ``term_i ≥ Σ_{j∉W(i)} δ_j + (k/r_i) Σ_{j∈W(i)} δ_j + a_i Σ_{j∈W(i)} (p_j(i) − 1)
    =: C_i + a_i Σ_j (p_j(i)−1)``.

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


def configuration_bound(assignment: Assignment, k: int) -> int | None:
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
  ``None`` when not applicable or beyond :data:`CONFIG_MAX_MULTISETS`.
  """
  loads, rep = assignment.loads, assignment.replication
  if loads.min() != loads.max() or rep.min() != rep.max() or k == 0:
    return None
  d, r, m, n = int(loads[0]), int(rep[0]), assignment.num_workers, assignment.num_chunks
  if math.comb(d + r - 1, r) > CONFIG_MAX_MULTISETS:
    return None
  from scipy.optimize import Bounds, LinearConstraint  # pylint: disable=import-outside-toplevel
  from scipy.optimize import milp as scipy_milp
  sets = np.array(list(itertools.combinations_with_replacement(range(d), r)), np.int64)
  f = sets[:, k:].sum(1)  # ascending tuples: the r−k largest are the last r−k
  counts = np.stack([(sets == v).sum(1) for v in range(d)])  # [d, S]
  a_eq = np.vstack([counts, np.ones((1, len(sets)))])
  b_eq = np.concatenate([np.full(d, m), [n]])

  def feasible(theta, integer):
    keep = f <= theta
    res = scipy_milp(np.zeros(int(keep.sum())),
                     constraints=LinearConstraint(a_eq[:, keep], b_eq, b_eq),
                     integrality=np.full(int(keep.sum()), int(integer)), bounds=Bounds(0, n),
                     options={"time_limit": CONFIG_SOLVE_SECONDS, "disp": False})
    return {0: True, 2: False}.get(res.status)  # None: undecided

  # The LP relaxation is already a bound and is fast: binary-search it, then
  # walk up with the integer program (usually one or two solves).
  values = np.unique(f)
  lo, hi = 0, len(values) - 1  # values[hi] allows every multiset: feasible
  while lo < hi:
    mid = (lo + hi) // 2
    if feasible(values[mid], False) is False:
      lo = mid + 1
    else:
      hi = mid
  while lo < len(values) - 1 and feasible(values[lo], True) is False:
    lo += 1
  return (m - r) * d + k * d + int(values[lo])


def q_lower_bound(assignment: Assignment, ell: int = 1, *, lp: bool = False) -> int:
  """A proven lower bound on ``min_π Q(π)`` over orderings of the given chunk sets.

  The largest of: the per-chunk bound (each chunk first at all its holders),
  the averaging bound (:func:`averaging_bound`: uniform average of a linear
  minorant of ``term_i``, minimised per worker by rearrangement), and, for
  load- and replication-regular assignments with ``ℓ > 1``, the configuration
  bound (counts of positions). With ``lp=True`` also the LP relaxation of the
  MILP of :func:`~jaxgc.ordering.optimize`, which dominates the first two. ``Q``
  is an integer, so fractional bounds round up. Exact for ``δ``-regular ``N = m``, ``ℓ = 1``.
  """
  assignment.check_ell(ell)
  k = ell - 1
  best = max(per_chunk_bound(assignment, k), math.ceil(averaging_bound(assignment, k) - 1e-9))
  cfg = configuration_bound(assignment, k)
  if cfg is not None:
    best = max(best, cfg)
  if lp:
    res = milp.solve(assignment, k, lb=0, ub=None, time_limit=LP_SECONDS, relax=True)
    if res.status == 0 and res.fun is not None:
      best = max(best, math.ceil(res.fun - 1 - 1e-7))
  return 1 + best

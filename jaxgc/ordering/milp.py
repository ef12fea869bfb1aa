"""``min_π Q(π)`` as a mixed-integer program, solved by HiGHS (via SciPy).

Variables: binaries ``x[e, t]`` (edge ``e = (j, i)`` at 0-based slot ``t`` of worker
``j``), each worker's ``x`` a permutation matrix; integer ``Q``; and for ``ℓ > 1``
``τ_i`` and ``u_e ≥ 0``. With ``p_e = Σ_t t·x[e, t]`` (= ``pos − 1``), the top-``k``
sum is linearised by LP duality, ``top_k(g) = min_τ kτ + Σ_e max(0, g_e − τ)``, so
for each chunk ``i``:

  ``Q − 1 ≥ Σ_{j∉W(i)} δ_j + Σ_{e∈W(i)} p_e + kτ_i + Σ_{e∈W(i)} u_e``,
  ``u_e + τ_i + p_e ≥ δ_j``.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxgc.assignments import Assignment

__all__ = ["MilpResult", "solve"]


class _Edges(NamedTuple):
  """The assignment's edges in slot order, and the slot variables ``x`` they own."""
  worker: np.ndarray   # [E] j
  slot: np.ndarray     # [E] current 0-based slot of the edge at its worker
  chunk: np.ndarray    # [E] i
  load: np.ndarray     # [E] δ_j: the slots this edge may take
  x_edge: np.ndarray   # [X] edge of variable x  (each edge owns δ_j consecutive x's)
  x_slot: np.ndarray   # [X] slot t of variable x


class MilpResult(NamedTuple):
  """HiGHS's answer: ``status`` 0 = proven optimal; ``fun`` the objective ``Q``;
  ``x`` the variables (or None); ``mip_dual_bound`` a proven lower bound (or None)."""
  status: int
  fun: float | None
  x: np.ndarray | None
  mip_dual_bound: float | None
  edges: _Edges
  shape: tuple

  def decode(self, x) -> np.ndarray:
    """The ordering ``[m, max_load]`` (``-1`` padded) encoded by the slot binaries of ``x``."""
    e = self.edges
    split = np.cumsum(e.load)[:-1]
    segments = np.split(np.asarray(x)[:len(e.x_edge)], split)
    slots = np.array([int(np.argmax(seg)) for seg in segments])
    order = np.full(self.shape, -1, np.int64)
    order[e.worker, slots] = e.chunk
    return order


def _edges(assignment: Assignment) -> _Edges:
  worker, slot = np.nonzero(assignment.slot_mask)
  chunk = assignment.order[worker, slot].astype(np.int64)
  load = assignment.loads.astype(np.int64)[worker]
  x_edge = np.repeat(np.arange(len(worker)), load)
  x_slot = np.arange(len(x_edge)) - np.repeat(np.cumsum(load) - load, load)
  return _Edges(worker, slot, chunk, load, x_edge, x_slot)


def solve(assignment: Assignment, k: int, *, lb: int, ub: int | None, time_limit: float,
          relax: bool = False) -> MilpResult:
  """``min Q`` over orderings with ``k = ℓ − 1``, ``lb ≤ Q ≤ ub``; ``relax``: the LP relaxation."""
  from scipy import sparse  # pylint: disable=import-outside-toplevel
  from scipy.optimize import Bounds, LinearConstraint, milp  # pylint: disable=import-outside-toplevel
  n = assignment.num_chunks
  e = _edges(assignment)
  ne, nx = len(e.worker), len(e.x_edge)
  first_slot = np.cumsum(assignment.loads) - assignment.loads      # row of slot (j, 0)
  coo = lambda v, r, c, shape: sparse.coo_matrix(
      (np.broadcast_to(np.asarray(v, np.float64), np.shape(r)), (r, c)), shape=shape)
  x_cols = np.arange(nx)
  one_slot_per_edge = coo(1.0, e.x_edge, x_cols, (ne, nx))
  one_edge_per_slot = coo(1.0, first_slot[e.worker[e.x_edge]] + e.x_slot, x_cols, (ne, nx))
  position = coo(e.x_slot, e.x_edge, x_cols, (ne, nx))           # p = position @ x
  chunk_of_edge = coo(1.0, e.chunk, np.arange(ne), (n, ne))      # Σ over a chunk's edges
  outside = assignment.loads.sum() - np.bincount(e.chunk, weights=e.load, minlength=n)
  q_col = np.ones((n, 1))

  # Rows: one slot per edge, one edge per slot (both = 1); chunk rows Q − Σ p − kτ − Σ u
  # ≥ 1 + outside; and for ℓ > 1 edge rows p_e + τ_i + u_e ≥ δ_j.
  if k:
    blocks = [[one_slot_per_edge, None, None, None],
              [one_edge_per_slot, None, None, None],
              [-chunk_of_edge @ position, q_col, -k * sparse.eye(n), -chunk_of_edge],
              [position, None, chunk_of_edge.T, sparse.eye(ne)]]
    lo = np.concatenate([np.ones(2 * ne), 1.0 + outside, e.load])
  else:
    blocks = [[one_slot_per_edge, None], [one_edge_per_slot, None],
              [-chunk_of_edge @ position, q_col]]
    lo = np.concatenate([np.ones(2 * ne), 1.0 + outside])
  hi = np.concatenate([np.ones(2 * ne), np.full(len(lo) - 2 * ne, np.inf)])
  a_mat = sparse.bmat(blocks, format="csr")
  nvar = a_mat.shape[1]
  iq = nx                                                         # the variable Q
  lower, upper = np.zeros(nvar), np.full(nvar, float(assignment.loads.max()))
  upper[:nx] = 1.0
  lower[iq], upper[iq] = lb, np.inf if ub is None else ub
  integrality = np.zeros(nvar)
  if not relax:
    integrality[:nx + 1] = 1
  cost = np.zeros(nvar)
  cost[iq] = 1.0
  res = milp(cost, constraints=LinearConstraint(a_mat, lo, hi), integrality=integrality,
             bounds=Bounds(lower, upper),
             options={"time_limit": float(max(time_limit, 0.01)), "disp": False,
                      "mip_rel_gap": 1e-9})
  return MilpResult(int(res.status), getattr(res, "fun", None), getattr(res, "x", None),
                    getattr(res, "mip_dual_bound", None), e, assignment.order.shape)

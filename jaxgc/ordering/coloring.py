"""Orderings by construction: edge colourings (optimal for ``δ``-regular ``N = m``, ``ℓ = 1``)
and the random baseline."""
from __future__ import annotations

import numpy as np

from jaxgc.assignments import Assignment

__all__ = ["coloring", "shuffled", "is_square_regular"]


def shuffled(assignment: Assignment, seed: int = 0) -> Assignment:
  """Each worker's list in an independent uniformly random order (the baseline)."""
  rng = np.random.default_rng(seed)
  order = np.array(assignment.order)
  for j, d in enumerate(assignment.loads):
    order[j, :d] = rng.permutation(order[j, :d])
  return assignment.with_order(order)


def is_square_regular(assignment: Assignment) -> bool:
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
  order = _matching_coloring(assignment) if is_square_regular(assignment) else None
  if order is None:
    order = _path_coloring(assignment)
  full = np.full(assignment.order.shape, -1, np.int64)
  full[:, :order.shape[1]] = order
  return assignment.with_order(full)

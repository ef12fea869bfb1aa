"""Spectral expansion of an assignment and Raviv et al.'s decoding-error bound.

For a ``d``-regular bipartite assignment (every worker holds ``d`` chunks, every
chunk is held by ``d`` workers, ``N = m = n``) the biadjacency's largest singular
value is ``d`` (vector ``1``); the second, ``λ₂``, measures expansion. Raviv, Tamo,
Tandon & Dimakis (2018) bound the optimal decoding error of the 0/1 graph code with
``s`` stragglers by ``‖α − 1‖ ≤ (λ₂/d)·√(n s/(n − s))``.
"""
from __future__ import annotations

import numpy as np

from jaxgc.assignments import Assignment

__all__ = ["second_singular_ratio", "raviv_bound"]


def _regular_load(assignment: Assignment) -> int:
  loads, rep = assignment.loads, assignment.replication
  d = int(loads[0])
  if assignment.num_chunks != assignment.num_workers or (loads != d).any() or (rep != d).any():
    raise ValueError(
        f"the spectral bound is for a d-regular bipartite assignment with N = m; got "
        f"{assignment!r}. Use cyclic(), random_regular() or expander().")
  return d


def second_singular_ratio(assignment: Assignment) -> float:
  """``λ₂/d``: second singular value of the biadjacency over the load (``< 1`` iff connected)."""
  d = _regular_load(assignment)
  s = np.linalg.svd(assignment.biadjacency.astype(np.float64), compute_uv=False)
  return float(s[1] / d) if len(s) > 1 else 0.0


def raviv_bound(assignment: Assignment, num_stragglers):
  """``(λ₂/d)·√(n s/(n − s))``: Raviv et al.'s bound on ``‖α − 1‖`` with ``s`` stragglers.

  ``num_stragglers`` (``s``, scalar or array) must be below ``n``.
  """
  n = assignment.num_workers
  s = np.asarray(num_stragglers, np.float64)
  if (s < 0).any() or (s >= n).any():
    raise ValueError(f"num_stragglers must be in 0..n-1 = 0..{n - 1}, got {num_stragglers}.")
  return second_singular_ratio(assignment) * np.sqrt(n * s / (n - s))

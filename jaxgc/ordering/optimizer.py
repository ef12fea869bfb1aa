"""The ordering optimiser: colouring, local search and MILP behind one call, with a certificate."""
from __future__ import annotations

import math
import time
from typing import NamedTuple

import numpy as np

from jaxgc.assignments import Assignment
from jaxgc.ordering import milp
from jaxgc.ordering.bounds import q_lower_bound
from jaxgc.ordering.coloring import coloring, is_square_regular
from jaxgc.ordering.qmax import q_max
from jaxgc.ordering.search import local_search

__all__ = ["METHODS", "MILP_MAX_BINARIES", "OrderingInfo", "optimize", "optimize_with_info"]

METHODS = ("auto", "coloring", "milp", "local_search")

# `auto` uses the MILP when it has at most this many placement binaries Σ_j δ_j².
MILP_MAX_BINARIES = 2500
# Before the MILP, a short local search finds an upper bound that prunes its tree:
# this fraction of the time left, at most this many seconds.
WARM_START_FRACTION = 0.25
WARM_START_MAX_SECONDS = 5.0


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


def _check_method(method):
  if method not in METHODS:
    raise ValueError(
        f"unknown ordering method {method!r}; valid choices are {', '.join(METHODS)}.")


def _resolve_method(assignment: Assignment, ell: int, method: str) -> str:
  """What ``"auto"`` runs: see :func:`optimize_with_info`."""
  if method != "auto":
    return method
  if ell == 1 and is_square_regular(assignment):
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
    ``"milp"``: HiGHS MILP (:mod:`jaxgc.ordering.milp`), warm-bounded by the best
      heuristic ordering; certified when HiGHS proves optimality within ``time_limit``.
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
    budget = (left() if method == "local_search"
              else min(WARM_START_MAX_SECONDS, WARM_START_FRACTION * left()))
    order = local_search(assignment, k, best.order, target=lb - 1, time_limit=budget, seed=seed)
    cand = assignment.with_order(order)
    if q_max(cand, ell) < q_best:
      source, best, q_best = "local_search", cand, q_max(cand, ell)
  if method == "local_search" or q_best == lb:
    return done(source, best, q_best)

  res = milp.solve(assignment, k, lb=lb, ub=q_best, time_limit=left())
  lower = lb
  if res.x is not None:
    cand = assignment.with_order(res.decode(res.x))
    if q_max(cand, ell) < q_best:
      source, best, q_best = "milp", cand, q_max(cand, ell)
  if res.status == 0:
    lower = q_best  # HiGHS proved that no ordering has a smaller Q
  elif res.mip_dual_bound is not None and np.isfinite(res.mip_dual_bound):
    lower = max(lower, math.ceil(res.mip_dual_bound - 1e-6))
  return done(source, best, q_best, lower)


def optimize(assignment: Assignment, ell: int = 1, method: str = "auto",
             time_limit: float = 10.0, seed: int = 0) -> Assignment:
  """Same chunk sets, order chosen to minimise ``Q(π)``; see :func:`optimize_with_info`."""
  return optimize_with_info(assignment, ell, method, time_limit, seed)[0]

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

Modules: :mod:`~jaxgc.ordering.qmax` (``Q`` itself), :mod:`~jaxgc.ordering.bounds`
(lower bounds), :mod:`~jaxgc.ordering.coloring` (orders by construction),
:mod:`~jaxgc.ordering.search` (local search), :mod:`~jaxgc.ordering.milp` (exact
MILP) and :mod:`~jaxgc.ordering.optimizer` (the driver). All static NumPy / SciPy
(HiGHS): an ordering is chosen once, before training, and returned as a new
:class:`~jaxgc.assignments.Assignment` with the same chunk set per worker.
"""
from jaxgc.ordering.bounds import q_lower_bound
from jaxgc.ordering.coloring import coloring, shuffled
from jaxgc.ordering.optimizer import (
                                     METHODS,
                                     MILP_MAX_BINARIES,
                                     OrderingInfo,
                                     optimize,
                                     optimize_with_info,
)
from jaxgc.ordering.qmax import (
                                     chunk_terms,
                                     exhaustive_optimum,
                                     q_max,
                                     q_max_all_orderings,
                                     q_max_brute_force,
)

__all__ = [
    "METHODS",
    "MILP_MAX_BINARIES",
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

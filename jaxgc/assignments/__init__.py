"""Assignments: which chunks each worker holds, and in what order (PROTOCOL.md §1).

An :class:`Assignment` is an int array ``order`` of shape ``[m, max_load]``:
``order[j, t]`` is the chunk that worker ``j`` processes ``t``-th (0-based), and
``-1`` marks an empty slot. Empty slots come after all of a worker's chunks.

Everything here is static NumPy: protocols close over an assignment and the
jitted code sees its derived arrays as constants.
"""
from jaxgc.assignments._core import (
    ASSIGNMENTS,
    Assignment,
    cyclic,
    expander,
    fractional_repetition,
    from_biadjacency,
    from_graph,
    from_lists,
    from_order,
    random_regular,
)
from jaxgc.assignments._speeds import by_speed, speed_loads

__all__ = ["Assignment", "cyclic", "fractional_repetition", "from_order", "from_lists",
           "from_biadjacency", "from_graph", "random_regular", "ASSIGNMENTS", "expander",
           "by_speed", "speed_loads"]

"""Deprecated: use :mod:`jaxgc.backends.ray` (the same names); this path goes next release.

Each name read here warns (``DeprecationWarning``) and is the one in
:mod:`jaxgc.backends.ray`: ``from jaxgc.backends.ray import RayStep, WorkerPool``.
"""
from __future__ import annotations

from jaxgc._moved import moved

# Resolved on first use by __getattr__, each with a DeprecationWarning.
_MOVED = ("RayStep", "WorkerPool", "connect", "measured_durations", "work_slots", "INSTALL_HINT",
          "ACTOR_XLA_FLAGS")
__all__ = list(_MOVED)
__getattr__, __dir__ = moved(__name__, "jaxgc.backends.ray", _MOVED)

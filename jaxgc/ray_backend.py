"""Moved to jaxgc.backends.ray; this name keeps working.

The coded step on Ray actors (:class:`RayStep`), its pool, connecting, and the
replay of a measured step; see :mod:`jaxgc.backends.ray`.
"""
from jaxgc.backends.ray import (
  ACTOR_XLA_FLAGS,
  INSTALL_HINT,
  RayStep,
  WorkerPool,
  connect,
  measured_durations,
  work_slots,
)

__all__ = ["RayStep", "WorkerPool", "connect", "measured_durations", "work_slots",
           "INSTALL_HINT", "ACTOR_XLA_FLAGS"]

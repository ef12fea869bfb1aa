"""Moved to jaxgc.backends.spmd.layout; this name keeps working."""
from jaxgc.backends.spmd.layout import (
  WorkerChunks,
  WorkerLayout,
)

__all__ = ["WorkerChunks", "WorkerLayout"]

"""Moved to jaxgc.backends.spmd.devices; this name keeps working."""
from jaxgc.backends.spmd.devices import (
  AXIS,
  MODEL_AXIS,
  backend_started,
  make_mesh,
  set_cpu_device_count,
  use_gloo,
  workers_per_device,
)

__all__ = [
    "AXIS", "MODEL_AXIS", "backend_started", "set_cpu_device_count", "use_gloo", "make_mesh",
    "workers_per_device",
]

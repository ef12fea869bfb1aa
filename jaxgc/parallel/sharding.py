"""Moved to jaxgc.backends.spmd.sharding; this name keeps working."""
from jaxgc.backends.spmd.sharding import (
  MIN_SHARD_SIZE,
  MODEL_AXIS,
  MessageLayout,
  Placement,
  device_bytes,
  fsdp_rule,
  place_params,
)

__all__ = [
    "MODEL_AXIS", "MIN_SHARD_SIZE", "fsdp_rule", "Placement", "place_params", "MessageLayout",
    "device_bytes",
]

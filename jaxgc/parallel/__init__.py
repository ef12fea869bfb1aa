"""Data-parallel coded training: devices, meshes, the per-worker input layout and the step.

The public path of the SPMD backend, :mod:`jaxgc.backends.spmd`: the same names,
re-exported.
"""
from jaxgc.backends.spmd import (
  AXIS,
  MODEL_AXIS,
  MODES,
  CodedStep,
  MessageLayout,
  Placement,
  PlainStep,
  Plan,
  Solve,
  TrainState,
  WorkerChunks,
  WorkerLayout,
  backend_started,
  chunk_keys,
  coded_value_and_grad,
  decode_sharded,
  device_bytes,
  fsdp_rule,
  make_coded_step,
  make_mesh,
  make_plain_step,
  place_params,
  pvary,
  set_cpu_device_count,
  use_gloo,
  workers_per_device,
)

__all__ = [
    "AXIS", "MODEL_AXIS", "backend_started", "make_mesh", "set_cpu_device_count", "use_gloo",
    "workers_per_device", "WorkerChunks", "WorkerLayout", "MODES", "CodedStep", "Plan",
    "PlainStep", "Solve", "TrainState", "decode_sharded", "make_coded_step",
    "make_plain_step", "pvary", "coded_value_and_grad", "chunk_keys", "MessageLayout",
    "Placement", "device_bytes", "fsdp_rule", "place_params",
]

"""Data-parallel coded training: devices, meshes, the per-worker input layout and the step."""
from jaxgc.parallel.chunk_fn import chunk_keys
from jaxgc.parallel.devices import (
  AXIS,
  MODEL_AXIS,
  backend_started,
  make_mesh,
  set_cpu_device_count,
  use_gloo,
  workers_per_device,
)
from jaxgc.parallel.layout import WorkerChunks, WorkerLayout
from jaxgc.parallel.sharding import MessageLayout, Placement, device_bytes, fsdp_rule, place_params
from jaxgc.parallel.step import (
  MODES,
  CodedStep,
  PlainStep,
  Plan,
  Solve,
  TrainState,
  decode_sharded,
  make_coded_step,
  make_plain_step,
  pvary,
)
from jaxgc.parallel.value_and_grad import coded_value_and_grad

__all__ = [
    "AXIS", "MODEL_AXIS", "backend_started", "make_mesh", "set_cpu_device_count", "use_gloo",
    "workers_per_device", "WorkerChunks", "WorkerLayout", "MODES", "CodedStep", "Plan",
    "PlainStep", "Solve", "TrainState", "decode_sharded", "make_coded_step",
    "make_plain_step", "pvary", "coded_value_and_grad", "chunk_keys", "MessageLayout",
    "Placement", "device_bytes", "fsdp_rule", "place_params",
]

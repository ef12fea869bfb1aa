"""The SPMD backend: one ``shard_map`` program per coded step, simulated time.

Devices and meshes (:mod:`~jaxgc.backends.spmd.devices`), the per-worker input
layout (:mod:`~jaxgc.backends.spmd.layout`), where parameters live on a
``workers × model`` mesh (:mod:`~jaxgc.backends.spmd.sharding`), and the step
(:mod:`~jaxgc.backends.spmd.step`: its plan made one step ahead in
:mod:`~jaxgc.backends.spmd.lookahead`, its gradient in
:mod:`~jaxgc.backends.spmd.gradient`, the rules it shares with the Ray backend in
:mod:`jaxgc.backends.core`). The public path :mod:`jaxgc.parallel` re-exports the
same names.
"""
from jaxgc.backends.base import TrainState
from jaxgc.backends.spmd.chunk_fn import chunk_keys
from jaxgc.backends.spmd.collectives import decode_sharded, pvary
from jaxgc.backends.spmd.devices import (
  AXIS,
  MODEL_AXIS,
  backend_started,
  make_mesh,
  set_cpu_device_count,
  use_gloo,
  workers_per_device,
)
from jaxgc.backends.spmd.layout import WorkerChunks, WorkerLayout
from jaxgc.backends.spmd.lookahead import Plan, Solve
from jaxgc.backends.spmd.plain import PlainStep, make_plain_step
from jaxgc.backends.spmd.sharding import (
  MessageLayout,
  Placement,
  device_bytes,
  fsdp_rule,
  place_params,
)
from jaxgc.backends.spmd.step import MODES, CodedStep, make_coded_step
from jaxgc.backends.spmd.value_and_grad import coded_value_and_grad

__all__ = [
    "AXIS", "MODEL_AXIS", "backend_started", "make_mesh", "set_cpu_device_count", "use_gloo",
    "workers_per_device", "WorkerChunks", "WorkerLayout", "MODES", "CodedStep", "Plan",
    "PlainStep", "Solve", "TrainState", "decode_sharded", "make_coded_step",
    "make_plain_step", "pvary", "coded_value_and_grad", "chunk_keys", "MessageLayout",
    "Placement", "device_bytes", "fsdp_rule", "place_params",
]

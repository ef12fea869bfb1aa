"""Data-parallel coded training: devices, meshes, the per-worker input layout and the step.

The public path of the SPMD backend (:mod:`jaxgc.backends.spmd`, whose modules are
private): each name here is documented here and only here. :class:`TrainState`, the
state both backends' steps carry, is documented here too.

* devices and meshes: :func:`set_cpu_device_count`, :func:`make_mesh`, :func:`use_gloo`,
  :func:`backend_started`, :func:`workers_per_device`, :data:`AXIS`, :data:`MODEL_AXIS`;
* the per-worker input layout: :class:`WorkerChunks`, :class:`WorkerLayout`;
* the step: :func:`make_coded_step` (:class:`CodedStep`, :data:`MODES`),
  :func:`make_plain_step` (:class:`PlainStep`), :class:`TrainState`;
* your own loop: :func:`coded_value_and_grad`, :func:`chunk_keys`;
* parameters on a ``workers × model`` mesh: :func:`fsdp_rule`, :func:`place_params`,
  :class:`Placement`, :func:`device_bytes`, :class:`MessageLayout`;
* the step's parts, for tests and backends: :class:`Plan`, :class:`Solve`, :func:`pvary`,
  :func:`decode_sharded`.
"""
from __future__ import annotations

# Everything from the package, never its modules: they are private and may move.
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
    # devices and meshes
    "set_cpu_device_count", "make_mesh", "use_gloo", "backend_started", "workers_per_device",
    "AXIS", "MODEL_AXIS",
    # the per-worker input layout
    "WorkerChunks", "WorkerLayout",
    # the step
    "make_coded_step", "CodedStep", "MODES", "make_plain_step", "PlainStep", "TrainState",
    # your own loop
    "coded_value_and_grad", "chunk_keys",
    # parameters on a workers x model mesh
    "fsdp_rule", "place_params", "Placement", "device_bytes", "MessageLayout",
    # the step's parts (tests, backends)
    "Plan", "Solve", "pvary", "decode_sharded",
]

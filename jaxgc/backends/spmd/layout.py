"""Where workers and their chunks live: the per-worker input layout (PROTOCOL.md §6).

Workers ``0..m-1`` are laid out in order along the mesh axis ``workers``,
``ceil(m / devices)`` per device; ``m`` is padded to ``m_pad`` with phantom workers
that hold no chunk and never send. The step's data arrives per worker: every
leaf ``[m_pad, slots, chunk_batch, ...]``, row ``j`` holding worker ``j``'s chunks in
its processing order and sharded along ``workers``, so a device receives only its
own workers' chunks, ``slots · m_pad / devices`` of them instead of all ``N``.

Three ways to build that input (:class:`WorkerChunks`):

* :meth:`WorkerLayout.shard_chunks` from the step's chunks ``[N, ...]`` (host
  arrays: each device's rows are copied from the host; jax arrays, also under
  ``jit``: a gather that each device does for its own rows);
* :meth:`WorkerLayout.from_process_chunks` with several processes: each loads
  only the chunks :meth:`WorkerLayout.process_chunk_ids` names for its devices and
  ``jax.make_array_from_process_local_data`` assembles the global array, so no
  host holds the whole batch.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgc.backends.spmd.devices import AXIS, workers_per_device

__all__ = ["WorkerChunks", "WorkerLayout"]


class WorkerChunks(NamedTuple):
  """The step's data laid out per worker.

  Attributes:
    data: pytree like the step's chunks, each leaf ``[m_pad, slots, chunk_batch, ...]``
      (row ``j``, slot ``t``: chunk ``order[j, t]``), sharded along ``workers``.
  """
  data: Any


class WorkerLayout:
  """Static (NumPy) placement of workers and chunk slots on the devices of a mesh.

  Attributes:
    m: workers.
    m_pad: padded workers (a multiple of the devices on the workers axis).
    per_device: workers per device.
    num_devices: devices.
    slots: chunk slots per worker that the step computes (a protocol that uses
      only leading slots, as ``Uncoded``, ships and computes no others).
    order: int ``[m_pad, slots]``, chunk of each slot, ``-1`` for none.
    loss_owner: bool ``[m_pad, slots]``: the one slot per chunk whose loss counts
      (its earliest slot, the most likely to be computed anyway).
    sharding: ``NamedSharding`` of the per-worker input, ``P("workers")``.
  """

  def __init__(self, assignment, mesh: Mesh, slots: int | None = None,
               axis_name: str = AXIS):
    if axis_name not in mesh.axis_names:
      raise ValueError(f"mesh has axes {mesh.axis_names}, none named {axis_name!r}; pass "
                       f"axis_name=<the workers' axis> to the step, or build the mesh with "
                       f"jaxgc.parallel.make_mesh().")
    m, width = assignment.num_workers, assignment.max_load
    self.mesh, self.axis_name = mesh, axis_name
    self.num_chunks = assignment.num_chunks
    self.num_devices = mesh.shape[axis_name]
    self.m = m
    self.per_device = workers_per_device(m, self.num_devices)
    self.m_pad = self.per_device * self.num_devices
    self.slots = width if slots is None else int(slots)
    order = np.full((self.m_pad, width), -1, np.int32)
    order[:m] = assignment.order
    self.order = order[:, : self.slots]
    owner = np.zeros(self.order.shape, bool)
    seen = np.zeros(assignment.num_chunks, bool)
    for t in range(self.slots):          # earliest slot first, then lowest worker
      for j in range(self.m_pad):
        i = self.order[j, t]
        if i >= 0 and not seen[i]:
          seen[i] = owner[j, t] = True
    self.loss_owner = owner
    self.sharding = NamedSharding(mesh, P(axis_name))
    self._index = np.maximum(self.order, 0)     # phantom slots repeat chunk 0, never used
    self._take = jax.jit(lambda x: x[self._index], out_shardings=self.sharding)

  # -- shapes and checks --------------------------------------------------------
  def _check_global(self, chunks):
    for x in jax.tree.leaves(chunks):
      if np.ndim(x) < 1 or np.shape(x)[0] != self.num_chunks:
        raise ValueError(
            f"chunks must have leading axis num_chunks={self.num_chunks}, got a leaf of "
            f"shape {np.shape(x)}; split the batch with jaxgc.data.step_chunks(..., "
            f"num_chunks={self.num_chunks}).")
      sharding = getattr(x, "sharding", None)
      if _on_other_mesh(sharding, self.mesh):
        raise ValueError(
            "chunks live on another mesh than the step's; place them on the step's mesh "
            "(jax.device_put(x, NamedSharding(step.mesh, P()))) or build the step on theirs.")

  def check(self, worker_chunks: WorkerChunks) -> None:
    """Raises ``ValueError`` unless ``worker_chunks`` fits this layout (mesh, workers, slots)."""
    if not isinstance(worker_chunks, WorkerChunks):
      raise ValueError(f"expected WorkerChunks, got {type(worker_chunks).__name__}.")
    want = (self.m_pad, self.slots)
    for x in jax.tree.leaves(worker_chunks.data):
      if tuple(np.shape(x)[:2]) != want:
        raise ValueError(
            f"per-worker chunks have leading shape {tuple(np.shape(x)[:2])}, but this step's "
            f"{self.m} workers on {self.num_devices} devices need [m_pad, slots]={list(want)}: "
            "they were laid out for another mesh or protocol. Build them with this step's "
            "shard_chunks(chunks) (or from_process_chunks).")
      sharding = getattr(x, "sharding", None)
      if _on_other_mesh(sharding, self.mesh):
        raise ValueError(
            "per-worker chunks are sharded over another mesh than the step's; build them "
            "with this step's shard_chunks(chunks) (or from_process_chunks).")

  # -- building the per-worker input ----------------------------------------------
  def worker_chunks(self, chunks) -> WorkerChunks:
    """``chunks`` ``[N, ...]`` laid out per worker (:meth:`shard_chunks`), or, already
    :class:`WorkerChunks`, checked against this layout (:meth:`check`)."""
    if isinstance(chunks, WorkerChunks):
      self.check(chunks)
      return chunks
    return self.shard_chunks(chunks)

  def shard_chunks(self, chunks) -> WorkerChunks:
    """Lays the step's chunks ``[N, ...]`` out per worker, sharded along ``workers``.

    Host (NumPy) leaves are copied to each device row by row, so a device gets
    only its workers' chunks; jax arrays (also tracers under ``jit``) are
    gathered with the result constrained to ``P("workers")``.
    """
    self._check_global(chunks)
    index = self._index

    def place(x):
      if isinstance(x, jax.core.Tracer):
        return jax.lax.with_sharding_constraint(x[index], self.sharding)
      if isinstance(x, jax.Array):
        return self._take(x)
      x = np.asarray(x)
      shape = self.order.shape + x.shape[1:]

      def block(idx):
        assert idx is not None       # a NamedSharding gives every device an index
        return x[index[idx[:2]]][(Ellipsis,) + idx[2:]]
      return jax.make_array_from_callback(shape, self.sharding, block)
    return WorkerChunks(jax.tree.map(place, chunks))

  def process_rows(self) -> np.ndarray:
    """Rows (padded worker ids) of the per-worker input held by this process's devices."""
    shape = (self.m_pad,)
    rows: set[int] = set()
    for idx in self.sharding.addressable_devices_indices_map(shape).values():
      assert idx is not None         # a NamedSharding gives every device an index
      rows.update(range(self.m_pad)[idx[0]])
    return np.asarray(sorted(rows), np.int32)

  def process_chunk_ids(self) -> np.ndarray:
    """int ``[rows, slots]``: the chunk each of this process's (worker, slot) rows holds.

    ``-1`` marks a phantom slot (fill it with any data of the right shape). Load
    these chunks and pass them to :meth:`from_process_chunks`.
    """
    return self.order[self.process_rows()]

  def from_process_chunks(self, local) -> WorkerChunks:
    """The per-worker input from this process's part only.

    Args:
      local: pytree of leaves ``[rows, slots, chunk_batch, ...]``, row ``r`` slot
        ``t`` holding chunk ``process_chunk_ids()[r, t]``.
    """
    rows = len(self.process_rows())
    for x in jax.tree.leaves(local):
      if tuple(np.shape(x)[:2]) != (rows, self.slots):
        raise ValueError(
            f"this process holds {rows} worker rows x {self.slots} slots of this step's "
            f"mesh, got a leaf of shape {np.shape(x)}: the data was prepared for another "
            "mesh or process. Load the chunks named by process_chunk_ids().")

    def place(x):
      x = np.asarray(x)
      return jax.make_array_from_process_local_data(self.sharding, x,
                                                    (self.m_pad,) + x.shape[1:])
    return WorkerChunks(jax.tree.map(place, local))

  def device_bytes(self, worker_chunks: WorkerChunks) -> int:
    """Input bytes held by one device (the first addressable one)."""
    dev = jax.tree.leaves(worker_chunks.data)[0].addressable_shards[0].device
    return sum(s.data.nbytes for x in jax.tree.leaves(worker_chunks.data)
               for s in x.addressable_shards if s.device == dev)


def _on_other_mesh(sharding, mesh: Mesh) -> bool:
  """Whether ``sharding`` is a :class:`NamedSharding` over a concrete mesh with other devices
  than ``mesh`` (an abstract mesh, as under tracing, names no devices to compare)."""
  return (isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, Mesh)
          and not _same_devices(sharding.mesh, mesh))


def _same_devices(a: Mesh, b: Mesh) -> bool:
  return a.devices.shape == b.devices.shape and all(
      x == y for x, y in zip(a.devices.flat, b.devices.flat, strict=True))

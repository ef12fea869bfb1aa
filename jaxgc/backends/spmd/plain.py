"""The uncoded reference step: the coded step's per-device work, summed and ``psum``-ed."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from jaxgc.backends.base import TrainState
from jaxgc.backends.spmd.chunk_fn import ChunkLoss, check_loss_axes
from jaxgc.backends.spmd.collectives import psum_packed, pvary
from jaxgc.backends.spmd.devices import AXIS
from jaxgc.backends.spmd.gradient import chunk_mesh
from jaxgc.backends.spmd.layout import WorkerChunks, WorkerLayout
from jaxgc.backends.spmd.placement import PlacementSpec, check_mesh, placement
from jaxgc.backends.spmd.sharding import MessageLayout
from jaxgc.backends.spmd.step import check_batch_axis
from jaxgc.backends.spmd.stream import stream

__all__ = ["PlainStep", "make_plain_step"]


class PlainStep:
  """Same chunk gradients per device as the coded step, streamed, summed and ``psum``-ed.

  The reference for measuring coding overhead (time and memory: it accumulates
  the same per-device chunks one at a time), and a direct full-batch gradient
  (each chunk counted once) for tests.

  ``batch_axis_name`` is the coded step's (:func:`jaxgc.make_coded_step`): the axis a loss
  written for ``pmap`` names, bound to each chunk alone, so each chunk's batch statistics
  are its own and the gradient is the coded step's exact one.
  """

  def __init__(self, assignment, loss_fn, tx, mesh, *, compute_slots: int | None = None,
               axis_name: str = AXIS, check_vma: bool = True, param_sharding=None,
               batch_axis_name: str | None = None):
    check_mesh(mesh, axis_name)
    self.batch_axis_name = check_batch_axis(batch_axis_name, mesh)
    self.assignment, self.param_sharding = assignment, param_sharding
    self.loss_fn, self.tx, self.mesh, self.axis_name = loss_fn, tx, mesh, axis_name
    self.chunk_loss = ChunkLoss(loss_fn)
    self.check_vma = check_vma
    self.place = PlacementSpec(mesh, axis_name, param_sharding)
    self.layout = WorkerLayout(assignment, mesh, compute_slots, axis_name)
    # Weight 1/(#computed copies) per slot: every chunk counted exactly once.
    order = self.layout.order
    valid = order >= 0
    copies = np.bincount(order[valid], minlength=assignment.num_chunks)
    self.weight = np.where(valid, 1.0 / np.maximum(copies[np.maximum(order, 0)], 1),
                           0.0).astype(np.float32)

  def shard_chunks(self, chunks) -> WorkerChunks:
    return self.layout.shard_chunks(chunks)

  def gradient(self, params, chunks):
    """``(Σ_i g_i as a pytree, loss)``."""
    lay, ax = self.layout, self.axis_name
    msg = MessageLayout(placement(self.place, params), 1)
    local = lay.worker_chunks(chunks).data
    # The coded step's refusal of a collective over any other axis, on one chunk's shapes.
    shape = lambda x, lead=0: jax.ShapeDtypeStruct(np.shape(x)[lead:], x.dtype)
    check_loss_axes(self.chunk_loss, jax.tree.map(shape, params),
                    jax.tree.map(lambda x: shape(x, 2), local), None, (), self.batch_axis_name,
                    self.mesh.axis_names, ax)

    def body(params, local):
      wids = jax.lax.axis_index(ax) * lay.per_device + jnp.arange(lay.per_device)
      weight = jnp.asarray(self.weight)[wids]
      # The loss as the coded step counts it: each chunk once, at its loss-owning slot.
      owner = jnp.asarray(lay.loss_owner, jnp.float32)[wids]
      z, loss, _, _ = stream(self.chunk_loss, pvary(params, ax), local, weight[..., None],
                             weight != 0, owner, msg, ax)
      g, loss = psum_packed((tuple(jnp.sum(x, 0) for x in z), loss), ax)
      return msg.join(tuple(x[None] for x in g)), loss

    batch = () if self.batch_axis_name is None else (self.batch_axis_name,)
    fn = jax.shard_map(body, mesh=chunk_mesh(self.mesh, self.batch_axis_name),
                       in_specs=(P(), P(ax)), out_specs=(P(), P()), axis_names={ax, *batch},
                       check_vma=self.check_vma)
    return fn(params, local)

  def update(self, state: TrainState, chunks, key=None):
    del key
    grads, loss = self.gradient(state.params, chunks)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state), {"loss": loss}

  def jit(self, donate: bool = False):
    return jax.jit(self.update, donate_argnums=(0,) if donate else ())


def make_plain_step(assignment, loss_fn, tx, mesh, *, compute_slots: int | None = None,
                    axis_name: str = AXIS, check_vma: bool = True,
                    param_sharding=None, batch_axis_name: str | None = None) -> PlainStep:
  """Builds a :class:`PlainStep` (uncoded, same per-device work; ``batch_axis_name`` as in
  :func:`jaxgc.make_coded_step`)."""
  return PlainStep(assignment, loss_fn, tx, mesh, compute_slots=compute_slots,
                   axis_name=axis_name, check_vma=check_vma, param_sharding=param_sharding,
                   batch_axis_name=batch_axis_name)

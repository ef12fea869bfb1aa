"""The uncoded reference step: the coded step's per-device work, summed and ``psum``-ed."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from jaxgc.backends.base import TrainState
from jaxgc.backends.spmd.chunk_fn import ChunkLoss
from jaxgc.backends.spmd.collectives import psum_packed, pvary
from jaxgc.backends.spmd.devices import AXIS
from jaxgc.backends.spmd.layout import WorkerChunks, WorkerLayout
from jaxgc.backends.spmd.placement import PlacementSpec, check_mesh, placement
from jaxgc.backends.spmd.sharding import MessageLayout
from jaxgc.backends.spmd.stream import stream

__all__ = ["PlainStep", "make_plain_step"]


class PlainStep:
  """Same chunk gradients per device as the coded step, streamed, summed and ``psum``-ed.

  The reference for measuring coding overhead (time and memory: it accumulates
  the same per-device chunks one at a time), and a direct full-batch gradient
  (each chunk counted once) for tests.
  """

  def __init__(self, assignment, loss_fn, tx, mesh, *, compute_slots: int | None = None,
               axis_name: str = AXIS, check_vma: bool = True, param_sharding=None):
    check_mesh(mesh, axis_name)
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

    def body(params, local):
      wids = jax.lax.axis_index(ax) * lay.per_device + jnp.arange(lay.per_device)
      weight = jnp.asarray(self.weight)[wids]
      # The loss as the coded step counts it: each chunk once, at its loss-owning slot.
      owner = jnp.asarray(lay.loss_owner, jnp.float32)[wids]
      z, loss, _, _ = stream(self.chunk_loss, pvary(params, ax), local, weight[..., None],
                             weight != 0, owner, msg, ax)
      g, loss = psum_packed((tuple(jnp.sum(x, 0) for x in z), loss), ax)
      return msg.join(tuple(x[None] for x in g)), loss

    fn = jax.shard_map(body, mesh=self.mesh, in_specs=(P(), P(ax)), out_specs=(P(), P()),
                       axis_names={ax}, check_vma=self.check_vma)
    return fn(params, lay.worker_chunks(chunks).data)

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
                    param_sharding=None) -> PlainStep:
  """Builds a :class:`PlainStep` (uncoded, same per-device work)."""
  return PlainStep(assignment, loss_fn, tx, mesh, compute_slots=compute_slots,
                   axis_name=axis_name, check_vma=check_vma, param_sharding=param_sharding)

"""A device's chunk stream: its workers' messages, one chunk gradient at a time.

Every device streams over its workers' chunk slots (``lax.scan``): it computes a
slot's chunk gradient only where the slot's encoding coefficients are nonzero
(``lax.cond``) and accumulates the worker's message
``z_j = Σ_t Σ_k enc[j,t,k] g_{order[j,t]}^{(k)}`` (length ``⌈d/ℓ⌉``) as it goes,
so a worker's memory does not grow with its load.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgc.backends.spmd.chunk_fn import chunk_keys
from jaxgc.backends.spmd.collectives import pvary, zeros_of
from jaxgc.backends.spmd.layout import WorkerLayout
from jaxgc.backends.spmd.sharding import MessageLayout

__all__ = ["stream", "chunk_inputs"]


def chunk_inputs(layout: WorkerLayout, wids, key, args) -> dict:
  """:func:`stream`'s chunk arguments on the device of workers ``wids`` ``[w]``: its slots'
  chunk ids ``[w, slots]``, the chunk keys ``[N]`` (:func:`chunk_keys`, for a loss that
  takes ``rng``; ``key=None``: none) and the loss's extra ``args``, all the same on every
  copy of a chunk (PROTOCOL.md §12)."""
  return dict(ids=jnp.asarray(layout.order)[wids], args=args, num_chunks=layout.num_chunks,
              keys=None if key is None else chunk_keys(key, layout.num_chunks))


def stream(loss_fn, params, local, coef, compute, loss_weight, msg: MessageLayout,
           axis_name: str, ids=None, keys=None, args=(), num_chunks: int = 0):
  """Streams over this device's ``w × slots`` chunk slots, one chunk gradient at a time.

  Slot ``(j, t)`` adds ``Σ_k coef[j,t,k] · g^{(k)}`` to message ``j`` (``ℓ = 1``
  and ``coef = weight`` give the plain weighted sum); its gradient is computed
  only where ``compute[j, t]``; elsewhere at most a forward pass runs, for the
  loss, where ``loss_weight[j, t] != 0``.

  Args:
    loss_fn: a :class:`~jaxgc.backends.spmd.chunk_fn.ChunkLoss`, ``(params, chunk, key,
      args) -> (loss, aux)``.
    params: device-varying parameters.
    local: this device's chunks, leaves ``[w, slots, ...]``.
    coef: ``[w, slots, ℓ]``; compute: bool ``[w, slots]``; loss_weight: ``[w, slots]``.
    msg: the message layout (messages ``[w, ...]`` held shard by shard).
    ids: int ``[w, slots]``, the chunk of each slot (``-1``: none); keys: ``[N]``
      chunk keys (:func:`~jaxgc.backends.spmd.chunk_fn.chunk_keys`) or ``None``.
  Returns:
    ``(z, Σ loss_weight · loss [], chunk gradients computed [] int32, aux)``: ``z`` the
    ``w`` messages (``msg``'s parts with a leading ``[w]``, ``≈ ⌈d/ℓ⌉`` numbers each);
    ``aux`` leaves ``[N, ...]``, chunk ``i``'s row from its slot with
    ``loss_weight != 0`` on this device, zeros elsewhere (``()`` without aux).
  """
  w, slots = compute.shape
  ids = jnp.zeros((w, slots), jnp.int32) if ids is None else jnp.maximum(ids, 0)
  call = lambda p, j, t: loss_fn(p, jax.tree.map(lambda a: a[j, t], local),
                                 None if keys is None else keys[ids[j, t]], args)
  loss_shape, aux_shape = jax.eval_shape(lambda: call(params, 0, 0))
  vary = lambda x: pvary(x, axis_name)

  def gradient(j, t):
    (loss, aux), g = jax.value_and_grad(lambda p: call(p, j, t), has_aux=True)(params)
    return vary((loss, aux, msg.encode(g, coef[j, t])))

  def forward(j, t):
    loss, aux = call(params, j, t)
    return vary((loss, aux, msg.zeros()))

  def nothing(j, t):
    del j, t
    return vary((jnp.zeros(loss_shape.shape, loss_shape.dtype), zeros_of(aux_shape),
                 msg.zeros()))

  def body(carry, idx):
    z, loss, n, aux = carry
    j, t = idx // slots, idx % slots
    branch = jnp.where(compute[j, t], 2, jnp.where(loss_weight[j, t] != 0, 1, 0))
    loss_jt, a, contrib = jax.lax.switch(branch, (nothing, forward, gradient), j, t)
    # Each chunk's aux from one copy: the slot that counts its loss.
    i, own = ids[j, t], loss_weight[j, t] != 0
    aux = jax.tree.map(lambda buf, x: buf.at[i].set(jnp.where(own, x, buf[i])), aux, a)
    z = tuple(zp.at[j].add(cp) for zp, cp in zip(z, contrib, strict=True))
    return (z, loss + loss_weight[j, t] * loss_jt, n + compute[j, t].astype(jnp.int32), aux), None

  aux0 = jax.tree.map(lambda s: jnp.zeros((max(num_chunks, 1),) + s.shape, s.dtype), aux_shape)
  init = vary((msg.zeros(w), jnp.zeros((), loss_shape.dtype), jnp.zeros((), jnp.int32), aux0))
  (z, loss, n, aux), _ = jax.lax.scan(body, init, jnp.arange(w * slots))
  return z, loss, n, aux

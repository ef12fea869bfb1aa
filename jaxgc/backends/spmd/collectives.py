"""The SPMD step's collectives inside ``shard_map``: varying casts, packed ``psum``, the decode.

On CPU meshes every all-reduce is a rendezvous of all device threads and costs far
more than the bytes it moves, so a step uses one per round: the decode, the
erasure flags, the loss and the next step's plan travel together
(:func:`psum_decode`), small leaves packed into one vector per dtype
(:func:`psum_packed`). PS-side work runs on one device and is broadcast by the
same ``psum`` (:func:`compute_once`).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgc.backends import core
from jaxgc.backends.spmd.devices import AXIS
from jaxgc.backends.spmd.sharding import MessageLayout

__all__ = [
    "pvary", "decode_sharded", "PACK_LIMIT", "psum_packed", "psum_decode", "zeros_of",
    "compute_once",
]

PACK_LIMIT = 1 << 16   # leaves up to this many elements travel packed in one vector


def pvary(tree, axis_name):
  """Marks every leaf device-varying along ``axis_name`` (``jax.lax.pcast``).

  Needed before ``jax.grad`` inside ``shard_map``: the gradient w.r.t. an
  *invariant* (``P()``) input is, by the transpose rules, already ``psum``-ed over
  the axis; the coded step needs each worker's own chunk gradients.
  """
  cast = lambda x: (x if axis_name in jax.typeof(x).manual_axis_type.varying
                    else jax.lax.pcast(x, axis_name, to="varying"))
  return jax.tree.map(cast, tree)


def decode_sharded(msgs, dec, d: int, axis_name: str = AXIS):
  """The PS decode (:func:`jaxgc.backends.core.decode`) of flat messages, from inside
  ``shard_map``: each device decodes its workers, and a ``psum`` adds them.

  Args:
    msgs: this device's messages ``[w, ⌈d/ℓ⌉]`` (its ``w`` workers).
    dec: this device's columns of the decoding matrix, ``[ℓ, w]``.
    d: gradient length.
  Returns:
    ``[d]``, identical on every device (device-invariant, so it may leave
    ``shard_map`` as ``P()`` under ``check_vma=True``).
  """
  return jax.lax.psum(core.decode(msgs, dec), axis_name).reshape(-1)[:d]


def psum_packed(tree, axis_name, whole=()):
  """``psum`` of a pytree as one all-reduce: small leaves packed, one vector per dtype.

  ``whole``: a pytree summed in the same all-reduce but never packed (message parts
  sharded over a group: packing would gather them); then returns ``(tree, whole)``.

  Integer and bool leaves ride in float32, exact below 2**24 (counts and flags).
  Large leaves (gradients) are operands of the same all-reduce as they are:
  packing would copy them.
  """
  leaves, treedef = jax.tree.flatten(tree)
  big = [i for i, x in enumerate(leaves) if x.size > PACK_LIMIT]
  wire = [jnp.float32 if not jnp.issubdtype(x.dtype, jnp.floating) else x.dtype for x in leaves]
  groups: dict[Any, list[int]] = {}
  for i, dt in enumerate(wire):
    if i not in big:
      groups.setdefault(jnp.dtype(dt), []).append(i)
  packed = [jnp.concatenate([jnp.ravel(leaves[i]).astype(dt) for i in idx])
            for dt, idx in groups.items()]
  summed = jax.lax.psum(([leaves[i] for i in big], packed, whole), axis_name)
  out = [None] * len(leaves)
  for i, x in zip(big, summed[0], strict=True):
    out[i] = x
  for flat, idx in zip(summed[1], groups.values(), strict=True):
    start = 0
    for i in idx:
      size = int(np.prod(leaves[i].shape))
      part = flat[start:start + size].reshape(leaves[i].shape)
      if leaves[i].dtype == jnp.bool_:
        part = part > 0
      out[i] = part.astype(leaves[i].dtype)
      start += size
  out = jax.tree.unflatten(treedef, out)
  return (out, summed[2]) if jax.tree.leaves(whole) else out


def psum_decode(msg: MessageLayout, part, rest, axis_name):
  """``(part, *rest)`` psummed in one all-reduce; a part sharded over a group travels whole."""
  s = msg.num_sharded_parts
  if not s:
    return psum_packed((part,) + tuple(rest), axis_name)
  out, sharded = psum_packed((part[s:],) + tuple(rest), axis_name, whole=part[:s])
  return (tuple(sharded) + tuple(out[0]),) + tuple(out[1:])


def zeros_of(shapes):
  """Zeros of the ``jax.ShapeDtypeStruct`` pytree ``shapes``."""
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def compute_once(fn, axis_name, device: int, broadcast: bool = True):
  """Runs ``fn()`` (invariant inputs) on one device only and broadcasts its result.

  The PS-side work of a step (stop time, the coefficient solve) is the same on
  every device. Computed replicated it would run once per device, which on a
  CPU host with few cores is a real cost; here one device computes it and a
  ``psum`` against zeros elsewhere broadcasts it exactly.
  """
  shapes = jax.eval_shape(fn)
  mine = jax.lax.axis_index(axis_name) == device
  out = jax.lax.cond(mine, lambda: pvary(fn(), axis_name),
                     lambda: pvary(zeros_of(shapes), axis_name))
  # Without broadcast the caller psums it, packed with other traffic.
  return psum_packed(out, axis_name) if broadcast else out

"""Message precision on the wire (PROTOCOL.md §15), once for both backends.

A worker encodes its message ``z_j`` in float32; :func:`to_wire` casts it to the wire
precision ``p``; the PS turns it back into float32 with :func:`from_wire` and decodes
as before (:func:`jaxgc.backends.core.decode`). The SPMD step, whose "wire" is an
all-reduce, applies both at once (:func:`round_trip`); the Ray actors send the wire form.

- ``float32`` (the default): no cast; the message keeps the gradient's dtype, bit for bit.
- ``bfloat16``: ``b = 2`` bytes a number, relative error ``≤ 2⁻⁸`` per number.
- ``int8``: blocks of :data:`INT8_BLOCK` consecutive numbers along the message's last
  axis, each with one float32 scale ``s = max|z|/127`` sent beside it:
  ``q = round(z/s) ∈ [-127, 127]``, ``z̃ = q·s``, so ``|z̃ − z| ≤ s/2 = max|z|/254`` in
  the block; ``n + 4⌈n/256⌉`` bytes for ``n`` numbers.

A non-finite message stays non-finite on the wire, so the PS erases it as before
(PROTOCOL.md §2): bfloat16 keeps NaN and Inf, and an int8 block with one has a
non-finite scale, which makes every number of the block non-finite again.

The decode error this adds is about ``cond · ε_p · ‖g‖`` (:func:`epsilon`); the step
reports the condition number, and ``benchmarks/precision.py`` measures both.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxgc.errors import ParamError

__all__ = [
    "MESSAGE_DTYPES", "INT8_BLOCK", "SCALE_BYTES", "check_message_dtype", "epsilon",
    "wire_bytes", "to_wire", "from_wire", "round_trip", "wire_nbytes",
]

MESSAGE_DTYPES = ("float32", "bfloat16", "int8")
INT8_BLOCK = 256
"""Numbers per int8 block (one float32 scale each): the scales cost ``4/256`` of a byte a
number, and a block is short enough that one large entry rounds few others to zero."""
SCALE_BYTES = 4


def check_message_dtype(message_dtype) -> str:
  """The wire precision's name, one of :data:`MESSAGE_DTYPES` (``None``: ``"float32"``).

  Accepts the name or a dtype (``jnp.bfloat16``).

  Raises:
    jaxgc.errors.ParamError: (a ``ValueError``, ``param="message_dtype"``) any other value.
  """
  if message_dtype is None:
    return "float32"
  name = message_dtype if isinstance(message_dtype, str) else None
  if name is None:
    try:
      name = jnp.dtype(message_dtype).name
    except TypeError:
      name = None
  if name not in MESSAGE_DTYPES:
    raise ParamError(f"message_dtype must be one of {list(MESSAGE_DTYPES)} (the messages' "
                     f"precision on the wire), got {message_dtype!r}.", "message_dtype")
  return name


def epsilon(message_dtype) -> float:
  """``ε_p``, the relative rounding error of one number on the wire.

  ``2⁻²⁴`` (float32) and ``2⁻⁸`` (bfloat16), the unit roundoffs; ``1/254`` for int8,
  relative to the largest magnitude in the number's block (half a step of ``max|z|/127``).
  """
  return {"float32": 2.0 ** -24, "bfloat16": 2.0 ** -8,
          "int8": 1.0 / 254}[check_message_dtype(message_dtype)]


def wire_bytes(numbers: int, message_dtype, dtype=jnp.float32) -> int:
  """Bytes of a message of ``numbers`` numbers on the wire: ``b · n``, and for int8
  ``n + 4⌈n/256⌉`` (the scales counted). ``dtype``: the gradient's, which ``float32``
  (no cast) keeps."""
  name, n = check_message_dtype(message_dtype), int(numbers)
  if name == "int8":
    return n + SCALE_BYTES * -(-n // INT8_BLOCK)
  size = jnp.dtype(dtype).itemsize if name == "float32" else jnp.dtype(name).itemsize
  return n * int(size)


def _blocks(x):
  """``[..., n] -> [..., ⌈n/256⌉, 256]``, zero-padded."""
  n = x.shape[-1]
  nb = -(-n // INT8_BLOCK)
  x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nb * INT8_BLOCK - n)])
  return x.reshape(x.shape[:-1] + (nb, INT8_BLOCK))


def to_wire(z, message_dtype):
  """``z [..., n]`` (float32) as sent: an array of the wire dtype, or for int8 the pair
  ``(q int8 [..., n], scales float32 [..., ⌈n/256⌉])``; ``float32`` returns ``z`` itself."""
  name = check_message_dtype(message_dtype)
  if name == "float32":
    return z
  if name == "bfloat16":
    return jnp.asarray(z).astype(jnp.bfloat16)
  z = jnp.asarray(z, jnp.float32)
  blocks = _blocks(z)
  # NaN in a block makes its max NaN and Inf makes it Inf: the scale carries it.
  scale = jnp.max(jnp.abs(blocks), axis=-1) / 127.0
  q = jnp.where(scale[..., None] > 0, blocks / scale[..., None], 0.0)
  q = jnp.round(jnp.clip(jnp.where(jnp.isfinite(q), q, 0.0), -127, 127)).astype(jnp.int8)
  return q.reshape(q.shape[:-2] + (-1,))[..., : z.shape[-1]], scale


def from_wire(wire, dtype=jnp.float32):
  """A message as the PS decodes it: :func:`to_wire`'s output back in ``dtype`` (float32).

  For int8, ``q · s`` per block: a non-finite scale makes its whole block non-finite
  (``0 · Inf`` is NaN), so a corrupted message is still erased.
  """
  if not isinstance(wire, tuple):
    return jnp.asarray(wire).astype(dtype)
  q, scale = jnp.asarray(wire[0]), jnp.asarray(wire[1])
  z = _blocks(q.astype(jnp.float32)) * scale[..., None].astype(jnp.float32)
  return z.reshape(z.shape[:-2] + (-1,))[..., : q.shape[-1]].astype(dtype)


def round_trip(z, message_dtype):
  """``from_wire(to_wire(z))`` in ``z``'s dtype: the message the PS decodes, in one
  program (the SPMD step). ``float32`` returns ``z`` itself."""
  if check_message_dtype(message_dtype) == "float32":
    return z
  return from_wire(to_wire(z, message_dtype), z.dtype)


def wire_nbytes(wire) -> int:
  """Bytes of a message as sent (:func:`to_wire`'s output, scales included)."""
  return sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(wire))

"""What every protocol shares: the state→coefficients interface, encode and decode.

A protocol maps the state ``k`` (chunks finished per worker, ``[m]``) to

* encoding coefficients ``enc[j, t, k]`` (``[m, max_load, ℓ]``): worker ``j`` sends
  ``z_j = Σ_t Σ_k enc[j,t,k] · g_{order[j,t]}^{(k)}``, a vector of length ``⌈d/ℓ⌉``;
* a decoding matrix ``dec`` (``[ℓ, m]``): block ``r`` of the estimate is ``Σ_j dec[r,j] z_j``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxgc.assignments import Assignment


def num_blocks(d: int, ell: int) -> int:
  """Message length ``⌈d/ℓ⌉`` (``d`` is zero-padded up to a multiple of ``ℓ``)."""
  return -(-d // ell)


def split_blocks(x, ell: int):
  """``[..., d] -> [..., ℓ, ⌈d/ℓ⌉]``: ``g = [g^(1); …; g^(ℓ)]`` after zero padding."""
  d = x.shape[-1]
  b = num_blocks(d, ell)
  x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, b * ell - d)])
  return x.reshape(*x.shape[:-1], ell, b)


UNROLL_LIMIT = 64   # terms up to which weighted_sum is unrolled into one fused pass


def weighted_sum(coef, x, mask=None):
  """``Σ_k coef[..., k] · x[..., k, :]`` -> ``[..., b]``, leaving out terms where ``mask`` is False.

  A masked-out term is excluded even if its ``x`` is NaN/Inf. Up to
  :data:`UNROLL_LIMIT` terms this is one unrolled, fused elementwise pass over
  ``x``; a masked einsum would copy ``x`` (the mask) and then run a
  matrix-vector product, and XLA:CPU's dot alone took 1.2x as long on a
  563k-parameter gradient.
  """
  if coef.shape[-1] <= UNROLL_LIMIT:
    terms = [coef[..., k, None] * x[..., k, :] for k in range(coef.shape[-1])]
    if mask is not None:
      terms = [jnp.where(mask[..., k, None], t, 0) for k, t in enumerate(terms)]
    return sum(terms)
  if mask is not None:
    x = jnp.where(mask[..., None], x, 0)
  return jnp.einsum("...k,...kb->...b", coef, x)


def encode(chunk_grads, enc):
  """Worker messages ``z_j = Σ_t Σ_k enc[j,t,k] g_{order[j,t]}^{(k)}``.

  Args:
    chunk_grads: ``[..., max_load, d]``; slot ``t`` of worker ``j`` holds the
      gradient of chunk ``order[j, t]`` (leading ``...`` is usually ``m``).
    enc: ``[..., max_load, ℓ]`` from ``protocol.encoding``.
  Returns:
    ``[..., ⌈d/ℓ⌉]``. Slots with zero coefficients are excluded even if their
    gradient is NaN/Inf (an unfinished chunk must not poison the message).
  """
  chunk_grads, enc = jnp.asarray(chunk_grads), jnp.asarray(enc)
  if chunk_grads.ndim < 2 or enc.ndim != chunk_grads.ndim or enc.shape[:-1] != chunk_grads.shape[:-1]:
    raise ValueError(
        f"encode: chunk_grads {chunk_grads.shape} and enc {enc.shape} do not match; "
        "expected chunk_grads [..., max_load, d] and enc [..., max_load, ell] with the "
        "same leading shape.")
  slots, ell = enc.shape[-2:]
  enc = enc.astype(chunk_grads.dtype)
  lead = enc.shape[:-2]
  used = jnp.broadcast_to(jnp.any(enc != 0, axis=-1, keepdims=True), enc.shape)
  blocks = split_blocks(chunk_grads, ell)                     # [..., max_load, ℓ, b]
  # Terms (t, k) in slot-major order: z = Σ_t Σ_k enc[t, k] · block k of slot t.
  return weighted_sum(enc.reshape(*lead, slots * ell),
                      blocks.reshape(*lead, slots * ell, blocks.shape[-1]),
                      used.reshape(*lead, slots * ell))


def decode(msgs, dec, d: int):
  """Estimate ``ĝ = [ĝ^(1); …; ĝ^(ℓ)]``, ``ĝ^(r) = Σ_j dec[r,j] z_j``, cut to length ``d``.

  Args:
    msgs: ``[m, ⌈d/ℓ⌉]``.
    dec: ``[ℓ, m]`` from ``protocol.decoding``.
    d: the gradient length.
  Returns: ``[d]``.
  """
  msgs, dec = jnp.asarray(msgs), jnp.asarray(dec)
  if msgs.ndim != 2 or dec.ndim != 2 or dec.shape[1] != msgs.shape[0]:
    raise ValueError(
        f"decode: msgs {msgs.shape} and dec {dec.shape} do not match; expected msgs "
        "[m, ceil(d/ell)] and dec [ell, m].")
  ell = dec.shape[0]
  if msgs.shape[1] != num_blocks(d, ell):
    raise ValueError(
        f"decode: messages have length {msgs.shape[1]} but d={d}, ell={ell} needs "
        f"ceil(d/ell)={num_blocks(d, ell)}.")
  return decode_blocks(msgs, dec).reshape(-1)[:d]


def decode_blocks(msgs, dec):
  """``dec [ℓ, m] @ msgs [m, b] -> [ℓ, b]``, unchecked; the linear core of :func:`decode`.

  Linear in the workers, so a sharded PS decodes each device's workers and ``psum``s.
  Messages of workers with an all-zero column are masked, so a silent worker's
  garbage (NaN) cannot leak in through ``0 · NaN``.
  """
  used = jnp.any(dec != 0, axis=0)[:, None]
  return dec.astype(msgs.dtype) @ jnp.where(used, msgs, 0)


def expected_mse(coverage, ell: int, d: int, sigma2: float = 1.0):
  """``E‖ĝ − g‖² = σ² ⌈d/ℓ⌉ Σ_i max(0, ℓ − c_i)`` for i.i.d. isotropic chunk gradients.

  The partial-straggler deadline-mode error (PROTOCOL.md §2), from coverage ``[..., N]``.
  """
  lost = jnp.sum(jnp.maximum(0, ell - jnp.asarray(coverage)), axis=-1)
  return sigma2 * num_blocks(d, ell) * lost


def min_norm_decoder(coef, target):
  """Least-squares decoding ``dec = argmin ‖dec · M − E‖_F = E · pinv(M)``.

  ``coef``: ``[m, N, ℓ]`` effective encoding (zero rows for non-senders);
  ``target``: ``[ℓ, N, ℓ]`` what block ``r`` should equal. Returns ``[ℓ, m]``. This is
  the "optimal decoding" of approximate gradient coding, and exact when possible.
  """
  m = coef.shape[0]
  mat = coef.reshape(m, -1)
  # LAPACK's lstsq cutoff (max(shape)·eps), not pinv's 10× larger default: random
  # codes (Tandon) have legitimate singular values below the latter in float32,
  # and dropping one turns an exact decode into an O(1) error.
  rtol = max(mat.shape) * jnp.finfo(mat.dtype).eps
  return target.reshape(target.shape[0], -1) @ jnp.linalg.pinv(mat, rtol=rtol)


def check_dtype(dtype):
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"dtype must be a floating type, got {dtype}.")
  if dtype == jnp.float64 and not jax.config.jax_enable_x64:
    raise ValueError(
        "dtype=float64 needs 64-bit JAX: call jax.config.update('jax_enable_x64', True) "
        "before building the protocol.")
  return dtype


class Protocol:
  """Base class. Subclasses implement ``coefficients``, ``completion_time``, ``is_decodable``."""

  name = "protocol"

  def __init__(self, assignment: Assignment, ell: int = 1, dtype=jnp.float32):
    if not isinstance(assignment, Assignment):
      raise TypeError(
          f"expected a jaxgc.Assignment, got {type(assignment).__name__}; build one with "
          "jaxgc.assignments.cyclic(...) or jaxgc.assignments.from_order(...).")
    assignment.check_ell(ell)
    self.assignment = assignment
    self.ell = int(ell)
    self.dtype = check_dtype(dtype)

  # -- interface -------------------------------------------------------------
  def coefficients(self, counts):
    """``(enc [m, max_load, ℓ], dec [ℓ, m])`` at state ``counts`` ``[m]``."""
    raise NotImplementedError

  def encoding(self, counts):
    """Encoding coefficients ``[m, max_load, ℓ]``; zero for unfinished slots."""
    return self.coefficients(counts)[0]

  def decoding(self, counts):
    """Decoding matrix ``[ℓ, m]``."""
    return self.coefficients(counts)[1]

  def completion_time(self, durations):
    """Exact-recovery time ``[...]`` from durations ``[..., m, max_load]``; ``inf`` if never."""
    raise NotImplementedError

  def is_decodable(self, counts):
    """Whether state ``counts`` ``[..., m]`` allows exact recovery, ``[...]``."""
    raise NotImplementedError

  # -- shared helpers --------------------------------------------------------
  def coverage(self, counts):
    """``c_i(k)``, ``[..., N]``."""
    return self.assignment.coverage(counts)

  def message_size(self, d: int) -> int:
    return num_blocks(d, self.ell)

  def check_counts(self, counts):
    """Validates a concrete state; returns it as an int32 array."""
    if isinstance(counts, jax.core.Tracer):
      return counts
    c = np.asarray(counts)
    m = self.assignment.num_workers
    if c.shape[-1:] != (m,):
      raise ValueError(f"counts must have trailing shape [num_workers]=[{m}], got {c.shape}.")
    if (c < 0).any() or (c > self.assignment.loads).any():
      raise ValueError(
          f"counts must satisfy 0 <= k_j <= load_j; got {c.tolist()} with loads "
          f"{self.assignment.loads.tolist()}.")
    return jnp.asarray(c, jnp.int32)

  def slot_coefficients(self, coef, active):
    """Gathers per-(worker, chunk) coefficients ``[m, N, ℓ]`` into slots ``[m, max_load, ℓ]``.

    ``active`` ``[m, max_load]`` marks slots that contribute.
    """
    order = jnp.asarray(np.maximum(self.assignment.order, 0))
    enc = jnp.take_along_axis(coef, order[:, :, None], axis=1)
    return jnp.where(active[..., None], enc, 0).astype(self.dtype)

  def finished_slots(self, counts):
    """bool ``[m, max_load]``: slot ``t < k_j``."""
    t = jnp.arange(self.assignment.max_load)
    return (t[None, :] < jnp.asarray(counts)[:, None]) & jnp.asarray(self.assignment.slot_mask)

  def __repr__(self):
    return f"{type(self).__name__}({self.assignment!r}, ell={self.ell})"

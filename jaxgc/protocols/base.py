"""What every protocol shares: the state→coefficients interface, encode and decode.

A protocol maps the state ``k`` (chunks finished per worker, ``[m]``) to

* encoding coefficients ``enc[j, t, k]`` (``[m, max_load, ℓ]``): worker ``j`` sends
  ``z_j = Σ_t Σ_k enc[j,t,k] · g_{order[j,t]}^{(k)}``, a vector of length ``⌈d/ℓ⌉``;
* a decoding matrix ``dec`` (``[ℓ, m]``): block ``r`` of the estimate is ``Σ_j dec[r,j] z_j``.

Every protocol implements one :meth:`Protocol.solve` returning :class:`Coefficients`;
everything else (``coefficients``, ``encoding``, ``decoding``, :func:`estimate`)
derives from it. :func:`stop_time` is the one rule for when the PS stops.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgc import timing
from jaxgc.assignments import Assignment
from jaxgc.errors import ParamError

__all__ = [
    "Coefficients",
    "Protocol",
    "MODES",
    "stop_time",
    "estimate",
    "encode",
    "decode",
    "expected_mse",
    # Internals of the sharded step (not re-exported by jaxgc.protocols):
    "num_blocks",
    "split_blocks",
    "weighted_sum",
    "decode_blocks",
    "min_norm_decoder",
    "check_dtype",
]

MODES = ("exact", "deadline")


class Coefficients(NamedTuple):
  """What the PS derives from a state ``k``: one solve.

  Attributes:
    enc: ``[m, max_load, ℓ]`` encoding coefficients, 0 for slots not used.
    dec: ``[ℓ, m]`` decoding matrix.
    senders: bool ``[m]``: worker ``j`` sends a message at this state.
    condition: ``[]`` worst condition number of the solve (1.0 where none applies).
  """
  enc: jax.Array
  dec: jax.Array
  senders: jax.Array
  condition: jax.Array


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
  _check_floating("encode", "chunk_grads", chunk_grads)
  if (chunk_grads.ndim < 2 or enc.ndim != chunk_grads.ndim
      or enc.shape[:-1] != chunk_grads.shape[:-1]):
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
  _check_floating("decode", "msgs", msgs)
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


def _check_floating(fn: str, name: str, x):
  # An integer gradient would be truncated by the float coefficients (or give zeros).
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    raise ValueError(
        f"{fn}: {name} have dtype {x.dtype}, but gradients must be floating point; "
        f"cast them first, e.g. {name}.astype(jnp.float32).")


def decode_blocks(msgs, dec):
  """``Σ_j dec[r, j] z_j``: messages ``[w, ...]`` and ``dec [ℓ, w]`` -> ``[ℓ, ...]``, unchecked.

  The PS's one decode: the linear core of :func:`decode`, and what both backends call
  (:func:`jaxgc.backends.core.decode`). Linear in the workers, so a sharded PS decodes
  each device's ``w`` workers and sums. Messages of workers with an all-zero column are
  masked, so a silent worker's garbage (NaN) cannot leak in through ``0 · NaN``.
  """
  used = jnp.any(dec != 0, axis=0)
  msgs = jnp.where(used.reshape((-1,) + (1,) * (msgs.ndim - 1)), msgs, 0)
  return jnp.tensordot(dec.astype(msgs.dtype), msgs, axes=1)


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
    raise ParamError(f"dtype must be a floating type, got {dtype}.", "dtype")
  if dtype == jnp.float64 and not jax.config.read("jax_enable_x64"):
    raise ParamError(
        "dtype=float64 needs 64-bit JAX: call jax.config.update('jax_enable_x64', True) "
        "before building the protocol.", "dtype")
  return dtype


class Protocol:
  """Base class of the gradient-coding protocols.

  Uniform constructor ``(assignment, ell=1, *, dtype=float32, **options)``; each
  subclass names its options as keyword arguments, and an unknown one is a
  ``ValueError`` listing the valid ones. Subclasses implement :meth:`solve`,
  :meth:`completion_time` and :meth:`is_decodable`.

  Declared capabilities (read them instead of testing types):
    has_exact_mode: the protocol can recover the gradient exactly, so it has an
      exact mode (``IgnoreStragglers`` has not).
    reports_condition: :attr:`Coefficients.condition` is a real diagnostic, not
      the placeholder 1.0.
  """

  name = "protocol"
  has_exact_mode = True
  reports_condition = False

  def __init__(self, assignment: Assignment, ell: int = 1, *, dtype=jnp.float32, **options):
    if options:
      raise ParamError(
          f"unknown option(s) {sorted(options)} for {type(self).__name__}; valid options: "
          f"{type(self).option_names()}.", sorted(options)[0])
    if not isinstance(assignment, Assignment):
      raise TypeError(
          f"expected a jaxgc.Assignment, got {type(assignment).__name__}; build one with "
          "jaxgc.assignments.cyclic(...) or jaxgc.assignments.from_order(...).")
    assignment.check_ell(ell)
    self.assignment = assignment
    self.ell = int(ell)
    self.dtype = check_dtype(dtype)

  @classmethod
  def option_names(cls) -> list[str]:
    """Keyword options of the constructor (``dtype`` included), sorted."""
    params = inspect.signature(cls.__init__).parameters.values()
    return sorted(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)

  # -- interface -------------------------------------------------------------
  def solve(self, counts) -> Coefficients:
    """:class:`Coefficients` at state ``counts`` ``[m]`` (one state; ``jax.vmap`` for a batch)."""
    raise NotImplementedError

  def coefficients(self, counts):
    """``(enc [m, max_load, ℓ], dec [ℓ, m])`` at state ``counts`` ``[m]``."""
    c = self._solved(counts)
    return c.enc, c.dec

  def encoding(self, counts):
    """Encoding coefficients ``[m, max_load, ℓ]``; zero for unfinished slots."""
    return self._solved(counts).enc

  def decoding(self, counts):
    """Decoding matrix ``[ℓ, m]``."""
    return self._solved(counts).dec

  def condition_number(self, counts):
    """Worst condition number of the solve at this state, ``[]`` (1.0 where none applies)."""
    return self._solved(counts).condition

  def _solved(self, counts) -> Coefficients:
    """:meth:`solve`; a concrete state is validated here and solved by one compiled program.

    Run eagerly, a solve dispatches (and compiles, once per shape) each of its
    many small operations separately, which costs about ten times one compile.
    """
    return self._compiled("solve", counts)

  def _compiled(self, method: str, counts):
    """``getattr(self, method)(counts)``, by one compiled program for a concrete state.

    The program takes the protocol's arrays (its assignment's included) as arguments,
    so every protocol of one class, shape and options shares it (:func:`_shared_call`);
    one whose ``method`` needs its arrays' values while tracing compiles its own.
    """
    if isinstance(counts, jax.core.Tracer):
      return getattr(self, method)(counts)
    counts = self.check_counts(counts)
    if self._solve_parts is None:
      self._solve_parts = _solve_parts(self)
    if self._solve_parts is not False:
      skeleton, arrays = self._solve_parts
      try:
        return _shared_call(skeleton, method, arrays, counts)
      except _NEEDS_VALUES:
        self._solve_parts = False
    if self._jitted is None:
      self._jitted = {}
    if method not in self._jitted:
      self._jitted[method] = jax.jit(getattr(self, method))
    return self._jitted[method](counts)

  _jitted: dict[str, Callable[..., Any]] | None = None   # own programs, by method
  _solve_parts: Any = None      # (skeleton, arrays) of _shared_call; False: compile our own

  def completion_time(self, durations):
    """Exact-recovery time ``[...]`` from durations ``[..., m, max_load]``; ``inf`` if never."""
    raise NotImplementedError

  def is_decodable(self, counts):
    """Whether state ``counts`` ``[..., m]`` allows exact recovery, ``[...]``."""
    raise NotImplementedError

  # -- shared helpers --------------------------------------------------------
  def slots_in_use(self) -> np.ndarray:
    """bool ``[m, max_load]``: the slots that can ever carry a coefficient.

    Probed at the all-finished state, where every protocol's encoding is widest:
    ``Uncoded`` uses only each chunk's designated slot, so a backend need not
    compute (or ship) the rest. One compiled solve (:meth:`_solved`), not an eager one.
    """
    a = self.assignment
    enc = np.asarray(self._solved(a.loads).enc)
    return np.any(enc != 0, axis=-1) & a.slot_mask

  def coverage(self, counts):
    """``c_i(k)``, ``[..., N]``."""
    return self.assignment.coverage(counts)

  def message_size(self, d: int) -> int:
    return num_blocks(d, self.ell)

  def check_counts(self, counts, batched: bool = False, what: str = "solve"):
    """Validates a state ``[m]`` (``[..., m]`` if ``batched``); returns it as int32."""
    return self.assignment.check_counts(counts, batched=batched,
                                        what=f"{type(self).__name__}.{what}")

  def check_durations(self, durations):
    """Validates durations ``[..., m, max_load]`` (shape even under ``jit``)."""
    return self.assignment.check_durations(durations)

  def slot_coefficients(self, coef, active):
    """Gathers per-(worker, chunk) coefficients ``[m, N, ℓ]`` into slots ``[m, max_load, ℓ]``.

    ``active`` ``[m, max_load]`` marks slots that contribute.
    """
    order = jnp.maximum(jnp.asarray(self.assignment.order), 0)
    enc = jnp.take_along_axis(coef, order[:, :, None], axis=1)
    return jnp.where(active[..., None], enc, 0).astype(self.dtype)

  def finished_slots(self, counts):
    """bool ``[..., m, max_load]``: slot ``t < k_j`` (see :meth:`Assignment.finished_slots`)."""
    return self.assignment.finished_slots(counts)

  def __repr__(self):
    return f"{type(self).__name__}({self.assignment!r}, ell={self.ell})"


# -- one compiled solve per shape ----------------------------------------------

# Tracing a solve that reads its arrays' values (numpy on them, int() of one) raises one
# of these; that protocol then compiles its own program with its arrays as constants.
_NEEDS_VALUES = (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
                 jax.errors.TracerIntegerConversionError, jax.errors.TracerBoolConversionError)
_ASSIGNMENT_ARRAYS = ("loads", "slot_mask", "positions", "replication", "holders",
                      "biadjacency")


class _Skeleton(NamedTuple):
  """A protocol without its arrays: class and non-array attributes (hashable, so it is
  the static argument of :func:`_shared_call`); equal skeletons trace equal programs."""
  cls: type
  static: tuple[tuple[str, type, Hashable], ...]     # (name, type, value): 1 is not True
  assignment: tuple[str, tuple[tuple[str, Hashable], ...]] | None

  def rebuild(self, arrays: dict[str, Any]) -> Protocol:
    """The protocol with ``arrays`` (tracers) in place of its own."""
    view: Protocol = object.__new__(self.cls)
    view.__dict__.update((name, v) for name, _, v in self.static)
    view.__dict__.update({k: v for k, v in arrays.items() if k != "assignment"})
    if self.assignment is not None:
      name, static = self.assignment
      asg = object.__new__(Assignment)     # no __post_init__: the arrays were checked
      asg.__dict__.update(static)
      asg.__dict__.update(arrays["assignment"])
      view.__dict__[name] = asg
    return view


def _static(v) -> Hashable:
  """``v`` if it may be a static argument (a value that is no array); raises ``TypeError``."""
  if v is None or isinstance(v, (bool, int, float, str, np.dtype, np.generic)):
    return v
  if isinstance(v, tuple):
    return tuple(_static(x) for x in v)
  raise TypeError(type(v).__name__)


def _solve_parts(protocol: Protocol) -> tuple[_Skeleton, dict[str, Any]] | bool:
  """``(skeleton, arrays)`` of ``protocol`` for :func:`_shared_call`, the arrays on the
  device once; ``False`` if an attribute is neither an array nor a static value."""
  static, arrays, assignment = [], {}, None
  for name, v in sorted(vars(protocol).items()):
    if name in ("_jitted", "_solve_parts"):
      continue
    if isinstance(v, Assignment):
      # Its derived arrays too: they are computed from ``order`` with NumPy, never traced.
      parts = {k: getattr(v, k) for k in ("order", *_ASSIGNMENT_ARRAYS)}
      arrays["assignment"] = jax.device_put(parts)
      assignment = (name, (("num_chunks", v.num_chunks), ("kind", v.kind)))
    elif isinstance(v, (np.ndarray, jax.Array)) and not isinstance(v, jax.core.Tracer):
      arrays[name] = jax.device_put(v)     # jnp.asarray would compile a copy per shape
    else:
      try:
        static.append((name, type(v), _static(v)))
      except TypeError:
        return False
  return _Skeleton(type(protocol), tuple(static), assignment), arrays


@functools.partial(jax.jit, static_argnums=(0, 1))
def _shared_call(skeleton: _Skeleton, method: str, arrays: dict[str, Any], counts):
  """``getattr(protocol, method)(counts)`` with the protocol's arrays as arguments: one
  compile for every protocol of one skeleton and array shapes (e.g. all
  ``PartialStraggler(cyclic(m, δ), ℓ)``, whatever the order), where closing over them
  compiled one per instance."""
  return getattr(skeleton.rebuild(arrays), method)(counts)


# -- the stop rule and the estimate -------------------------------------------

def stop_time(protocol: Protocol, durations, mode: str = "exact", deadline=None, timeout=None):
  """When the PS stops, ``[...]``, from durations ``[..., m, max_load]``.

  ``exact``: the completion time ``t*`` where finite; where the gradient is never
  recoverable (failures), ``timeout`` if given, else the last finite finish time
  (nothing more can arrive; 0 if nothing ever finishes). ``deadline``:
  ``min(deadline, t*)``. The state the PS sees is ``timing.progress(durations, stop)``.
  """
  if mode not in MODES:
    raise ParamError(f"unknown mode {mode!r}; choose one of {MODES}.", "mode")
  if mode == "exact" and not protocol.has_exact_mode:
    raise ParamError(
        f"{protocol.name} never recovers the gradient exactly, so it has no exact mode; "
        "use mode='deadline' with a deadline, or protocol 'uncoded' to wait for all workers.",
        "mode")
  if mode == "deadline" and not _positive_finite(deadline, allow_none=False):
    raise ParamError(
        f"deadline mode needs a positive finite deadline, got {deadline!r}; set "
        "deadline=T (simulated seconds), or use mode='exact'.", "deadline")
  if not _positive_finite(timeout, allow_none=True):
    raise ParamError(f"timeout must be a positive finite time or None, got {timeout!r}.", "timeout")
  durations = protocol.check_durations(durations)
  t_star = protocol.completion_time(durations)
  if mode == "deadline":
    return jnp.minimum(jnp.asarray(deadline, t_star.dtype), t_star)
  if timeout is None:
    f = timing.finish_times(durations)
    fallback = jnp.max(jnp.where(jnp.isfinite(f), f, 0.0), axis=(-2, -1))
  else:
    fallback = jnp.asarray(timeout, t_star.dtype)
  return jnp.where(jnp.isfinite(t_star), t_star, fallback)


def _positive_finite(x, allow_none: bool) -> bool:
  if x is None:
    return allow_none
  if isinstance(x, jax.core.Tracer):
    return True
  x = np.asarray(x)
  return bool(np.all(np.isfinite(x)) and np.all(x > 0))


def estimate(protocol: Protocol, chunk_grads, counts):
  """The PS's estimate ``ĝ`` ``[d]`` at state ``counts`` ``[m]``: solve, encode, decode.

  ``chunk_grads``: ``[m, max_load, d]``, slot ``t`` of worker ``j`` holding the
  gradient of chunk ``order[j, t]`` (unfinished slots may hold anything, even NaN).
  Exact (``= Σ_i g_i``) when ``protocol.is_decodable(counts)``.
  """
  a = protocol.assignment
  chunk_grads = jnp.asarray(chunk_grads)
  if chunk_grads.ndim != 3 or chunk_grads.shape[:2] != (a.num_workers, a.max_load):
    raise ValueError(
        f"estimate: chunk_grads must be [num_workers, max_load, d] = [{a.num_workers}, "
        f"{a.max_load}, d], got {chunk_grads.shape}; use jax.vmap for a batch.")
  c = protocol.solve(counts)
  msgs = jnp.where(c.senders[:, None], encode(chunk_grads, c.enc), 0)
  return decode(msgs, c.dec, chunk_grads.shape[-1])

"""A user's loss, normalised once into the per-chunk function the coded step streams.

The user writes ``loss_fn(params, chunk, *args) -> loss`` (or ``-> (loss, aux)``
with ``has_aux``), optionally with a keyword parameter ``rng``. The step calls
:class:`ChunkLoss` ``(params, chunk, key_i, args) -> (loss, aux)`` for chunk ``i``,
where ``key_i = chunk_keys(key, N)[i]``.

Why the key depends on the chunk only (PROTOCOL.md §12): the ``ℓ`` or more
workers that compute chunk ``i`` must compute the same ``g_i``, or the decode
``Σ_j A[r,j] z_j`` does not cancel the other chunks' terms and is not exact.
Dropout drawn from a worker's own key would give each copy another ``g_i``.
"""
from __future__ import annotations

import inspect
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxgc.errors import ParamError

__all__ = ["chunk_keys", "ChunkLoss", "takes_rng", "CONTRACT", "check_loss_axes"]

# fold_in data separating the chunks' keys from the step's other draws (durations, faults).
_CHUNK_KEYS = 0x6368756E

CONTRACT = ("loss_fn(params, chunk, *args) -> scalar loss of the chunk (shape ()), or "
            "(loss, aux) with has_aux=True; the chunk losses sum to the step's loss")


def chunk_keys(key, num_chunks: int):
  """``[N]`` keys, one per chunk: key ``i`` goes to every worker that computes chunk ``i``.

  A function of ``(key, i)`` only, never of the worker, so the copies of a chunk
  draw the same dropout masks and compute the same gradient.
  """
  return jax.random.split(jax.random.fold_in(key, _CHUNK_KEYS), int(num_chunks))


def takes_rng(fn: Callable) -> bool:
  """Whether ``fn`` has a parameter ``rng`` that can be passed by keyword."""
  try:
    p = inspect.signature(fn).parameters.get("rng")
  except (TypeError, ValueError):
    return False
  return p is not None and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)


class ChunkLoss:
  """``(params, chunk, key, args) -> (loss [], aux)``: the user's loss on one chunk.

  ``key`` reaches the loss as ``rng=key`` when it takes ``rng``; ``aux`` is ``()``
  without ``has_aux``. The checks run while tracing, so they cost nothing per step.
  """

  def __init__(self, loss_fn: Callable, has_aux: bool = False):
    if not callable(loss_fn):
      raise ValueError(f"loss_fn must be callable ({CONTRACT}), got {type(loss_fn).__name__}.")
    if not isinstance(has_aux, bool):
      raise ValueError(f"has_aux must be True or False, got {has_aux!r}.")
    self.loss_fn, self.has_aux = loss_fn, has_aux
    self.uses_rng = takes_rng(loss_fn)

  def __call__(self, params, chunk, key, args=()):
    if self.uses_rng and key is None:
      raise ValueError("loss_fn takes rng= but this step has no key for it; call the step "
                       "with a key (gradient(params, chunks, key)).")
    kwargs = {"rng": key} if self.uses_rng else {}
    out = self.loss_fn(params, chunk, *args, **kwargs)
    if self.has_aux:
      if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ValueError(f"has_aux=True: loss_fn must return a pair (loss, aux), got "
                         f"{_describe(out)}. The contract: {CONTRACT}.")
      loss, aux = out
    elif isinstance(out, (tuple, list)):
      raise ValueError(f"loss_fn returned a {type(out).__name__} of {len(out)}; if it returns "
                       "(loss, aux) (say updated batch statistics), pass has_aux=True. The "
                       f"contract: {CONTRACT}.")
    else:
      loss, aux = out, ()
    shape = jnp.shape(loss)
    dtype = getattr(loss, "dtype", None)
    if shape != () or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"loss_fn returned {_describe(loss)} as the loss; it must be a float "
                       f"scalar (sum the chunk's example losses). The contract: {CONTRACT}.")
    return loss, aux


def check_loss_axes(chunk_loss: ChunkLoss, params, chunk, key, args, batch_axis_name,
                    mesh_axes, workers_axis: str | None = None) -> None:
  """Traces the chunk loss once, alone, with only ``batch_axis_name`` bound (size 1), and
  refuses a collective over any other axis by name.

  Inside the step's ``shard_map`` the mesh's own axes are bound, so a ``psum`` over
  ``workers`` would reach the other workers (the copies of a chunk would differ, or the
  devices' branches would wait on each other for ever); an axis bound nowhere fails
  deep inside JAX. Here neither is bound, so JAX names the axis (``NameError``).

  Args:
    chunk_loss: the :class:`ChunkLoss`.
    params, chunk, key, args: one chunk's inputs (arrays or ``jax.ShapeDtypeStruct``s).
    batch_axis_name: the axis each chunk binds alone, or ``None``.
    mesh_axes: the step's mesh axes; workers_axis: the one of its workers.
  Raises:
    ParamError: naming ``batch_axis_name`` (an unbound axis: the argument to pass) or
      ``loss_fn`` (a collective over a mesh axis).
  """
  env = [] if batch_axis_name is None else [(batch_axis_name, 1)]
  try:
    jax.make_jaxpr(lambda p, c, k, a: chunk_loss(p, c, k, a), axis_env=env)(
        params, chunk, key, args)
  except NameError as e:
    found = re.search(r"unbound axis name: (.+?)(?:\. |\.?$)", str(e))
    if found is None:
      raise
    axis = found.group(1)
  except Exception:  # noqa: BLE001  (say a mesh-bound sharding constraint: the step's
    return           # own trace, in context, raises what is really wrong)
  else:
    return
  bound = ("nothing" if batch_axis_name is None
           else f"only batch_axis_name={batch_axis_name!r}")
  if axis in mesh_axes:
    hint = ("" if axis == workers_axis else
            f" For per-chunk batch statistics (flax BatchNorm(axis_name={axis!r})) build the "
            f"mesh without {axis!r} (jaxgc.parallel.make_mesh) and pass "
            f"batch_axis_name={axis!r}.")
    raise ParamError(
        f"loss_fn does a collective over {axis!r}, an axis of the step's mesh "
        f"{tuple(mesh_axes)}; a chunk's loss must not communicate across workers or "
        f"devices (the copies of a chunk must compute the same gradient, PROTOCOL.md "
        f"§12).{hint}", "loss_fn") from None
  raise ParamError(
      f"loss_fn does a collective over axis {axis!r} (e.g. flax BatchNorm(axis_name="
      f"{axis!r}), written for pmap), and the coded step binds {bound}; pass "
      f"batch_axis_name={axis!r}: each chunk then runs with {axis!r} bound to itself "
      f"alone, so its statistics are its own (PROTOCOL.md §12).", "batch_axis_name") from None


def _describe(x) -> str:
  if isinstance(x, (tuple, list)):
    return f"a {type(x).__name__} of {len(x)}"
  shape, dtype = jnp.shape(x) if hasattr(x, "shape") else None, getattr(x, "dtype", None)
  return f"{type(x).__name__} of shape {shape} and dtype {dtype}"

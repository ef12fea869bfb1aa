"""The per-chunk rule both backends share: the chunk loss, its key, the model state.

The user writes ``loss_fn(params, chunk, *args) -> loss`` (or ``-> (loss, aux)``
with ``has_aux``), optionally with a keyword parameter ``rng``. Every backend calls
:class:`ChunkLoss` ``(params, chunk, key_i, args) -> (loss, aux)`` for chunk ``i``,
where ``key_i = chunk_keys(key, N)[i]``, and a model with state (batch norm) moves
to :func:`chunk_mean` of the chunks' ``aux`` (ghost batch norm, PROTOCOL.md §12).
The SPMD step (:mod:`jaxgc.backends.spmd`) and the Ray actors
(:mod:`jaxgc.backends.ray.actor`) both import them from here, so for the same
key, chunks and parameters they compute the same chunk gradients by construction.

Why the key depends on the chunk only (PROTOCOL.md §12): the ``ℓ`` or more
workers that compute chunk ``i`` must compute the same ``g_i``, or the decode
``Σ_j A[r,j] z_j`` does not cancel the other chunks' terms and is not exact.
Dropout drawn from a worker's own key would give each copy another ``g_i``.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxgc.errors import ParamError

__all__ = ["CONTRACT", "ChunkLoss", "check_key", "chunk_keys", "chunk_mean", "takes_rng"]

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


def _describe(x) -> str:
  if isinstance(x, (tuple, list)):
    return f"a {type(x).__name__} of {len(x)}"
  shape, dtype = jnp.shape(x) if hasattr(x, "shape") else None, getattr(x, "dtype", None)
  return f"{type(x).__name__} of shape {shape} and dtype {dtype}"


def chunk_mean(model_state, aux):
  """The new model state: the mean over chunks of each chunk's (ghost batch norm).

  ``aux`` leaves ``[n, ...]``: the ``n`` chunks' new model states, structured like
  ``model_state``; floating leaves are averaged, others (counters) take chunk 0's.
  """
  # (the ignore: jaxlib has no stub for PyTreeDef, so mypy cannot compare two)
  if jax.tree.structure(aux) != jax.tree.structure(model_state):  # type: ignore[operator]
    raise ValueError(f"the loss's aux must be the chunk's new model state, with the structure "
                     f"of state.model_state {jax.tree.structure(model_state)}, got "
                     f"{jax.tree.structure(aux)}.")
  mean = lambda a, old: (jnp.mean(a, 0).astype(old.dtype)
                         if jnp.issubdtype(a.dtype, jnp.floating) else a[0])
  return jax.tree.map(mean, aux, model_state)


def check_key(key, name: str = "key") -> None:
  """Refuses anything but one PRNG key: a typed key ``[]`` (``jax.random.key``) or raw key
  data ``uint32 [2]`` (``jax.random.PRNGKey``; ``[4]`` for the rbg generators).

  JAX's own error for an integer, ``invalid PRNG key data``, names no argument.

  Raises:
    ParamError: naming ``name`` and the fix.
  """
  dtype, shape = getattr(key, "dtype", None), tuple(getattr(key, "shape", ()))
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    if not shape:
      return
    got = f"{shape[0] if len(shape) == 1 else shape} keys (a key array of shape {shape})"
  elif dtype == jnp.uint32 and shape in ((2,), (4,)):
    return
  elif dtype is None:
    got = f"{type(key).__name__} {key!r}"
  else:
    got = f"an array {jnp.dtype(dtype).name}{list(shape)}"
  raise ParamError(f"{name} must be one PRNG key, e.g. jax.random.key(0) or "
                   f"jax.random.PRNGKey(0) (one per step: jax.random.fold_in(key, step)); "
                   f"got {got}.", name)

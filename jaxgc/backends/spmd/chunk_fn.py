"""A user's loss, normalised once into the per-chunk function the coded step streams.

:class:`ChunkLoss`, :func:`chunk_keys` and :data:`CONTRACT` are the backend-neutral
rule of :mod:`jaxgc.backends.chunk_rule` (the Ray actors run the same one); what is
the SPMD step's own is :func:`check_loss_axes`, the axes a loss may bind.

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

import re

import jax

from jaxgc.backends.chunk_rule import CONTRACT, ChunkLoss, chunk_keys, takes_rng
from jaxgc.errors import ParamError

__all__ = ["chunk_keys", "ChunkLoss", "takes_rng", "CONTRACT", "check_loss_axes"]

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


"""``coded_value_and_grad``: the coded gradient for your own model and training loop.

The analogue of ``jax.value_and_grad`` (PROTOCOL.md §12)::

    grad_fn = jaxgc.coded_value_and_grad(loss_fn, protocol, straggler, mesh, has_aux=True)
    (loss, aux), grads, info = jax.jit(grad_fn)(params, chunks, key, batch_stats)
    updates, opt_state = tx.update(grads, opt_state, params)

``value = Σ_i loss_i`` over the ``N`` chunks, ``grads = ĝ`` (exactly ``Σ_i g_i``
when ``info["exact"]``). It is :meth:`jaxgc.parallel.CodedStep.gradient`: one code path.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxgc.backends.spmd.chunk_fn import chunk_keys
from jaxgc.backends.spmd.devices import AXIS
from jaxgc.backends.spmd.step import CodedStep, make_coded_step
from jaxgc.errors import ParamError

__all__ = ["coded_value_and_grad", "chunk_keys"]


def coded_value_and_grad(loss_fn: Callable, protocol, straggler, mesh: Mesh, *,
                         has_aux: bool = False, mode: str = "exact",
                         deadline: float | None = None, timeout: float | None = None,
                         message_loss_prob: float = 0.0, nan_message_prob: float = 0.0,
                         axis_name: str = AXIS, report_condition: bool = True,
                         message_dtype: str = "float32",
                         batch_axis_name: str | None = None,
                         check_vma: bool = True) -> Callable:
  """``grad_fn(params, chunks, key, *args) -> (value, grads, info)``, coded over ``mesh``.

  Args:
    loss_fn: ``loss_fn(params, chunk, *args) -> loss []`` (``-> (loss, aux)`` with
      ``has_aux``); the chunk losses sum to the step's loss. If it has a keyword
      parameter ``rng``, chunk ``i`` gets ``chunk_keys(key, N)[i]`` on every worker
      that computes it: the ``ℓ`` copies of a chunk must compute the same ``g_i``,
      or the decode is not exact (PROTOCOL.md §12). ``args`` (e.g. batch-norm
      statistics) are the same on every worker.
    protocol: a :mod:`jaxgc.protocols` protocol (``N`` chunks, ``m`` workers).
    straggler: a :mod:`jaxgc.timing` model, e.g. ``Slowdown(ShiftedExponential(1, 1), .25, 5)``.
    mesh: a mesh with an axis ``axis_name`` (:func:`jaxgc.parallel.make_mesh`).
    has_aux: as in :func:`jaxgc.make_coded_step`.
    mode: as in :func:`jaxgc.make_coded_step`.
    deadline: as in :func:`jaxgc.make_coded_step`.
    timeout: as in :func:`jaxgc.make_coded_step`.
    message_loss_prob: as in :func:`jaxgc.make_coded_step`.
    nan_message_prob: as in :func:`jaxgc.make_coded_step`.
    report_condition: as in :func:`jaxgc.make_coded_step`.
    message_dtype: as in :func:`jaxgc.make_coded_step` (``grads`` are decoded from
      messages cast to it).
    batch_axis_name: as in :func:`jaxgc.make_coded_step`: the axis a loss written for
      ``pmap`` names (flax ``BatchNorm(axis_name="batch")``), bound to each chunk alone.
    check_vma: as in :func:`jaxgc.make_coded_step`; ``False`` for a loss that binds its
      own axis (``vmap(axis_name=...)``) and does a collective over it.
    axis_name: the mesh axis of the workers.

  Returns:
    ``grad_fn``, jittable. ``chunks``: a pytree (dict, tuple, ...) of leaves
    ``[N, chunk_batch, ...]``; ``key`` draws the step (durations, faults) and the
    chunks' keys. It returns

    * ``value``: ``Σ_i loss_i``, or ``(Σ_i loss_i, aux)`` with ``aux`` leaves
      ``[N, ...]``, chunk ``i``'s from one copy (the slot that counts its loss).
      In deadline mode, and after faults, a chunk that no worker finished still
      has its loss and aux (the simulation evaluates every chunk's forward pass);
      ``info["finished"]`` marks the chunks whose gradient is in ``grads``.
    * ``grads``: a pytree like ``params``; ``Σ_i ∇loss_i`` when ``info["exact"]``.
    * ``info``: the step's metrics: ``exact``, ``decodable``, ``skipped``,
      ``step_sim_time`` (the stop time), ``min_coverage``, ``chunks_below_ell``,
      ``senders``, ``erasures``, ``computed_fraction``, ``recomputed_fraction``,
      ``counts [m]`` (the state ``k``), ``coverage [N]`` (``c_i(k)`` after
      erasures) and ``finished [N]`` (``coverage > 0``).
  """
  step = make_coded_step(protocol, straggler, loss_fn, None, mesh, has_aux=has_aux, mode=mode,
                         deadline=deadline, timeout=timeout,
                         message_loss_prob=message_loss_prob,
                         nan_message_prob=nan_message_prob, axis_name=axis_name,
                         report_condition=report_condition, message_dtype=message_dtype,
                         batch_axis_name=batch_axis_name, check_vma=check_vma)
  return _GradFn(step)


class _GradFn:
  """The function :func:`coded_value_and_grad` returns; ``.step`` is its :class:`CodedStep`."""

  def __init__(self, step: CodedStep):
    self.step = step

  def __call__(self, params, chunks, key, *args):
    _check_key(key)
    grads, info = self.step.gradient(params, chunks, key, *args)
    loss = info.pop("loss")
    value = (loss, info.pop("aux")) if self.step.has_aux else loss
    coverage = self.step.protocol.coverage(info["counts"])
    info["coverage"] = jnp.asarray(coverage, jnp.int32)
    info["finished"] = info["coverage"] > 0
    return value, grads, info

  def shard_chunks(self, chunks):
    """Lays ``chunks`` out per worker once (:meth:`CodedStep.shard_chunks`), for reuse."""
    return self.step.shard_chunks(chunks)


def _check_key(key, name: str = "key") -> None:
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

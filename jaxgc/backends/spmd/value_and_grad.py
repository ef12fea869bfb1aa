"""``coded_value_and_grad``: the coded gradient for your own model and training loop.

The analogue of ``jax.value_and_grad`` (PROTOCOL.md §12)::

    grad_fn = jaxgc.coded_value_and_grad(loss_fn, protocol, straggler, mesh, has_aux=True)
    (loss, aux), grads, info = jax.jit(grad_fn)(params, chunks, key, batch_stats)
    updates, opt_state = tx.update(grads, opt_state, params)

``value = Σ_i loss_i`` over the ``N`` chunks, ``grads = ĝ`` (exactly ``Σ_i g_i``
when ``info["exact"]``). It is :meth:`jaxgc.parallel.CodedStep.gradient`: one code path.
``backend="ray"`` (no mesh) runs the workers as Ray actors in real time instead
(:mod:`jaxgc.backends.ray.value_and_grad`): the same signature and outputs, a host
function that cannot be jitted.
"""
from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
from jax.sharding import Mesh

from jaxgc.backends.chunk_rule import check_key
from jaxgc.backends.spmd.chunk_fn import chunk_keys
from jaxgc.backends.spmd.devices import AXIS
from jaxgc.backends.spmd.step import CodedStep, make_coded_step
from jaxgc.errors import ParamError

__all__ = ["coded_value_and_grad", "chunk_keys"]


def coded_value_and_grad(loss_fn: Callable, protocol, straggler, mesh: Mesh | None = None, *,
                         has_aux: bool = False, mode: str = "exact",
                         deadline: float | None = None, timeout: float | None = None,
                         message_loss_prob: float = 0.0, nan_message_prob: float = 0.0,
                         axis_name: str = AXIS, report_condition: bool = True,
                         message_dtype: str = "float32",
                         batch_axis_name: str | None = None,
                         check_vma: bool = True, backend: str = "spmd",
                         **ray_options) -> Callable:
  """``grad_fn(params, chunks, key, *args) -> (value, grads, info)``, coded over ``mesh``
  (or, with ``backend="ray"``, over Ray actors).

  Args:
    loss_fn: ``loss_fn(params, chunk, *args) -> loss []`` (``-> (loss, aux)`` with
      ``has_aux``); the chunk losses sum to the step's loss. If it has a keyword
      parameter ``rng``, chunk ``i`` gets ``chunk_keys(key, N)[i]`` on every worker
      that computes it: the ``ℓ`` copies of a chunk must compute the same ``g_i``,
      or the decode is not exact (PROTOCOL.md §12). ``args`` (e.g. batch-norm
      statistics) are the same on every worker.
    protocol: a :mod:`jaxgc.protocols` protocol (``N`` chunks, ``m`` workers).
    straggler: a :mod:`jaxgc.timing` model, e.g. ``Slowdown(ShiftedExponential(1, 1), .25, 5)``.
    mesh: a mesh with an axis ``axis_name`` (:func:`jaxgc.parallel.make_mesh`);
      ``None`` with ``backend="ray"``.
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
    backend: ``"spmd"`` (a ``mesh`` is required) or ``"ray"`` (no ``mesh``: the workers
      are Ray actors; ``ray_options`` are :class:`jaxgc.backends.ray.RayStep`'s, e.g.
      ``num_actors``, ``time_scale``, ``pool``). The Ray ``grad_fn`` is a host function:
      it cannot be jitted; ``close()`` it (or use ``with``) to stop its actors.

  Returns:
    ``grad_fn``, jittable (``backend="spmd"``). ``chunks``: a pytree (dict, tuple, ...) of leaves
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
  if backend == "ray":
    if mesh is not None:
      raise ParamError("mesh is the spmd backend's; with backend='ray' the workers are Ray "
                       "actors: leave mesh=None (or use backend='spmd').", "mesh")
    spmd_only = {k: v for k, v in (("axis_name", axis_name != AXIS),
                                   ("batch_axis_name", batch_axis_name is not None),
                                   ("check_vma", not check_vma)) if v}
    if spmd_only:
      raise ParamError(f"{next(iter(spmd_only))} is the spmd backend's (it names or checks a "
                       f"mesh axis); drop it with backend='ray'.", next(iter(spmd_only)))
    from jaxgc.backends.ray.value_and_grad import (  # pylint: disable=import-outside-toplevel
        ray_value_and_grad,
    )
    return ray_value_and_grad(loss_fn, protocol, straggler, has_aux=has_aux, mode=mode,
                              deadline=deadline, timeout=timeout,
                              message_loss_prob=message_loss_prob,
                              nan_message_prob=nan_message_prob,
                              report_condition=report_condition, message_dtype=message_dtype,
                              **ray_options)
  if backend != "spmd":
    raise ParamError(f"backend must be 'spmd' or 'ray', got {backend!r}.", "backend")
  if ray_options:
    raise ParamError(f"{sorted(ray_options)[0]} is not an option of the spmd backend; Ray's "
                     f"options need backend='ray'.", sorted(ray_options)[0])
  if mesh is None:
    raise ParamError("mesh is required with backend='spmd': pass jaxgc.parallel.make_mesh() "
                     "(or backend='ray' for Ray actors).", "mesh")
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
    check_key(key)
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

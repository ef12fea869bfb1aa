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

import jax.numpy as jnp
from jax.sharding import Mesh

from jaxgc.backends.spmd.chunk_fn import chunk_keys
from jaxgc.backends.spmd.devices import AXIS
from jaxgc.backends.spmd.step import CodedStep, make_coded_step

__all__ = ["coded_value_and_grad", "chunk_keys"]


def coded_value_and_grad(loss_fn: Callable, protocol, straggler, mesh: Mesh, *,
                         has_aux: bool = False, mode: str = "exact",
                         deadline: float | None = None, timeout: float | None = None,
                         message_loss_prob: float = 0.0, nan_message_prob: float = 0.0,
                         axis_name: str = AXIS, report_condition: bool = True) -> Callable:
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
                         report_condition=report_condition)
  return _GradFn(step)


class _GradFn:
  """The function :func:`coded_value_and_grad` returns; ``.step`` is its :class:`CodedStep`."""

  def __init__(self, step: CodedStep):
    self.step = step

  def __call__(self, params, chunks, key, *args):
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


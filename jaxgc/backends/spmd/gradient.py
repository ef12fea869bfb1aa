"""One coded step's gradient inside ``shard_map``, in its phases (PROTOCOL.md §6).

:func:`sharded_gradient` is the step's one code path, with one all-reduce per round:

1. *stream* (:func:`stream_round`): every device streams over its workers' chunk
   slots (:mod:`jaxgc.backends.spmd.stream`) with the coefficients of the step's
   :class:`~jaxgc.backends.spmd.plan.Plan`, made one step ahead, and finds its
   erased messages (lost, corrupted, non-finite);
2. *plan* (:func:`plan_next`): meanwhile the PS device plans the next step from its
   key alone (:mod:`jaxgc.backends.spmd.plan`);
3. *decode* (:func:`decode_round`): the PS decode ``ĝ^(r) = Σ_j A[r,j] z_j`` is a
   ``psum`` of per-device partial sums; erasure flags, the loss and the next plan
   ride in it (:mod:`jaxgc.backends.spmd.collectives`);
4. *redo* (:func:`redo_round`): erasures set ``k_j = 0``: the PS re-solves, and the
   workers that send in the second round stream again (``recomputed_fraction``);
5. :func:`step_metrics`: skipped, exactness, coverage and simulated time.

The functions take the :class:`~jaxgc.backends.spmd.step.CodedStep` for its
configuration (layout, loss, planner, network); they hold no state.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxgc import network as _network
from jaxgc.backends.spmd.collectives import compute_once, psum_decode, pvary
from jaxgc.backends.spmd.layout import WorkerChunks
from jaxgc.backends.spmd.plan import Plan
from jaxgc.backends.spmd.sharding import MessageLayout
from jaxgc.backends.spmd.stream import chunk_inputs, stream

if TYPE_CHECKING:
  from jaxgc.backends.spmd.step import CodedStep

__all__ = [
    "DeviceShare", "sharded_gradient", "stream_round", "plan_next", "decode_round",
    "redo_round", "step_metrics",
]


class DeviceShare(NamedTuple):
  """One device's part of a step, inside ``shard_map``.

  Attributes:
    wids: int32 ``[w]``, its workers.
    params: the parameters, marked device-varying (:func:`pvary`).
    local: its chunks, leaves ``[w, slots, ...]``.
    owner: float32 ``[w, slots]``, 1 at the slots whose loss counts.
    chunk: :func:`~jaxgc.backends.spmd.stream.stream`'s chunk arguments.
  """
  wids: jax.Array
  params: Any
  local: Any
  owner: jax.Array
  chunk: dict


def sharded_gradient(step: CodedStep, params, worker_chunks: WorkerChunks, plan: Plan,
                     next_draw, key=None, args=()):
  """``(ĝ [d], metrics, next)``: the step's one code path (the module docstring's phases).

  ``key`` and ``args``: the chunk keys' key (``None``: the loss takes no ``rng``) and the
  loss's extra arguments (:func:`~jaxgc.backends.spmd.stream.chunk_inputs`); with
  ``has_aux``, ``metrics["aux"]``.

  ``next_draw`` (``(durations and faults of the next step, adaptive PS state)``,
  or ``None``) is turned into ``next = (next Plan, adaptive PS state after
  observing it)`` on the PS device while the others compute gradients, and
  rides in the decode all-reduce: one synchronisation per step.
  """
  lay, ax = step.layout, step.axis_name
  msg = MessageLayout(step.placement(params), step.protocol.ell)
  leaves = jax.tree.leaves(params)
  d, dtype = sum(int(np.size(x)) for x in leaves), jnp.result_type(*leaves)
  # The last device holds the phantom workers, so it has the least (often no)
  # gradient work: it plays the PS, and runs the PS-side work once for all.
  ps_device = step.mesh.shape[ax] - 1

  def body(params, local, plan, next_draw, extra):
    wids = jax.lax.axis_index(ax) * lay.per_device + jnp.arange(lay.per_device)
    dev = DeviceShare(wids, pvary(params, ax), local,
                      jnp.asarray(lay.loss_owner, jnp.float32)[wids],
                      chunk_inputs(lay, wids, *extra))
    z, bad, loss, computed, aux = stream_round(step, dev, plan, msg)
    nxt = plan_next(step, next_draw, ps_device)
    part, erased, (loss, computed, nxt, aux) = decode_round(
        step, dev, plan, msg, z, bad, (loss, computed, nxt, aux))
    num_erased = jnp.sum(erased, dtype=jnp.int32)
    keep = lambda: (part, plan.counts, plan.solve, jnp.zeros((), jnp.int32))
    redo = lambda: redo_round(step, dev, plan, msg, erased, ps_device)
    part, counts, solve, again = jax.lax.cond(num_erased > 0, redo, keep)
    g = msg.join(part)
    metrics = step_metrics(step, plan, (part, counts, solve), num_erased, loss, computed,
                           again, d, dtype)
    if step.has_aux:
      metrics["aux"] = aux
    return g, metrics, nxt

  fn = jax.shard_map(body, mesh=step.mesh, in_specs=(P(), P(ax), P(), P(), P()),
                     out_specs=P(), axis_names={ax}, check_vma=step.check_vma)
  key = key if step.chunk_loss.uses_rng else None
  return fn(params, worker_chunks.data, plan, next_draw, (key, tuple(args)))


def stream_round(step: CodedStep, dev: DeviceShare, plan: Plan, msg: MessageLayout):
  """Phase *stream*: this device's ``w`` messages ``z`` (``msg``'s parts with a leading
  ``[w]``) encoded with ``plan.solve``, and ``bad`` bool ``[w]``, the senders whose message
  is erased (lost, corrupted, or non-finite).

  Returns ``(z, bad, Σ owned loss [], chunk gradients computed [] int32, aux [N, ...])``.
  """
  enc = plan.solve.enc[dev.wids]
  z, loss, computed, aux = stream(step.chunk_loss, dev.params, dev.local, enc,
                                  jnp.any(enc != 0, -1), dev.owner, msg, step.axis_name,
                                  **dev.chunk)
  sends = plan.solve.senders[dev.wids]
  # A corrupted message is one the PS finds non-finite: erased like a lost one.
  # One sum per message instead of an elementwise mask: NaN/Inf anywhere makes it non-finite.
  bad = sends & (plan.lost[dev.wids] | plan.corrupt[dev.wids] | ~jnp.isfinite(msg.row_sums(z)))
  return z, bad, loss, computed, aux


def plan_next(step: CodedStep, next_draw, ps_device: int):
  """Phase *plan*: ``(next Plan, adaptive PS state)`` from ``next_draw`` on the PS device,
  zeros on the others (the decode all-reduce sums it); ``None`` without a next draw."""
  if next_draw is None:
    return None
  return compute_once(lambda: step.planner.plan_observed(*next_draw), step.axis_name,
                      ps_device, broadcast=False)


def decode_round(step: CodedStep, dev: DeviceShare, plan: Plan, msg: MessageLayout, z, bad,
                 rest):
  """Phase *decode*: ``(part, erased bool [m], rest)``: this device's share of the decode
  ``Σ_j A[r,j] z_j`` (erased messages zeroed), psummed with the erasure flags and ``rest``.

  Optimistic: decode, flags, loss and the next plan share one all-reduce; a round
  with an erasure is redone (:func:`redo_round`).
  """
  m_pad = step.layout.m_pad
  flags = jnp.zeros(m_pad, jnp.int32).at[dev.wids].set(bad.astype(jnp.int32))
  part = msg.decode(tuple(jnp.where(bad.reshape((-1,) + (1,) * (x.ndim - 1)), 0.0, x)
                          for x in z), plan.solve.dec[:, dev.wids])
  # Each chunk's aux is nonzero on one device only: the psum gathers it exactly.
  part, flags, *rest = psum_decode(msg, part, (flags, *rest), step.axis_name)
  return part, flags[: step.layout.m] > 0, tuple(rest)


def redo_round(step: CodedStep, dev: DeviceShare, plan: Plan, msg: MessageLayout, erased,
               ps_device: int):
  """Phase *redo*, the re-encoding round after erasures: ``k_j = 0`` for the ``erased``
  (bool ``[m]``) workers, one re-solve on the PS device, and the round-2 senders stream
  again. Returns ``(part, counts [m], Solve, chunk gradients recomputed [] int32)``.
  """
  # The state is known before any gradient moves, so an erasure costs one
  # re-solve and a re-encode. Round 1's messages are not kept (that would
  # hold a second message buffer through the decode): every worker that
  # sends in round 2 streams its chunks again.
  ax = step.axis_name
  counts = jnp.where(erased, 0, plan.counts)
  s2 = compute_once(lambda: step.planner.solve(counts), ax, ps_device)
  enc2 = s2.enc[dev.wids]
  z2, _, again, _ = stream(step.chunk_loss, dev.params, dev.local, enc2,
                           jnp.any(enc2 != 0, -1), jnp.zeros_like(dev.owner), msg, ax,
                           **dev.chunk)
  part2, again = psum_decode(msg, msg.decode(z2, s2.dec[:, dev.wids]), (again,), ax)
  return part2, counts, s2, again


def step_metrics(step: CodedStep, plan: Plan, final, num_erased, loss, computed, again, d: int,
                 dtype) -> dict:
  """The step's metrics (:meth:`CodedStep.gradient` lists them) from its final round ``final =
  (part, counts [m], Solve)``, the round-1 ``loss`` and both rounds' chunk gradient
  counts: skipped, exactness, coverage, simulated time with ``step_comm_time``."""
  part, counts, solve = final
  # Σ_j load_j: the chunk gradients of a step that computes every slot.
  all_slots = float(np.sum(step.assignment.loads))
  skipped = ~jnp.any(solve.senders) | ~jnp.isfinite(sum(jnp.sum(x) for x in part))
  comm = _network.step_comm_time(step.network, step.protocol, d, dtype,
                                 jnp.sum(plan.solve.senders), jnp.sum(solve.senders),
                                 num_erased > 0)
  metrics = {
      "loss": loss, "step_sim_time": plan.stop + comm, "step_comm_time": comm,
      "erasures": num_erased,
      "skipped": skipped, "exact": solve.decodable & ~skipped,
      "decodable": solve.decodable, "min_coverage": solve.min_coverage,
      "chunks_below_ell": solve.chunks_below_ell,
      "senders": jnp.sum(solve.senders, dtype=jnp.int32),
      "computed_fraction": computed / all_slots,
      "recomputed_fraction": again / all_slots,
      "counts": counts,
  }
  if step.report_condition:
    metrics["condition_number"] = solve.condition
  return metrics


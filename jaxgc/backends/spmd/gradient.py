"""One coded step's gradient inside ``shard_map``, in its phases (PROTOCOL.md §6).

:func:`sharded_gradient` is the step's one code path, with one all-reduce per round:

1. *stream* (:func:`stream_round`): every device streams over its workers' chunk
   slots (:mod:`jaxgc.backends.spmd.stream`) with the coefficients of the step's
   :class:`~jaxgc.backends.spmd.lookahead.Plan`, made one step ahead, and finds its
   erased messages (lost, corrupted, non-finite);
2. *plan* (:func:`plan_next`): meanwhile the PS device plans the next step from its
   key alone (:mod:`jaxgc.backends.spmd.lookahead`);
3. *decode* (:func:`decode_round`): the PS decode ``ĝ^(r) = Σ_j A[r,j] z_j``
   (:func:`jaxgc.backends.core.decode`, per shard) is a ``psum`` of per-device
   partial sums; erasure flags, the loss and the next plan ride in it
   (:mod:`jaxgc.backends.spmd.collectives`);
4. *redo* (:func:`redo_round`): erasures set ``k_j = 0`` (:func:`jaxgc.backends.core.erase`):
   the PS re-solves, and the workers that send in the second round stream again
   (``recomputed_fraction``);
5. :func:`step_metrics`: :func:`jaxgc.backends.core.step_outcome` (skipped,
   exactness, coverage), with the simulated time and the work done.

With ``ℓ`` chosen per step (PROTOCOL.md §14) phases 1, 3 and 4 run in one
``lax.switch`` branch per ``ℓ`` (:func:`member_round`), each with its own message
layout of ``⌈d/ℓ⌉`` numbers: only the plan's ``ℓ`` runs, and its messages are
really that long. The metrics add ``ell`` and the clairvoyant ``ell_oracle_time``.

The functions take a :class:`GradientSpec`, the step's configuration fixed when it
is built (layout, chunk loss, look-ahead, network, axis); they hold no state.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxgc import network as _network
from jaxgc import precision
from jaxgc.backends import core
from jaxgc.backends.spmd.chunk_fn import ChunkLoss, check_loss_axes, chunk_keys
from jaxgc.backends.spmd.collectives import compute_once, psum_decode, pvary
from jaxgc.backends.spmd.layout import WorkerChunks, WorkerLayout
from jaxgc.backends.spmd.lookahead import Lookahead, Plan
from jaxgc.backends.spmd.placement import PlacementSpec, placement
from jaxgc.backends.spmd.sharding import MessageLayout
from jaxgc.backends.spmd.stream import chunk_inputs, stream
from jaxgc.errors import ParamError

__all__ = [
    "GradientSpec", "DeviceShare", "sharded_gradient", "stream_round", "plan_next",
    "decode_round", "redo_round", "step_metrics", "member_round", "chunk_mesh", "check_axes",
    "check_vma_alone",
]


class GradientSpec(NamedTuple):
  """What a step's gradient depends on, fixed when the step is built.

  Attributes:
    layout: the per-worker :class:`~jaxgc.backends.spmd.layout.WorkerLayout` (its mesh).
    chunk_loss: the model's :class:`~jaxgc.backends.spmd.chunk_fn.ChunkLoss`.
    lookahead: the PS's :class:`~jaxgc.backends.spmd.lookahead.Lookahead` (its protocol).
    network: a :mod:`jaxgc.network` model of the messages' cost.
    axis_name: the mesh's workers axis.
    placement: where parameters live (:class:`~jaxgc.backends.spmd.placement.PlacementSpec`).
    check_vma: ``shard_map``'s varying-axes check.
    report_condition: report ``condition_number``.
    message_dtype: the messages' precision on the wire (:mod:`jaxgc.precision`).
    batch_axis_name: an axis bound to each chunk alone (size 1), for losses written for
      ``pmap`` (:func:`chunk_mesh`); ``None``: none.
  """
  layout: WorkerLayout
  chunk_loss: ChunkLoss
  lookahead: Lookahead
  network: _network.Network
  axis_name: str
  placement: PlacementSpec
  check_vma: bool
  report_condition: bool
  message_dtype: str = "float32"
  batch_axis_name: str | None = None


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


def sharded_gradient(spec: GradientSpec, params, worker_chunks: WorkerChunks, plan: Plan,
                     next_draw, key=None, args=()):
  """``(ĝ [d], metrics, next)``: the step's one code path (the module docstring's phases).

  ``key`` and ``args``: the chunk keys' key (``None``: the loss takes no ``rng``) and the
  loss's extra arguments (:func:`~jaxgc.backends.spmd.stream.chunk_inputs`); with
  the chunk loss's ``has_aux``, ``metrics["aux"]``.

  ``next_draw`` (``(durations and faults of the next step, adaptive PS state)``,
  or ``None``) is turned into ``next = (next Plan, adaptive PS state after
  observing it)`` on the PS device while the others compute gradients, and
  rides in the decode all-reduce: one synchronisation per step.
  """
  lay, ax = spec.layout, spec.axis_name
  leaves = jax.tree.leaves(params)
  d, dtype = sum(int(np.size(x)) for x in leaves), jnp.result_type(*leaves)
  place = placement(spec.placement, params)
  # The last device holds the phantom workers, so it has the least (often no)
  # gradient work: it plays the PS, and runs the PS-side work once for all.
  ps_device = lay.mesh.shape[ax] - 1

  def body(params, local, plan, next_draw, extra):
    wids = jax.lax.axis_index(ax) * lay.per_device + jnp.arange(lay.per_device)
    dev = DeviceShare(wids, pvary(params, ax), local,
                      jnp.asarray(lay.loss_owner, jnp.float32)[wids],
                      chunk_inputs(lay, wids, *extra))
    nxt = plan_next(spec, next_draw, ps_device, (d, dtype))
    if not spec.lookahead.dynamic:
      return member_round(spec, dev, plan, place, nxt, ps_device, d, dtype)
    ells = spec.lookahead.protocol.ells
    branches = [lambda nxt, k=k: member_round(_member_spec(spec, k), dev,
                                              _member_plan(plan, ells[k]), place, nxt,
                                              ps_device, d, dtype)
                for k in range(len(ells))]
    g, metrics, nxt = jax.lax.switch(plan.choice.member, branches, nxt)
    metrics["ell"] = jnp.asarray(ells, jnp.int32)[plan.choice.member]
    key = "ell_oracle_time" if spec.lookahead.mode == "exact" else "ell_oracle_error"
    metrics[key] = plan.choice.oracle
    return g, metrics, nxt

  key = key if spec.chunk_loss.uses_rng else None
  check_axes(spec, params, worker_chunks, key, args)
  batch = () if spec.batch_axis_name is None else (spec.batch_axis_name,)
  fn = jax.shard_map(body, mesh=chunk_mesh(lay.mesh, spec.batch_axis_name),
                     in_specs=(P(), P(ax), P(), P(), P()), out_specs=P(),
                     axis_names={ax, *batch}, check_vma=spec.check_vma)
  try:
    return fn(params, worker_chunks.data, plan, next_draw, (key, tuple(args)))
  except (AssertionError, TypeError):
    if spec.check_vma:
      check_vma_alone(spec, params, worker_chunks, key, args)
    raise


def member_round(spec: GradientSpec, dev: DeviceShare, plan: Plan, place, nxt, ps_device: int,
                 d: int, dtype):
  """Phases *stream*, *decode* and *redo* and the metrics for one ``ℓ``
  (``spec.lookahead.protocol.ell``): ``(ĝ, metrics, nxt)``, ``nxt`` psummed in the decode."""
  msg = MessageLayout(place, spec.lookahead.protocol.ell)
  z, bad, loss, computed, aux = stream_round(spec, dev, plan, msg)
  part, erased, (loss, computed, nxt, aux) = decode_round(
      spec, dev, plan, msg, z, bad, (loss, computed, nxt, aux))
  num_erased = jnp.sum(erased, dtype=jnp.int32)
  keep = lambda: (part, plan.counts, plan.solve, jnp.zeros((), jnp.int32))
  redo = lambda: redo_round(spec, dev, plan, msg, erased, ps_device)
  part, counts, solve, again = jax.lax.cond(num_erased > 0, redo, keep)
  metrics = step_metrics(spec, plan, (part, counts, solve), num_erased, loss, computed,
                         again, d, dtype)
  if spec.chunk_loss.has_aux:
    metrics["aux"] = aux
  return msg.join(part), metrics, nxt


def _member_spec(spec: GradientSpec, k: int) -> GradientSpec:
  """``spec`` with the protocol of the ``k``-th ``ℓ`` (its redo solves with that one)."""
  return spec._replace(lookahead=spec.lookahead.member(k))


def _member_plan(plan: Plan, ell: int) -> Plan:
  """``plan`` with its solve cut from the largest ``ℓ`` to ``ell`` (the padding is zero)."""
  s = plan.solve
  return plan._replace(solve=s._replace(enc=s.enc[..., :ell], dec=s.dec[:ell]), choice=None)


def chunk_mesh(mesh: Mesh, batch_axis_name: str | None) -> Mesh:
  """The mesh the step's ``shard_map`` runs on: ``mesh`` with one more axis of size 1,
  ``batch_axis_name``, when given.

  A loss written for ``pmap`` (flax ``BatchNorm(axis_name="batch")``) averages its
  statistics over that axis. Bound here with size 1, on every device, a ``pmean`` over
  it is the identity: each chunk's statistics are its own, so the copies of a chunk
  compute the same gradient and the decode stays exact (PROTOCOL.md §12). (A size-1
  ``vmap(axis_name=...)`` would do the same, but inside ``shard_map`` JAX's
  varying-axes check fails on it.) Arrays placed on ``mesh`` are accepted as they are:
  the devices and their order do not change.
  """
  if batch_axis_name is None:
    return mesh
  return Mesh(mesh.devices[..., None], tuple(mesh.axis_names) + (batch_axis_name,))


def check_vma_alone(spec: GradientSpec, params, worker_chunks: WorkerChunks, key, args) -> None:
  """After an ``AssertionError`` or ``TypeError`` while tracing the step: traces the chunk
  loss alone in a one-device ``shard_map``, its parameters device-varying as in the step,
  with the varying-axes check and without; if only the check fails, says so.

  Two kinds of loss fail that check in JAX and run exactly without it:
  - a collective over an axis the loss binds itself (``vmap(axis_name=...)``, flax
    ``nn.vmap``): an empty ``AssertionError`` in ``pvary``;
  - a ``scan``/``while`` whose carry starts as a constant while the parameters vary
    (flax ``nn.RNN``'s zero initial state): "the manual axis types do not match".
  """
  one = _one_chunk(spec, params, worker_chunks, key, args)
  probe = Mesh(np.asarray(spec.layout.mesh.devices).reshape(-1)[:1], ("_jaxgc_probe",))
  env = () if spec.batch_axis_name is None else (spec.batch_axis_name,)
  loss = lambda p, c, k, a: spec.chunk_loss(pvary(p, "_jaxgc_probe"), c, k, a)[0]

  def traces(check_vma: bool) -> bool:
    fn = jax.shard_map(loss, mesh=chunk_mesh(probe, spec.batch_axis_name), in_specs=P(),
                       out_specs=P(), axis_names={"_jaxgc_probe", *env}, check_vma=check_vma)
    try:
      jax.eval_shape(fn, *one)
    except Exception:  # noqa: BLE001  (any failure: see the caller's error)
      return False
    return True

  if not traces(True) and traces(False):
    raise ParamError(
        "loss_fn fails JAX's varying-axes check inside shard_map: it does a collective over "
        "an axis it binds itself (vmap(axis_name=...), flax nn.vmap), or a scan/while whose "
        "carry starts as a constant while the parameters vary (flax nn.RNN's zero initial "
        "state); build the step with check_vma=False, which runs it exactly.",
        "check_vma") from None


def _one_chunk(spec: GradientSpec, params, worker_chunks: WorkerChunks, key, args):
  """One chunk's loss inputs as ``jax.ShapeDtypeStruct``s: ``(params, chunk, key, args)``."""
  shape = lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype)
  chunk = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x)[2:], x.dtype),
                       worker_chunks.data)
  one_key = None if key is None else jax.eval_shape(
      lambda k: chunk_keys(k, spec.layout.num_chunks)[0], key)
  return jax.tree.map(shape, params), chunk, one_key, jax.tree.map(shape, tuple(args))


def check_axes(spec: GradientSpec, params, worker_chunks: WorkerChunks, key, args) -> None:
  """:func:`~jaxgc.backends.spmd.chunk_fn.check_loss_axes` on one chunk's shapes: a
  collective inside the loss over any axis but ``batch_axis_name`` is refused by name."""
  p, chunk, one_key, a = _one_chunk(spec, params, worker_chunks, key, args)
  check_loss_axes(spec.chunk_loss, p, chunk, one_key, a, spec.batch_axis_name,
                  spec.layout.mesh.axis_names, spec.axis_name)


def stream_round(spec: GradientSpec, dev: DeviceShare, plan: Plan, msg: MessageLayout):
  """Phase *stream*: this device's ``w`` messages ``z`` (``msg``'s parts with a leading
  ``[w]``) encoded with ``plan.solve``, and ``bad`` bool ``[w]``, the senders whose message
  is erased (lost, corrupted, or non-finite).

  Returns ``(z, bad, Σ owned loss [], chunk gradients computed [] int32, aux [N, ...])``.
  """
  enc = plan.solve.enc[dev.wids]
  z, loss, computed, aux = stream(spec.chunk_loss, dev.params, dev.local, enc,
                                  jnp.any(enc != 0, -1), dev.owner, msg, spec.axis_name,
                                  **dev.chunk)
  # On the wire (PROTOCOL.md §15): cast, and back in float32 for the PS's decode.
  z = tuple(precision.round_trip(x, spec.message_dtype) for x in z)
  sends = plan.solve.senders[dev.wids]
  # A corrupted message is one the PS finds non-finite: erased like a lost one.
  # One sum per message instead of an elementwise mask: NaN/Inf anywhere makes it non-finite.
  bad = sends & (plan.lost[dev.wids] | plan.corrupt[dev.wids] | ~jnp.isfinite(msg.row_sums(z)))
  return z, bad, loss, computed, aux


def plan_next(spec: GradientSpec, next_draw, ps_device: int, grad=None):
  """Phase *plan*: ``(next Plan, adaptive PS state)`` from ``next_draw`` on the PS device,
  zeros on the others (the decode all-reduce sums it); ``None`` without a next draw.
  ``grad``: ``(d, dtype)``, for dynamic ``ℓ`` (:meth:`Lookahead.plan`)."""
  if next_draw is None:
    return None
  draw, adaptive_state = next_draw
  return compute_once(lambda: spec.lookahead.plan_observed(draw, adaptive_state, grad=grad),
                      spec.axis_name, ps_device, broadcast=False)


def decode_round(spec: GradientSpec, dev: DeviceShare, plan: Plan, msg: MessageLayout, z, bad,
                 rest):
  """Phase *decode*: ``(part, erased bool [m], rest)``: this device's share of the decode
  ``Σ_j A[r,j] z_j`` (erased messages zeroed), psummed with the erasure flags and ``rest``.

  Optimistic: decode, flags, loss and the next plan share one all-reduce; a round
  with an erasure is redone (:func:`redo_round`).
  """
  m_pad = spec.layout.m_pad
  flags = jnp.zeros(m_pad, jnp.int32).at[dev.wids].set(bad.astype(jnp.int32))
  part = msg.decode(tuple(jnp.where(bad.reshape((-1,) + (1,) * (x.ndim - 1)), 0.0, x)
                          for x in z), plan.solve.dec[:, dev.wids])
  # Each chunk's aux is nonzero on one device only: the psum gathers it exactly.
  part, flags, *rest = psum_decode(msg, part, (flags, *rest), spec.axis_name)
  return part, flags[: spec.layout.m] > 0, tuple(rest)


def redo_round(spec: GradientSpec, dev: DeviceShare, plan: Plan, msg: MessageLayout, erased,
               ps_device: int):
  """Phase *redo*, the re-encoding round after erasures: ``k_j = 0`` for the ``erased``
  (bool ``[m]``) workers, one re-solve on the PS device, and the round-2 senders stream
  again. Returns ``(part, counts [m], Solve, chunk gradients recomputed [] int32)``.
  """
  # The state is known before any gradient moves, so an erasure costs one
  # re-solve and a re-encode. Round 1's messages are not kept (that would
  # hold a second message buffer through the decode): every worker that
  # sends in round 2 streams its chunks again.
  ax = spec.axis_name
  counts = core.erase(plan.counts, erased)
  s2 = compute_once(lambda: spec.lookahead.solve(counts), ax, ps_device)
  enc2 = s2.enc[dev.wids]
  z2, _, again, _ = stream(spec.chunk_loss, dev.params, dev.local, enc2,
                           jnp.any(enc2 != 0, -1), jnp.zeros_like(dev.owner), msg, ax,
                           **dev.chunk)
  z2 = tuple(precision.round_trip(x, spec.message_dtype) for x in z2)
  part2, again = psum_decode(msg, msg.decode(z2, s2.dec[:, dev.wids]), (again,), ax)
  return part2, counts, s2, again


def step_metrics(spec: GradientSpec, plan: Plan, final, num_erased, loss, computed, again,
                 d: int, dtype) -> dict:
  """The step's metrics (:meth:`CodedStep.gradient` lists them) from its final round ``final =
  (part, counts [m], Solve)``, the round-1 ``loss`` and both rounds' chunk gradient
  counts: :func:`jaxgc.backends.core.step_outcome` (skipped, exactness, coverage), the
  simulated time with ``step_comm_time``, and the work done."""
  part, counts, solve = final
  protocol = spec.lookahead.protocol
  # Σ_j load_j: the chunk gradients of a step that computes every slot.
  all_slots = float(np.sum(protocol.assignment.loads))
  comm = _network.step_comm_time(spec.network, protocol, d, dtype,
                                 jnp.sum(plan.solve.senders), jnp.sum(solve.senders),
                                 num_erased > 0, spec.message_dtype)
  metrics = core.step_outcome(solve.coverage, solve.senders, solve.condition, part, num_erased,
                              report_condition=spec.report_condition)
  metrics.update({
      "loss": loss, "step_sim_time": plan.stop + comm, "step_comm_time": comm,
      "computed_fraction": computed / all_slots,
      "recomputed_fraction": again / all_slots,
      "counts": counts,
  })
  return metrics


"""The coded training step under ``shard_map`` (PROTOCOL.md §6).

One step, all in one jitted graph:

1. straggler durations ``τ [m, max_load]`` are drawn from the step's PRNG key;
2. the stop time and state ``k`` follow from the protocol and the mode
   (exact: ``stop = completion_time``; deadline ``T``: ``stop = min(T, completion_time)``),
   ``k = progress(τ, stop)``;
3. every device computes its workers' chunk gradients (``vmap``), the encoding
   coefficients of its workers, and their messages ``z_j``;
4. erasures (lost or non-finite messages of workers that were due to send) set
   ``k_j = 0`` and trigger one re-encoding round (PROTOCOL.md §2, robustness);
5. the PS decode ``ĝ^(r) = Σ_j A[r,j] z_j`` is a ``psum`` of per-device partial sums;
6. ``ĝ`` is unflattened to the parameter pytree and applied with ``optax``. A
   step that cannot be decoded at all, or whose update is non-finite, is skipped.

Several simulated workers share a device: ``m`` is padded up to a multiple of
the device count with phantom workers that hold no chunk and never send.
Parameters and optimizer state stay replicated (``P()``).

The PS-side work (steps 1-2 and the coefficient solve) depends on the key only,
never on gradients. It runs on one device (the last, which holds the phantom
workers) and is broadcast through an all-reduce. With a planned state
(:meth:`CodedStep.init_state`) it is done one step ahead and rides in the
decode all-reduce, so a coded step synchronises the devices once, like an
uncoded one; the numbers are identical either way.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, PartitionSpec as P

from jaxgc import protocols as _protocols
from jaxgc import timing
from jaxgc.parallel.devices import AXIS, workers_per_device

__all__ = [
    "TrainState", "CodedStep", "make_coded_step", "PlainStep", "make_plain_step",
    "decode_sharded", "pvary", "shard_map", "MODES",
]

MODES = ("exact", "deadline")


# -- compatibility shims -------------------------------------------------------

def pvary(tree, axis_name):
  """Marks every leaf device-varying along ``axis_name``.

  Needed before ``jax.grad`` inside ``shard_map``: the gradient w.r.t. an
  *invariant* (``P()``) input is, by the transpose rules, already ``psum``-ed over
  the axis; the coded step needs each worker's own chunk gradients.
  """
  def varying(x):
    aval = jax.typeof(x) if hasattr(jax, "typeof") else None
    # Where JAX records the varying axes has moved between releases.
    vma = getattr(aval, "vma", None)
    if vma is None:
      vma = getattr(getattr(aval, "manual_axis_type", None), "varying", ())
    return axis_name in vma

  if hasattr(jax.lax, "pcast"):
    cast = lambda x: x if varying(x) else jax.lax.pcast(x, axis_name, to="varying")
  elif hasattr(jax.lax, "pvary"):
    cast = lambda x: x if varying(x) else jax.lax.pvary(x, axis_name)  # pylint: disable=no-member
  else:  # releases before varying-manual-axes typing: grads are local already
    return tree
  return jax.tree.map(cast, tree)


def shard_map(f, *, mesh, in_specs, out_specs, check_vma: bool = True):
  """``jax.shard_map`` where it exists, else the experimental one (``check_rep``)."""
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=check_vma)
  from jax.experimental.shard_map import shard_map as _sm  # pylint: disable=import-outside-toplevel
  return _sm(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=check_vma)


def decode_sharded(msgs, dec, d: int, axis_name: str = AXIS):
  """The PS decode of :func:`jaxgc.protocols.decode`, from inside ``shard_map``.

  Args:
    msgs: this device's messages ``[w, ⌈d/ℓ⌉]`` (its ``w`` workers).
    dec: this device's columns of the decoding matrix, ``[ℓ, w]``.
    d: gradient length.
  Returns:
    ``[d]``, identical on every device (device-invariant, so it may leave
    ``shard_map`` as ``P()`` under ``check_vma=True``).
  """
  return jax.lax.psum(_protocols.decode_blocks(msgs, dec), axis_name).reshape(-1)[:d]


# -- state ---------------------------------------------------------------------

@flax.struct.dataclass
class TrainState:
  """Replicated training state.

  Attributes:
    step: int32 scalar, steps taken (skipped ones included).
    params: model parameter pytree.
    opt_state: optax state.
    sim_time: float32 scalar, cumulative simulated wall-clock seconds.
    num_skipped: int32, steps whose update was dropped (undecodable / non-finite).
    num_erasures: int32, cumulative erased messages.
    plan: the PS plan of step ``step`` (durations-derived state, faults and
      coefficients; a dict of arrays), precomputed during the previous step by
      :meth:`CodedStep.update`; ``None`` to plan inside each step instead.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  sim_time: jax.Array
  num_skipped: jax.Array
  num_erasures: jax.Array
  plan: Any = None

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation, plan=None) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               sim_time=jnp.zeros((), jnp.float32), num_skipped=jnp.zeros((), jnp.int32),
               num_erasures=jnp.zeros((), jnp.int32), plan=plan)


# -- static layout ---------------------------------------------------------------

class _Layout:
  """Static (NumPy) placement of workers and chunk slots on devices."""

  def __init__(self, assignment, num_devices: int, compute_slots: int):
    m, width = assignment.num_workers, assignment.max_load
    self.m = m
    self.per_device = workers_per_device(m, num_devices)
    self.m_pad = self.per_device * num_devices
    self.num_devices = num_devices
    self.idle_devices = (self.m_pad - m) // self.per_device   # devices with phantoms only
    self.slots = compute_slots
    order = np.full((self.m_pad, width), -1, np.int32)
    order[:m] = assignment.order
    self.order = order[:, :compute_slots]
    # Weight 1/(#computed copies) per slot: summing weighted chunk losses over all
    # computed slots gives the batch loss exactly once, whatever the replication.
    valid = self.order >= 0
    copies = np.bincount(self.order[valid], minlength=assignment.num_chunks)
    self.weight = np.where(valid, 1.0 / np.maximum(copies[np.maximum(self.order, 0)], 1),
                           0.0).astype(np.float32)

  def pad_workers(self, x, axis: int):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, self.m_pad - self.m)
    return jnp.pad(x, pad)


def _used_slots(protocol) -> int:
  """How many leading slots per worker the protocol can ever use.

  Probed at the all-finished state: ``Uncoded`` uses only each chunk's designated
  slot (slot 0 of a cyclic assignment), so its workers need not compute the rest.
  """
  a = protocol.assignment
  enc = np.asarray(protocol.encoding(jnp.asarray(a.loads)))
  used = np.any(enc != 0, axis=-1)
  if not used.any():
    return a.max_load
  return int(np.max(np.nonzero(used)[1])) + 1


def _local_chunk_grads(loss_fn, params, chunks, layout: _Layout, axis_name):
  """This device's chunk gradients ``[w, slots, d]``, its weighted loss ``[]``, worker ids ``[w]``."""
  wids = jax.lax.axis_index(axis_name) * layout.per_device + jnp.arange(layout.per_device)
  order = jnp.asarray(layout.order)[wids]
  local = jax.tree.map(lambda a: a[jnp.maximum(order, 0)], chunks)
  pv = pvary(params, axis_name)

  def one(chunk):
    loss, g = jax.value_and_grad(loss_fn)(pv, chunk)
    return loss, ravel_pytree(g)[0]

  work = lambda: pvary(jax.vmap(jax.vmap(one))(local), axis_name)
  if layout.idle_devices:
    # Devices holding only phantom workers skip the gradient work (on the last
    # device, which then has time for the PS-side solve).
    shapes = jax.eval_shape(work)
    idle = lambda: pvary(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), axis_name)
    busy = jax.lax.axis_index(axis_name) < layout.num_devices - layout.idle_devices
    losses, grads = jax.lax.cond(busy, work, idle)
  else:
    losses, grads = work()
  weight = jnp.asarray(layout.weight)[wids]
  return grads, jnp.sum(losses * weight), weight, wids


def _psum_packed(tree, axis_name):
  """``psum`` of a pytree as one all-reduce per float dtype.

  On CPU meshes every all-reduce is a rendezvous of all device threads and costs
  far more than the bytes it moves, so small leaves travel packed in one vector.
  Integer and bool leaves ride in float32, exact below 2**24 (counts and flags).
  """
  leaves, treedef = jax.tree.flatten(tree)
  wire = [jnp.float32 if not jnp.issubdtype(x.dtype, jnp.floating) else x.dtype for x in leaves]
  groups: dict[Any, list[int]] = {}
  for i, dt in enumerate(wire):
    groups.setdefault(jnp.dtype(dt), []).append(i)
  out = [None] * len(leaves)
  for dt, idx in groups.items():
    flat = jax.lax.psum(jnp.concatenate([jnp.ravel(leaves[i]).astype(dt) for i in idx]),
                        axis_name)
    start = 0
    for i in idx:
      size = int(np.prod(leaves[i].shape))
      part = flat[start:start + size].reshape(leaves[i].shape)
      if leaves[i].dtype == jnp.bool_:
        part = part > 0
      out[i] = part.astype(leaves[i].dtype)
      start += size
  return jax.tree.unflatten(treedef, out)


def _compute_once(fn, axis_name, device: int, broadcast: bool = True):
  """Runs ``fn()`` (invariant inputs) on one device only and broadcasts its result.

  The PS-side work of a step (durations, stop time, the coefficient solve) is
  the same on every device. Computed replicated it would run once per device,
  which on a CPU host with few cores is a real cost; here one device computes
  it and a ``psum`` against zeros elsewhere broadcasts it exactly.
  """
  shapes = jax.eval_shape(fn)
  zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  mine = jax.lax.axis_index(axis_name) == device
  out = jax.lax.cond(mine, lambda: pvary(fn(), axis_name), lambda: pvary(zeros(), axis_name))
  # Without broadcast the caller psums it, packed with other traffic.
  return _psum_packed(out, axis_name) if broadcast else out


# -- the coded step --------------------------------------------------------------

class CodedStep:
  """A coded gradient step for a protocol, straggler model, model loss and optimizer.

  Build with :func:`make_coded_step`. Methods are pure (jit them, or use
  :meth:`jit`); keys and chunks are explicit arguments, so the same
  ``(key, chunks)`` always gives the same step.
  """

  def __init__(self, protocol, straggler, loss_fn: Callable, tx: optax.GradientTransformation,
               mesh: Mesh, *, mode: str = "exact", deadline: float | None = None,
               message_loss_prob: float = 0.0, nan_message_prob: float = 0.0,
               axis_name: str = AXIS, report_condition: bool = True,
               check_vma: bool = True):
    if mode not in MODES:
      raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}.")
    if mode == "deadline":
      if deadline is None or not np.isfinite(deadline) or deadline <= 0:
        raise ValueError(
            f"deadline mode needs a positive finite deadline, got {deadline!r}; set "
            "deadline=T (simulated seconds), or use mode='exact'.")
    if mode == "exact" and isinstance(protocol, _protocols.IgnoreStragglers):
      raise ValueError(
          "ignore_stragglers never recovers the gradient exactly, so it has no exact "
          "mode; use mode='deadline' with a deadline, or protocol 'uncoded' to wait "
          "for all workers.")
    for name, p in (("message_loss_prob", message_loss_prob),
                    ("nan_message_prob", nan_message_prob)):
      if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {p}.")
    if axis_name not in mesh.axis_names:
      raise ValueError(f"mesh has axes {mesh.axis_names}; expected one named {axis_name!r}.")
    self.protocol = protocol
    self.assignment = protocol.assignment
    self.straggler = straggler
    self.loss_fn = loss_fn
    self.tx = tx
    self.mesh = mesh
    self.mode = mode
    self.deadline = None if deadline is None else float(deadline)
    self.message_loss_prob = float(message_loss_prob)
    self.nan_message_prob = float(nan_message_prob)
    self.axis_name = axis_name
    self.check_vma = check_vma
    self.report_condition = report_condition and hasattr(protocol, "solve")
    self.layout = _Layout(self.assignment, mesh.shape[axis_name], _used_slots(protocol))

  # -- plan: when the PS stops and what state it sees ------------------------
  def plan(self, key):
    """Durations ``[m, max_load]``, stop time ``[]`` and state ``k`` ``[m]`` for one step."""
    durations = self.straggler.sample(key, self.assignment)
    t_star = self.protocol.completion_time(durations)
    if self.mode == "exact":
      # Never decodable (too many failures): the PS stops once nothing more can
      # arrive and falls back to the deadline-mode estimate.
      f = timing.finish_times(durations)
      last = jnp.max(jnp.where(jnp.isfinite(f), f, 0.0))
      stop = jnp.where(jnp.isfinite(t_star), t_star, last)
    else:
      stop = jnp.minimum(jnp.float32(self.deadline), t_star)
    return durations, stop, timing.progress(durations, stop)

  # -- PS side: plan and solve ------------------------------------------------
  def _ps_solve(self, counts):
    """Everything the PS derives from a state: padded coefficients and diagnostics."""
    lay, proto = self.layout, self.protocol
    if self.report_condition:
      enc, dec, cond = proto.solve(counts)
    else:
      enc, dec = proto.coefficients(counts)
    cov = proto.coverage(counts)
    decodable = proto.is_decodable(counts)
    out = {
        "enc": lay.pad_workers(enc, 0)[:, : lay.slots],                 # [m_pad, slots, ℓ]
        "dec": lay.pad_workers(dec, 1),                                 # [ℓ, m_pad]
        "senders": jnp.sum(jnp.any(enc != 0, axis=(1, 2)), dtype=jnp.int32),
        "min_coverage": jnp.min(cov),
        "chunks_below_ell": jnp.sum(cov < proto.ell, dtype=jnp.int32),
        "decodable": decodable,
    }
    if self.report_condition:
      out["condition_number"] = jnp.asarray(cond, jnp.float32)
    return out

  def _ps_plan(self, key, step=None):
    """Durations, stop time, state, injected faults and the round-1 solve.

    From ``key``, or from ``fold_in(key, step)`` when ``step`` is given.
    """
    if step is not None:
      key = jax.random.fold_in(key, step)
    k_dur, k_loss, k_nan = jax.random.split(key, 3)
    _, stop, counts = self.plan(k_dur)
    m_pad = self.layout.m_pad
    draw = lambda k, p: (jax.random.bernoulli(k, p, (m_pad,)) if p > 0
                         else jnp.zeros((m_pad,), bool))
    return {"stop": stop, "counts": counts, "lost": draw(k_loss, self.message_loss_prob),
            "corrupt": draw(k_nan, self.nan_message_prob), **self._ps_solve(counts)}

  # -- gradient ---------------------------------------------------------------
  def _sharded_gradient(self, d, params, chunks, key, step=None, plan=None):
    """``(ĝ [d], metrics, next_plan)``.

    Without ``plan`` the PS plans from ``key`` inside the step (its own
    broadcast). With ``plan`` (made for ``step`` one step earlier), the PS
    device plans step ``step + 1`` meanwhile, and that plan
    rides in the decode all-reduce: one synchronisation per step, like an
    uncoded step. Planning needs only the key, never gradients, so this changes
    no number, only when it is computed.
    """
    lay, ax = self.layout, self.axis_name
    # The last device holds the phantom workers, so it has the least (often no)
    # gradient work: it plays the PS, and runs the PS-side work once for all.
    ps_device = self.mesh.shape[ax] - 1

    def body(params, chunks, key, step, plan):
      grads, loss, _, wids = _local_chunk_grads(self.loss_fn, params, chunks, lay, ax)
      if plan is None:
        ps, nxt = _compute_once(lambda: self._ps_plan(key, step), ax, ps_device), None
      else:
        ps, nxt = plan, _compute_once(lambda: self._ps_plan(key, step + 1), ax, ps_device,
                                      broadcast=False)

      def messages(enc_all, dec_all):
        enc_l = enc_all[wids]
        sends = jnp.any(enc_l != 0, axis=(1, 2))
        z = jnp.where(sends[:, None], _protocols.encode(grads, enc_l), 0.0)
        return z, dec_all[:, wids], sends

      z, dec_l, sends = messages(ps["enc"], ps["dec"])
      # A corrupted message is one the PS finds non-finite: erased like a lost one.
      bad = sends & (ps["lost"][wids] | ps["corrupt"][wids] |
                     ~jnp.all(jnp.isfinite(z), axis=-1))
      flags = jnp.zeros(lay.m_pad, jnp.int32).at[wids].set(bad.astype(jnp.int32))
      # Optimistic: decode, erasure flags and loss share one all-reduce; a round
      # with an erasure is thrown away and redone below.
      partial, flags, loss, nxt = _psum_packed(
          (_protocols.decode_blocks(jnp.where(bad[:, None], 0.0, z), dec_l), flags, loss, nxt), ax)
      erased = flags[: lay.m] > 0
      num_erased = jnp.sum(erased, dtype=jnp.int32)
      keys = [k for k in ps if k not in ("stop", "counts", "lost", "corrupt", "dec")]

      def redo():
        # The state is known before any gradient moves, so an erasure costs one
        # re-solve and a re-encode of already computed chunk gradients.
        counts = jnp.where(erased, 0, ps["counts"])
        ps2 = _compute_once(lambda: self._ps_solve(counts), ax, ps_device)
        z2, dec2_l, _ = messages(ps2["enc"], ps2["dec"])
        part = jax.lax.psum(_protocols.decode_blocks(z2, dec2_l), ax)
        return part, counts, {k: ps2[k] for k in keys}

      partial, final, info = jax.lax.cond(
          num_erased > 0, redo, lambda: (partial, ps["counts"], {k: ps[k] for k in keys}))
      g = partial.reshape(-1)[:d]
      del info["enc"]
      skipped = (info["senders"] == 0) | ~jnp.all(jnp.isfinite(g))
      metrics = {"loss": loss, "step_sim_time": ps["stop"], "erasures": num_erased,
                 "skipped": skipped, "exact": info["decodable"] & ~skipped,
                 "counts": final, **info}
      return g, metrics, nxt

    fn = shard_map(body, mesh=self.mesh, in_specs=(P(),) * 5, out_specs=P(),
                   check_vma=self.check_vma)
    return fn(params, chunks, key, step, plan)

  def gradient(self, params, chunks, key):
    """The decoded gradient and step metrics.

    Args:
      params: replicated parameter pytree.
      chunks: pytree with leaves ``[N, chunk_batch, ...]``, replicated.
      key: the step's PRNG key (durations, message losses, corruptions).
    Returns:
      ``(grads, metrics)``: the estimate ``ĝ`` as a pytree like ``params`` (NaN
      possible only when ``metrics['skipped']``), and a dict of scalars
      (``loss``, ``step_sim_time``, ``min_coverage``, ``chunks_below_ell``,
      ``decodable``, ``erasures``, ``skipped``, ``exact``, ``senders``,
      ``condition_number`` when the protocol has one) plus the final state
      ``counts`` ``[m]``.
    """
    flat, unravel = ravel_pytree(params)
    g, metrics, _ = self._sharded_gradient(flat.shape[0], params, chunks, key)
    return unravel(g), metrics

  def init_plan(self, key, step=0):
    """The PS plan of step ``step`` for :attr:`TrainState.plan` (``key``: the base key)."""
    return self._ps_plan(key, step)

  def init_state(self, params, key) -> TrainState:
    """A fresh :class:`TrainState` whose first step is already planned (the fast path)."""
    return TrainState.create(params, self.tx, plan=self.init_plan(key))

  # -- full update --------------------------------------------------------------
  def update(self, state: TrainState, chunks, key):
    """One optimizer step. Returns ``(new_state, metrics)``; never writes NaN into params.

    Args:
      state: replicated state; with ``state.plan`` (see :meth:`init_state`) the
        step uses it and plans the next step on the side.
      chunks: pytree with leaves ``[N, chunk_batch, ...]``.
      key: the *base* key; step ``s`` draws from ``fold_in(key, s)``, so a run is
        a function of ``(key, data)`` and resumes exactly from a checkpoint.
    """
    flat, unravel = ravel_pytree(state.params)
    g, metrics, plan = self._sharded_gradient(flat.shape[0], state.params, chunks, key,
                                              state.step, state.plan)
    updates, opt_state = self.tx.update(unravel(g), state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # One scalar instead of a reduction per leaf: any NaN/Inf makes the sum non-finite.
    finite = jnp.isfinite(sum(jnp.sum(u) for u in jax.tree.leaves(updates)))
    skip = metrics["skipped"] | ~finite
    # One conditional rather than a select per leaf: fewer kernels, each of which
    # runs on every device of the mesh.
    params, opt_state = jax.lax.cond(skip, lambda: (state.params, state.opt_state),
                                     lambda: (params, opt_state))
    sim_time = state.sim_time + metrics["step_sim_time"]
    new = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, sim_time=sim_time,
        num_skipped=state.num_skipped + skip.astype(jnp.int32),
        num_erasures=state.num_erasures + metrics["erasures"], plan=plan)
    metrics = dict(metrics, skipped=skip, exact=metrics["exact"] & ~skip, sim_time=sim_time)
    del metrics["counts"]
    return new, metrics

  def jit(self, donate: bool = False):
    """``update`` jitted with replicated shardings: ``(state, chunks, key) -> (state, metrics)``."""
    return jax.jit(self.update, donate_argnums=(0,) if donate else ())


def make_coded_step(protocol, straggler, loss_fn, tx, mesh, **kwargs) -> CodedStep:
  """Builds a :class:`CodedStep`; see its arguments.

  Args:
    protocol: a :mod:`jaxgc.protocols` protocol (its assignment fixes ``m`` and ``N``).
    straggler: a :mod:`jaxgc.timing` model with ``.sample(key, assignment)``.
    loss_fn: ``loss(params, chunk) -> scalar``; the chunk losses must sum to the
      step's loss (see :func:`jaxgc.models.chunk_loss_fn`).
    tx: any ``optax.GradientTransformation``.
    mesh: a mesh with an axis ``"workers"`` (:func:`jaxgc.parallel.make_mesh`).
    **kwargs: ``mode``, ``deadline``, ``message_loss_prob``, ``nan_message_prob``,
      ``report_condition``, ``check_vma``.
  """
  return CodedStep(protocol, straggler, loss_fn, tx, mesh, **kwargs)


# -- uncoded reference with the same per-device work --------------------------------

class PlainStep:
  """Same chunk gradients per device as the coded step, summed and ``psum``-ed.

  The reference for measuring coding overhead, and a direct full-batch gradient
  (each chunk counted once) for tests.
  """

  def __init__(self, assignment, loss_fn, tx, mesh, *, compute_slots: int | None = None,
               axis_name: str = AXIS, check_vma: bool = True):
    self.assignment = assignment
    self.loss_fn, self.tx, self.mesh, self.axis_name = loss_fn, tx, mesh, axis_name
    self.check_vma = check_vma
    slots = assignment.max_load if compute_slots is None else int(compute_slots)
    self.layout = _Layout(assignment, mesh.shape[axis_name], slots)

  def gradient(self, params, chunks):
    """``(Σ_i g_i as a pytree, loss)``."""
    flat, unravel = ravel_pytree(params)
    lay, ax = self.layout, self.axis_name

    def body(params, chunks):
      grads, loss, weight, _ = _local_chunk_grads(self.loss_fn, params, chunks, lay, ax)
      # The same fused weighted sum as the coded encode, so only coding differs.
      total = _protocols.weighted_sum(weight.reshape(-1), grads.reshape(-1, grads.shape[-1]))
      return _psum_packed((total, loss), ax)

    fn = shard_map(body, mesh=self.mesh, in_specs=(P(), P()), out_specs=(P(), P()),
                   check_vma=self.check_vma)
    g, loss = fn(params, chunks)
    assert g.shape == flat.shape
    return unravel(g), loss

  def update(self, state: TrainState, chunks, key=None):
    del key
    grads, loss = self.gradient(state.params, chunks)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state), {"loss": loss}

  def jit(self, donate: bool = False):
    return jax.jit(self.update, donate_argnums=(0,) if donate else ())


def make_plain_step(assignment, loss_fn, tx, mesh, **kwargs) -> PlainStep:
  """Builds a :class:`PlainStep` (uncoded, same per-device work)."""
  return PlainStep(assignment, loss_fn, tx, mesh, **kwargs)

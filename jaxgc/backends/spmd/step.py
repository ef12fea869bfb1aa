"""The coded training step under ``shard_map`` (PROTOCOL.md §6).

One step, one jitted graph, one code path:

1. The step's :class:`Plan` was made one step ahead: straggler durations
   ``τ [m, max_load]`` (from the step's key and the straggler model's state), the
   stop time (:func:`jaxgc.protocols.stop_time`), the state ``k = progress(τ, stop)``,
   the injected message faults, and the coefficient solve at ``k``. It needs the
   key only, never gradients.
2. Every device streams over its workers' chunk slots (``lax.scan``): it computes
   a slot's chunk gradient only where the slot's encoding coefficients are
   nonzero (``lax.cond``) and accumulates the worker's message
   ``z_j = Σ_t Σ_k enc[j,t,k] g_{order[j,t]}^{(k)}`` (length ``⌈d/ℓ⌉``) as it goes,
   so a worker's memory does not grow with its load.
3. Erasures (lost or non-finite messages of workers due to send) set ``k_j = 0``:
   the PS re-solves, and the workers that send in the second round stream again
   (their chunk gradients are recomputed; ``recomputed_fraction`` counts it).
4. The PS decode ``ĝ^(r) = Σ_j A[r,j] z_j`` is a ``psum`` of per-device partial
   sums; the next step's plan, computed meanwhile on one device, rides in it.
5. ``ĝ`` is unflattened and applied with ``optax``. A step that cannot be
   decoded at all, or whose update is non-finite, is skipped.

The data arrives per worker (:mod:`jaxgc.backends.spmd.layout`): a device holds only
its workers' chunks. On a 1-D mesh parameters and optimizer state are replicated
(``P()``). On a ``workers × model`` mesh (PROTOCOL.md §13) a worker is a group of
devices: ``shard_map`` is manual over ``workers`` only, the per-worker computation
is partitioned automatically over ``model``, parameters and optimizer state are
sharded over ``model`` (:mod:`jaxgc.backends.spmd.sharding`), and messages are held
and decoded shard by shard (:class:`jaxgc.backends.spmd.sharding.MessageLayout`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgc import adaptive as _adaptive
from jaxgc import faults as _faults
from jaxgc import network as _network
from jaxgc import protocols as _protocols
from jaxgc import timing
from jaxgc.backends import base as _backend
from jaxgc.backends.spmd.chunk_fn import ChunkLoss, chunk_keys
from jaxgc.backends.spmd.devices import AXIS
from jaxgc.backends.spmd.layout import WorkerChunks, WorkerLayout
from jaxgc.backends.spmd.sharding import MessageLayout, Placement, place_params
from jaxgc.protocols import base as _base

__all__ = [
    "TrainState", "Plan", "Solve", "CodedStep", "make_coded_step", "PlainStep",
    "make_plain_step", "decode_sharded", "pvary", "MODES",
]

MODES = _protocols.MODES

def pvary(tree, axis_name):
  """Marks every leaf device-varying along ``axis_name`` (``jax.lax.pcast``).

  Needed before ``jax.grad`` inside ``shard_map``: the gradient w.r.t. an
  *invariant* (``P()``) input is, by the transpose rules, already ``psum``-ed over
  the axis; the coded step needs each worker's own chunk gradients.
  """
  cast = lambda x: (x if axis_name in jax.typeof(x).manual_axis_type.varying
                    else jax.lax.pcast(x, axis_name, to="varying"))
  return jax.tree.map(cast, tree)


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
  return jax.lax.psum(_base.decode_blocks(msgs, dec), axis_name).reshape(-1)[:d]


# -- state and plan --------------------------------------------------------------

class Solve(NamedTuple):
  """The PS's coefficients at one state, laid out for the step's devices.

  Attributes:
    enc: ``[m_pad, slots, ℓ]`` encoding coefficients (phantom workers: 0).
    dec: ``[ℓ, m_pad]`` decoding matrix.
    senders: bool ``[m_pad]``, workers that send.
    condition: ``[]`` worst condition number of the solve (1.0 where none applies).
    decodable: bool ``[]``, the state allows exact recovery.
    min_coverage: int32 ``[]``, ``min_i c_i(k)``.
    chunks_below_ell: int32 ``[]``, chunks with ``c_i(k) < ℓ``.
  """
  enc: jax.Array
  dec: jax.Array
  senders: jax.Array
  condition: jax.Array
  decodable: jax.Array
  min_coverage: jax.Array
  chunks_below_ell: jax.Array


class Plan(NamedTuple):
  """The PS's plan of one step, made from the key and straggler state alone.

  Attributes:
    stop: float32 ``[]``, simulated stop time (the step's simulated duration).
    counts: int32 ``[m]``, the state ``k`` at ``stop``.
    lost: bool ``[m_pad]``, messages lost in transit.
    corrupt: bool ``[m_pad]``, messages that arrive non-finite.
    solve: the :class:`Solve` at ``counts``.
  """
  stop: jax.Array
  counts: jax.Array
  lost: jax.Array
  corrupt: jax.Array
  solve: Solve


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
    plan: the :class:`Plan` of step ``step``, made during the previous step;
      ``None`` (:meth:`create`): the step plans itself first.
    straggler_state: the straggler model's state after the durations of the
      latest planned step (``()`` for i.i.d. models), so a model with memory
      advances with the steps and is checkpointed with them.
    adaptive_state: the adaptive PS's :class:`jaxgc.adaptive.AdaptiveState`
      after observing the latest planned step (``()`` without one): its
      placement is that of the step after ``plan``'s.
    model_state: the model's variables that are not trained (batch-norm running
      statistics), ``()`` for none; the loss receives it as its first extra
      argument, and :meth:`CodedStep.update` replaces it by the chunk mean of
      the loss's ``aux`` (ghost batch norm, PROTOCOL.md §12).
  """
  step: jax.Array
  params: Any
  opt_state: Any
  sim_time: jax.Array
  num_skipped: jax.Array
  num_erasures: jax.Array
  plan: Any = None
  straggler_state: Any = ()
  adaptive_state: Any = ()
  model_state: Any = ()

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation, plan=None,
             straggler_state=(), adaptive_state=(), model_state=()) -> TrainState:
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               sim_time=jnp.zeros((), jnp.float32), num_skipped=jnp.zeros((), jnp.int32),
               num_erasures=jnp.zeros((), jnp.int32), plan=plan,
               straggler_state=straggler_state, adaptive_state=adaptive_state,
               model_state=model_state)

  if TYPE_CHECKING:
    # Added at run time by flax.struct.dataclass; declared here for the type checker.
    def replace(self, **changes: Any) -> TrainState:
      """A copy with the fields in ``changes`` replaced."""
      ...


# -- collectives -------------------------------------------------------------------

PACK_LIMIT = 1 << 16   # leaves up to this many elements travel packed in one vector


def _psum_packed(tree, axis_name, whole=()):
  """``psum`` of a pytree as one all-reduce: small leaves packed, one vector per dtype.

  ``whole``: a pytree summed in the same all-reduce but never packed (message parts
  sharded over a group: packing would gather them); then returns ``(tree, whole)``.

  On CPU meshes every all-reduce is a rendezvous of all device threads and costs
  far more than the bytes it moves, so small leaves travel packed in one vector.
  Integer and bool leaves ride in float32, exact below 2**24 (counts and flags).
  Large leaves (gradients) are operands of the same all-reduce as they are:
  packing would copy them.
  """
  leaves, treedef = jax.tree.flatten(tree)
  big = [i for i, x in enumerate(leaves) if x.size > PACK_LIMIT]
  wire = [jnp.float32 if not jnp.issubdtype(x.dtype, jnp.floating) else x.dtype for x in leaves]
  groups: dict[Any, list[int]] = {}
  for i, dt in enumerate(wire):
    if i not in big:
      groups.setdefault(jnp.dtype(dt), []).append(i)
  packed = [jnp.concatenate([jnp.ravel(leaves[i]).astype(dt) for i in idx])
            for dt, idx in groups.items()]
  summed = jax.lax.psum(([leaves[i] for i in big], packed, whole), axis_name)
  out = [None] * len(leaves)
  for i, x in zip(big, summed[0], strict=True):
    out[i] = x
  for flat, idx in zip(summed[1], groups.values(), strict=True):
    start = 0
    for i in idx:
      size = int(np.prod(leaves[i].shape))
      part = flat[start:start + size].reshape(leaves[i].shape)
      if leaves[i].dtype == jnp.bool_:
        part = part > 0
      out[i] = part.astype(leaves[i].dtype)
      start += size
  out = jax.tree.unflatten(treedef, out)
  return (out, summed[2]) if jax.tree.leaves(whole) else out


def _psum_decode(msg: MessageLayout, part, rest, axis_name):
  """``(part, *rest)`` psummed in one all-reduce; a part sharded over a group travels whole."""
  s = msg.num_sharded_parts
  if not s:
    return _psum_packed((part,) + tuple(rest), axis_name)
  out, sharded = _psum_packed((part[s:],) + tuple(rest), axis_name, whole=part[:s])
  return (tuple(sharded) + tuple(out[0]),) + tuple(out[1:])


def _zeros(shapes):
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _compute_once(fn, axis_name, device: int, broadcast: bool = True):
  """Runs ``fn()`` (invariant inputs) on one device only and broadcasts its result.

  The PS-side work of a step (stop time, the coefficient solve) is the same on
  every device. Computed replicated it would run once per device, which on a
  CPU host with few cores is a real cost; here one device computes it and a
  ``psum`` against zeros elsewhere broadcasts it exactly.
  """
  shapes = jax.eval_shape(fn)
  mine = jax.lax.axis_index(axis_name) == device
  out = jax.lax.cond(mine, lambda: pvary(fn(), axis_name),
                     lambda: pvary(_zeros(shapes), axis_name))
  # Without broadcast the caller psums it, packed with other traffic.
  return _psum_packed(out, axis_name) if broadcast else out


# -- streaming over a device's chunk slots ------------------------------------------

def _stream(loss_fn, params, local, coef, compute, loss_weight, msg: MessageLayout,
            axis_name: str, ids=None, keys=None, args=(), num_chunks: int = 0):
  """Streams over this device's ``w × slots`` chunk slots, one chunk gradient at a time.

  Slot ``(j, t)`` adds ``Σ_k coef[j,t,k] · g^{(k)}`` to message ``j`` (``ℓ = 1``
  and ``coef = weight`` give the plain weighted sum); its gradient is computed
  only where ``compute[j, t]``; elsewhere at most a forward pass runs, for the
  loss, where ``loss_weight[j, t] != 0``.

  Args:
    loss_fn: a :class:`~jaxgc.backends.spmd.chunk_fn.ChunkLoss`, ``(params, chunk, key, args)
      -> (loss, aux)``.
    params: device-varying parameters.
    local: this device's chunks, leaves ``[w, slots, ...]``.
    coef: ``[w, slots, ℓ]``; compute: bool ``[w, slots]``; loss_weight: ``[w, slots]``.
    msg: the message layout (messages ``[w, ...]`` held shard by shard).
    ids: int ``[w, slots]``, the chunk of each slot (``-1``: none); keys: ``[N]``
      chunk keys (:func:`~jaxgc.backends.spmd.chunk_fn.chunk_keys`) or ``None``.
  Returns:
    ``(z, Σ loss_weight · loss [], chunk gradients computed [] int32, aux)``: ``z`` the
    ``w`` messages (``msg``'s parts with a leading ``[w]``, ``≈ ⌈d/ℓ⌉`` numbers each);
    ``aux`` leaves ``[N, ...]``, chunk ``i``'s row from its slot with
    ``loss_weight != 0`` on this device, zeros elsewhere (``()`` without aux).
  """
  w, slots = compute.shape
  ids = jnp.zeros((w, slots), jnp.int32) if ids is None else jnp.maximum(ids, 0)
  call = lambda p, j, t: loss_fn(p, jax.tree.map(lambda a: a[j, t], local),
                                 None if keys is None else keys[ids[j, t]], args)
  loss_shape, aux_shape = jax.eval_shape(lambda: call(params, 0, 0))
  vary = lambda x: pvary(x, axis_name)

  def gradient(j, t):
    (loss, aux), g = jax.value_and_grad(lambda p: call(p, j, t), has_aux=True)(params)
    return vary((loss, aux, msg.encode(g, coef[j, t])))

  def forward(j, t):
    loss, aux = call(params, j, t)
    return vary((loss, aux, msg.zeros()))

  def nothing(j, t):
    del j, t
    return vary((jnp.zeros(loss_shape.shape, loss_shape.dtype), _zeros(aux_shape),
                 msg.zeros()))

  def body(carry, idx):
    z, loss, n, aux = carry
    j, t = idx // slots, idx % slots
    branch = jnp.where(compute[j, t], 2, jnp.where(loss_weight[j, t] != 0, 1, 0))
    loss_jt, a, contrib = jax.lax.switch(branch, (nothing, forward, gradient), j, t)
    # Each chunk's aux from one copy: the slot that counts its loss.
    i, own = ids[j, t], loss_weight[j, t] != 0
    aux = jax.tree.map(lambda buf, x: buf.at[i].set(jnp.where(own, x, buf[i])), aux, a)
    z = tuple(zp.at[j].add(cp) for zp, cp in zip(z, contrib, strict=True))
    return (z, loss + loss_weight[j, t] * loss_jt, n + compute[j, t].astype(jnp.int32), aux), None

  aux0 = jax.tree.map(lambda s: jnp.zeros((max(num_chunks, 1),) + s.shape, s.dtype), aux_shape)
  init = vary((msg.zeros(w), jnp.zeros((), loss_shape.dtype), jnp.zeros((), jnp.int32), aux0))
  (z, loss, n, aux), _ = jax.lax.scan(body, init, jnp.arange(w * slots))
  return z, loss, n, aux


def _used_slots(protocol) -> int:
  """How many leading slots per worker the protocol can ever use (all if none)."""
  used = protocol.slots_in_use()
  if not used.any():
    return protocol.assignment.max_load
  return int(np.max(np.nonzero(used)[1])) + 1


def _as_worker_chunks(layout: WorkerLayout, chunks) -> WorkerChunks:
  if isinstance(chunks, WorkerChunks):
    layout.check(chunks)
    return chunks
  return layout.shard_chunks(chunks)


# -- placement on a workers × model mesh ---------------------------------------------

def _check_mesh(mesh: Mesh, axis_name: str) -> None:
  if len(mesh.axis_names) > 2:
    raise ValueError(f"mesh axes {tuple(mesh.axis_names)}: expected ({axis_name!r},) or "
                     f"({axis_name!r}, 'model'); build it with "
                     "jaxgc.parallel.make_mesh(n, model=k).")


def _placement(step, params) -> Placement:
  """``place_params`` of the step's mesh and rule, cached per parameter structure."""
  leaves, treedef = jax.tree.flatten(params)
  key = (treedef, tuple((tuple(np.shape(x)), str(x.dtype)) for x in leaves))
  held = step.__dict__.setdefault("_placements", {})
  if key not in held:
    held[key] = place_params(params, step.mesh, step.param_sharding,
                             workers_axis=step.axis_name)
  return held[key]


def _state_sharding(step, state):
  rep = NamedSharding(step.mesh, P())
  place = _placement(step, state.params)
  out = jax.tree.map(lambda _: rep, state)
  return out.replace(params=place.shardings,
                     opt_state=place.opt_shardings(step.tx, state.opt_state))


def _keep_placed(step, state):
  """The state's parameters and optimizer state constrained to their placement (a no-op on a
  1-D mesh): XLA would otherwise be free to lay out the updated state as it likes."""
  place = _placement(step, state.params)
  if not place.sharded:
    return state
  shard = _state_sharding(step, state)
  put = lambda tree, sh: jax.tree.map(
      lambda x, s: (jax.lax.with_sharding_constraint(x, s) if isinstance(x, jax.core.Tracer)
                    else jax.device_put(x, s)), tree, sh)
  return state.replace(params=put(state.params, shard.params),
                       opt_state=put(state.opt_state, shard.opt_state))


# -- the coded step --------------------------------------------------------------

class CodedStep:
  """A coded gradient step for a protocol, straggler model, model loss and optimizer.

  Build with :func:`make_coded_step`. Methods are pure (jit them, or use
  :meth:`jit`); keys and chunks are explicit arguments, so the same
  ``(key, chunks)`` always gives the same step.

  With an ``adaptive`` PS (:class:`jaxgc.adaptive.AdaptivePS`), a step's plan
  draws the physical workers' durations, routes logical worker ``j``'s chunk list
  to physical worker ``perm[j]`` (:func:`jaxgc.adaptive.apply_placement`), runs
  the stop rule on the placed durations, and lets the PS observe the state
  (before any erasure) to choose the next step's placement. Plans are made one
  step ahead, so step ``t``'s observation always precedes step ``t+1``'s
  placement, and the PS's state is a function of the key and the steps taken:
  checkpointed in :attr:`TrainState.adaptive_state`, it resumes bit-exactly.
  Only simulated durations move; chunks, coefficients per logical worker and
  exactness are those of the static PS.
  """

  # A jaxgc.backends.StepBackend: update is a pure JAX function (the loop jits it).
  traced = True

  def __init__(self, protocol, straggler, loss_fn: Callable,
               tx: optax.GradientTransformation | None, mesh: Mesh, *, mode: str = "exact",
               deadline: float | None = None, timeout: float | None = None,
               message_loss_prob: float = 0.0, nan_message_prob: float = 0.0,
               axis_name: str = AXIS, report_condition: bool = True, check_vma: bool = True,
               adaptive: _adaptive.AdaptivePS | None = None, has_aux: bool = False,
               network: _network.Network | None = None, param_sharding=None,
               fail_at=None):
    _check_straggler(straggler)
    if tx is not None and not isinstance(tx, optax.GradientTransformation):
      raise ValueError(f"tx must be an optax.GradientTransformation (or None for gradients "
                       f"only), got {type(tx).__name__}.")
    self.chunk_loss = ChunkLoss(loss_fn, has_aux)
    self.has_aux = has_aux
    a = protocol.assignment
    if network is not None and not isinstance(network, _network.Network):
      raise TypeError(f"network must be a jaxgc.network model (get_network('ps', bandwidth=B)),"
                      f" got {type(network).__name__}.")
    if adaptive is not None and (adaptive.protocol.assignment.num_workers != a.num_workers
                                 or not np.array_equal(adaptive.protocol.assignment.order,
                                                       a.order)):
      raise ValueError("adaptive: the AdaptivePS was built for another assignment; build it "
                       "with the step's protocol, AdaptivePS(protocol).")
    _backend.check_step_args(protocol, mode, deadline, timeout, message_loss_prob,
                             nan_message_prob)
    self.protocol = protocol
    self.assignment = a
    self.straggler = straggler
    self.loss_fn = loss_fn
    self.tx = tx
    self.mesh = mesh
    self.mode = mode
    self.deadline = None if deadline is None else float(deadline)
    self.timeout = None if timeout is None else float(timeout)
    self.message_loss_prob = float(message_loss_prob)
    self.nan_message_prob = float(nan_message_prob)
    self.adaptive = adaptive
    # Messages cost stop + comm in simulated time; the deadline bounds the computation only
    # (jaxgc.network's docstring says why).
    self.network = _network.NoNetwork() if network is None else network
    self.fail_at = _faults.fault_schedule(fail_at, a.num_workers)
    self.axis_name = axis_name
    self.check_vma = check_vma
    self.report_condition = report_condition and protocol.reports_condition
    self.layout = WorkerLayout(a, mesh, _used_slots(protocol), axis_name)
    self.param_sharding = param_sharding
    _check_mesh(mesh, axis_name)
    # Σ_j load_j: the chunk gradients of a step that computes every slot.
    self._all_slots = float(np.sum(a.loads))

  # -- the per-worker input ---------------------------------------------------
  def shard_chunks(self, chunks) -> WorkerChunks:
    """The step's chunks ``[N, ...]`` laid out per worker (:meth:`WorkerLayout.shard_chunks`)."""
    return self.layout.shard_chunks(chunks)

  # -- where parameters live ---------------------------------------------------
  def placement(self, params) -> Placement:
    """The :class:`~jaxgc.backends.spmd.sharding.Placement` of ``params`` (arrays or shapes) on
    the mesh: the FSDP rule, or ``param_sharding``. ``placement(p).summary()`` lists it."""
    return _placement(self, params)

  def state_sharding(self, state: TrainState):
    """A :class:`TrainState` of ``NamedSharding``s: parameters and optimizer state as
    :meth:`placement` puts them, everything else replicated (``P()``)."""
    return _state_sharding(self, state)

  # -- PS side: plan and solve ------------------------------------------------
  def _solve(self, counts) -> Solve:
    lay, proto = self.layout, self.protocol
    c = proto.solve(counts)
    cov = proto.coverage(counts)
    pad = lambda x, axis: jnp.pad(x, [(0, lay.m_pad - lay.m) if i == axis else (0, 0)
                                      for i in range(x.ndim)])
    return Solve(enc=pad(c.enc, 0)[:, : lay.slots], dec=pad(c.dec, 1),
                 senders=pad(c.senders, 0), condition=jnp.asarray(c.condition, jnp.float32),
                 decodable=jnp.asarray(proto.is_decodable(counts), bool),
                 min_coverage=jnp.min(cov).astype(jnp.int32),
                 chunks_below_ell=jnp.sum(cov < proto.ell, dtype=jnp.int32))

  def _draw(self, key, straggler_state, adaptive_state=(), step=None):
    """The cheap random part of a plan: durations, message faults, the model's next state.

    With an adaptive PS the durations are the logical workers' (placed by
    ``adaptive_state``'s placement). ``step``: the step's index, for the fault
    schedule (a failed worker's durations are ``+inf``); ``None``: no schedule.
    """
    durations, lost, corrupt, straggler_state = _backend.draw_step(
        self.straggler, self.assignment, key, straggler_state, self.message_loss_prob,
        self.nan_message_prob)
    if step is not None and self.fail_at.pairs:
      # Physical workers fail (before any placement), as the Ray backend's killed actors do.
      failed = _faults.mask(self.fail_at, step, self.assignment.num_workers)
      durations = jnp.where(failed[:, None], jnp.inf, durations)
    if self.adaptive is not None:
      durations = _adaptive.apply_placement(durations, self.adaptive.placement(adaptive_state),
                                            self.assignment)
    # Drawn for the m real workers, then padded: the same draws on any device count
    # (and on the Ray backend), so num_devices does not change results.
    pad = lambda x: jnp.pad(x, (0, self.layout.m_pad - self.layout.m))
    return (durations, pad(lost), pad(corrupt)), straggler_state

  def _plan(self, durations, lost, corrupt) -> Plan:
    """The costly part: the stop rule, the state and the solve."""
    stop = _protocols.stop_time(self.protocol, durations, self.mode, self.deadline, self.timeout)
    counts = timing.progress(durations, stop)
    return Plan(jnp.asarray(stop, jnp.float32), counts, lost, corrupt, self._solve(counts))

  def _plan_observed(self, draw, adaptive_state):
    """``(plan, adaptive_state)``: the plan, then the adaptive PS's observation of its state.

    The PS observes the counts before any erasure zeroes them: an erased message
    says nothing about its worker's speed.
    """
    plan = self._plan(*draw)
    if self.adaptive is not None:
      adaptive_state = self.adaptive.observe(adaptive_state, plan.counts, plan.stop)
    return plan, adaptive_state

  def init_straggler_state(self, key):
    """The straggler model's state before step 0 (``key``: the base key)."""
    return _backend.init_straggler_state(self.straggler, key, self.assignment.num_workers)

  def init_adaptive_state(self):
    """The adaptive PS's state before step 0 (the static placement); ``()`` without a PS."""
    return () if self.adaptive is None else self.adaptive.init()

  def init_plan(self, key, step=0, straggler_state=None, adaptive_state=None):
    """``(plan, straggler_state)``: the :class:`Plan` of step ``step`` and the model's state
    after it.

    ``key`` is the base key (step ``s`` draws from ``fold_in(key, s)``);
    ``straggler_state`` is the model's state before step ``step`` (default: its
    initial state); ``adaptive_state`` the adaptive PS's state before it
    (default: its initial state). :meth:`plan_step` also returns the PS's state.
    """
    return self.plan_step(key, step, straggler_state, adaptive_state)[:2]

  def plan_step(self, key, step=0, straggler_state=None, adaptive_state=None):
    """``(plan, straggler_state, adaptive_state)``: :meth:`init_plan` and the PS's state after."""
    if straggler_state is None:
      straggler_state = self.init_straggler_state(key)
    if adaptive_state is None:
      adaptive_state = self.init_adaptive_state()
    draw, straggler_state = self._draw(jax.random.fold_in(key, step), straggler_state,
                                       adaptive_state, step)
    plan, adaptive_state = self._plan_observed(draw, adaptive_state)
    return plan, straggler_state, adaptive_state

  def init_state(self, params, key, model_state=()) -> TrainState:
    """A fresh :class:`TrainState` whose first step is already planned, its parameters
    and optimizer state placed (:meth:`placement`; sharded over ``model`` on a 2-D mesh).

    ``model_state``: the model's untrained variables (e.g. ``{"batch_stats": ...}``).
    """
    tx = self._need_tx("init_state")
    plan, straggler_state, adaptive_state = self.plan_step(key)
    place = self.placement(params)
    params = place.place(params) if place.sharded else params
    state = TrainState.create(params, tx, plan=plan, straggler_state=straggler_state,
                              adaptive_state=adaptive_state, model_state=model_state)
    return _keep_placed(self, state)

  def _need_tx(self, what: str) -> optax.GradientTransformation:
    """The optimizer; a ``ValueError`` naming ``what`` when the step was built without one."""
    if self.tx is None:
      raise ValueError(f"{what} applies an optimizer, but this step was built with tx=None; "
                       "pass tx (any optax.GradientTransformation) to make_coded_step, or "
                       "use gradient() / jaxgc.coded_value_and_grad and your own update.")
    return self.tx

  # -- gradient ---------------------------------------------------------------
  def _chunk_inputs(self, wids, key, args):
    """:func:`_stream`'s chunk arguments on this device: its slots' chunks, the chunk keys
    (:func:`chunk_keys`, for a loss that takes ``rng``) and the loss's extra ``args``,
    all the same on every copy of a chunk (PROTOCOL.md §12)."""
    lay = self.layout
    return dict(ids=jnp.asarray(lay.order)[wids], args=args, num_chunks=lay.num_chunks,
                keys=None if key is None else chunk_keys(key, lay.num_chunks))

  def _sharded_gradient(self, params, worker_chunks: WorkerChunks, plan: Plan, next_draw,
                        key=None, args=()):
    """``(ĝ [d], metrics, next)``: the step's one code path.

    ``key`` and ``args``: see :meth:`_chunk_inputs`; with ``has_aux``, ``metrics["aux"]``.

    ``next_draw`` (``(durations and faults of the next step, adaptive PS state)``,
    or ``None``) is turned into ``next = (next Plan, adaptive PS state after
    observing it)`` on the PS device while the others compute gradients, and
    rides in the decode all-reduce: one synchronisation per step.
    """
    lay, ax = self.layout, self.axis_name
    msg = MessageLayout(self.placement(params), self.protocol.ell)
    leaves = jax.tree.leaves(params)
    d, dtype = sum(int(np.size(x)) for x in leaves), jnp.result_type(*leaves)
    # The last device holds the phantom workers, so it has the least (often no)
    # gradient work: it plays the PS, and runs the PS-side work once for all.
    ps_device = self.mesh.shape[ax] - 1

    def body(params, local, plan, next_draw, extra):
      wids = jax.lax.axis_index(ax) * lay.per_device + jnp.arange(lay.per_device)
      pv = pvary(params, ax)
      owner = jnp.asarray(lay.loss_owner, jnp.float32)[wids]
      enc = plan.solve.enc[wids]
      chunk = self._chunk_inputs(wids, *extra)
      z, loss, computed, aux = _stream(self.chunk_loss, pv, local, enc, jnp.any(enc != 0, -1),
                                       owner, msg, ax, **chunk)
      sends = plan.solve.senders[wids]
      # A corrupted message is one the PS finds non-finite: erased like a lost one.
      # One sum per message instead of an elementwise mask: NaN/Inf anywhere makes it non-finite.
      bad = sends & (plan.lost[wids] | plan.corrupt[wids] | ~jnp.isfinite(msg.row_sums(z)))
      flags = jnp.zeros(lay.m_pad, jnp.int32).at[wids].set(bad.astype(jnp.int32))
      nxt = (None if next_draw is None else
             _compute_once(lambda: self._plan_observed(*next_draw), ax, ps_device,
                           broadcast=False))
      # Optimistic: decode, erasure flags, loss and the next plan share one
      # all-reduce; a round with an erasure is redone below.
      part = msg.decode(tuple(jnp.where(bad.reshape((-1,) + (1,) * (x.ndim - 1)), 0.0, x)
                              for x in z), plan.solve.dec[:, wids])
      # Each chunk's aux is nonzero on one device only: the psum gathers it exactly.
      part, flags, loss, computed, nxt, aux = _psum_decode(
          msg, part, (flags, loss, computed, nxt, aux), ax)
      erased = flags[: lay.m] > 0
      num_erased = jnp.sum(erased, dtype=jnp.int32)

      def redo():
        # The state is known before any gradient moves, so an erasure costs one
        # re-solve and a re-encode. Round 1's messages are not kept (that would
        # hold a second message buffer through the decode): every worker that
        # sends in round 2 streams its chunks again.
        counts = jnp.where(erased, 0, plan.counts)
        s2 = _compute_once(lambda: self._solve(counts), ax, ps_device)
        enc2 = s2.enc[wids]
        z2, _, again, _ = _stream(self.chunk_loss, pv, local, enc2, jnp.any(enc2 != 0, -1),
                                  jnp.zeros_like(owner), msg, ax, **chunk)
        part2, again = _psum_decode(msg, msg.decode(z2, s2.dec[:, wids]), (again,), ax)
        return part2, counts, s2, again

      keep = lambda: (part, plan.counts, plan.solve, jnp.zeros((), jnp.int32))
      part, counts, solve, again = jax.lax.cond(num_erased > 0, redo, keep)
      g = msg.join(part)
      skipped = ~jnp.any(solve.senders) | ~jnp.isfinite(sum(jnp.sum(x) for x in part))
      comm = _network.step_comm_time(self.network, self.protocol, d, dtype,
                                     jnp.sum(plan.solve.senders), jnp.sum(solve.senders),
                                     num_erased > 0)
      metrics = {
          "loss": loss, "step_sim_time": plan.stop + comm, "step_comm_time": comm,
          "erasures": num_erased,
          "skipped": skipped, "exact": solve.decodable & ~skipped,
          "decodable": solve.decodable, "min_coverage": solve.min_coverage,
          "chunks_below_ell": solve.chunks_below_ell,
          "senders": jnp.sum(solve.senders, dtype=jnp.int32),
          "computed_fraction": computed / self._all_slots,
          "recomputed_fraction": again / self._all_slots,
          "counts": counts,
      }
      if self.report_condition:
        metrics["condition_number"] = solve.condition
      if self.has_aux:
        metrics["aux"] = aux
      return g, metrics, nxt

    fn = jax.shard_map(body, mesh=self.mesh, in_specs=(P(), P(ax), P(), P(), P()),
                       out_specs=P(), axis_names={ax}, check_vma=self.check_vma)
    key = key if self.chunk_loss.uses_rng else None
    return fn(params, worker_chunks.data, plan, next_draw, (key, tuple(args)))

  def gradient(self, params, chunks, key, *args):
    """The decoded gradient and step metrics of one step drawn from ``key``.

    Args:
      params: replicated parameter pytree.
      chunks: pytree with leaves ``[N, chunk_batch, ...]``, or :class:`WorkerChunks`.
      key: the step's PRNG key (durations, message losses, corruptions); the
        straggler model starts from its initial state. A loss that takes ``rng``
        gets ``chunk_keys(key, N)[i]`` for chunk ``i``.
      *args: passed to the loss after the chunk, the same on every worker.
    Returns:
      ``(grads, metrics)``: the estimate ``ĝ`` as a pytree like ``params`` (NaN
      possible only when ``metrics['skipped']``), and a dict of scalars
      (``loss``, ``step_sim_time`` = stop + ``step_comm_time``, ``min_coverage``,
      ``chunks_below_ell``,
      ``decodable``, ``erasures``, ``skipped``, ``exact``, ``senders``,
      ``computed_fraction``, ``recomputed_fraction``, ``condition_number``
      when the protocol reports one) plus the final state ``counts`` ``[m]``,
      and with ``has_aux`` the chunks' ``aux`` (leaves ``[N, ...]``).
    """
    draw, _ = self._draw(key, self.init_straggler_state(key), self.init_adaptive_state())
    g, metrics, _ = self._sharded_gradient(params, _as_worker_chunks(self.layout, chunks),
                                           self._plan(*draw), None, key, args)
    return g, metrics

  # -- full update --------------------------------------------------------------
  def update(self, state: TrainState, chunks, key, *args):
    """One optimizer step. Returns ``(new_state, metrics)``; never writes NaN into params.

    The loss gets ``state.model_state`` (when it has one) and then ``args`` after
    the chunk, and ``rng=chunk_keys(fold_in(key, step), N)[i]`` when it takes
    ``rng``. With a model state the loss must have ``has_aux`` and return its
    chunk's new model state as ``aux``; the new ``state.model_state`` is the
    mean over the chunks (ghost batch norm, PROTOCOL.md §12).

    Args:
      state: replicated state (:meth:`init_state`); a state without a plan
        (:meth:`TrainState.create`) plans its step first.
      chunks: pytree with leaves ``[N, chunk_batch, ...]`` (laid out per worker
        here), or :class:`WorkerChunks` from :meth:`shard_chunks`.
      key: the *base* key; step ``s`` draws from ``fold_in(key, s)``, so a run is
        a function of ``(key, data)`` and resumes exactly from a checkpoint.
    """
    tx = self._need_tx("update")
    worker_chunks = _as_worker_chunks(self.layout, chunks)
    has_model_state = bool(jax.tree.leaves(state.model_state))
    if has_model_state and not self.has_aux:
      raise ValueError("the state has a model_state, so the loss must return (loss, "
                       "new_model_state) and the step be built with has_aux=True.")
    args = ((state.model_state,) if has_model_state else ()) + tuple(args)
    plan, straggler_state, adaptive_state = state.plan, state.straggler_state, state.adaptive_state
    if plan is None:
      # A fresh state: the model's and the PS's initial states.
      fresh = lambda s: None if not jax.tree.leaves(s) else s
      plan, straggler_state, adaptive_state = self.plan_step(
          key, state.step, fresh(straggler_state), fresh(adaptive_state))
    next_draw, straggler_state = self._draw(jax.random.fold_in(key, state.step + 1),
                                            straggler_state, adaptive_state, state.step + 1)
    g, metrics, (next_plan, adaptive_state) = self._sharded_gradient(
        state.params, worker_chunks, plan, (next_draw, adaptive_state),
        jax.random.fold_in(key, state.step), args)
    aux = metrics.pop("aux", ())
    model_state = _chunk_mean(state.model_state, aux) if has_model_state else state.model_state
    params, opt_state, finite = _backend.optimizer_update(tx, g, state.opt_state, state.params)
    skip = metrics.pop("skipped") | ~finite
    params, opt_state, model_state = _backend.keep_if(
        skip, (state.params, state.opt_state, state.model_state),
        (params, opt_state, model_state))
    sim_time = state.sim_time + metrics["step_sim_time"]
    new = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, sim_time=sim_time,
        num_skipped=state.num_skipped + skip.astype(jnp.int32),
        num_erasures=state.num_erasures + metrics["erasures"], plan=next_plan,
        straggler_state=straggler_state, adaptive_state=adaptive_state, model_state=model_state)
    new = _keep_placed(self, new)
    metrics.pop("counts")
    metrics.update(skipped=skip, exact=metrics["exact"] & ~skip, sim_time=sim_time)
    return new, metrics

  def jit(self, donate: bool = False):
    """``update`` jitted: ``(state, chunks, key) -> (state, metrics)``."""
    return jax.jit(self.update, donate_argnums=(0,) if donate else ())

  def close(self) -> None:
    """Nothing to release (the devices are JAX's); the step stays usable."""


def make_coded_step(protocol, straggler, loss_fn, tx=None, mesh=None, *, mode: str = "exact",
                    deadline: float | None = None, timeout: float | None = None,
                    message_loss_prob: float = 0.0, nan_message_prob: float = 0.0,
                    axis_name: str = AXIS, report_condition: bool = True,
                    check_vma: bool = True,
                    adaptive: _adaptive.AdaptivePS | None = None,
                    has_aux: bool = False,
                    network: _network.Network | None = None,
                    param_sharding=None, fail_at=None) -> CodedStep:
  """Builds a :class:`CodedStep`.

  Args:
    protocol: a :mod:`jaxgc.protocols` protocol (its assignment fixes ``m`` and ``N``).
    straggler: a :mod:`jaxgc.timing` model (i.i.d., or with memory across steps).
    loss_fn: ``loss(params, chunk, *args) -> scalar`` (``-> (loss, aux)`` with
      ``has_aux``); the chunk losses must sum to the step's loss (see
      :func:`jaxgc.models.chunk_loss_fn`). A keyword parameter ``rng`` receives
      the chunk's key (:func:`jaxgc.chunk_keys`), the same on every copy.
    tx: any ``optax.GradientTransformation``; ``None`` where only :meth:`CodedStep.gradient`
      is used (a mesh given in its place is taken as the mesh).
    mesh: a mesh with an axis ``"workers"``, and optionally ``"model"`` (a worker is a
      group of devices): :func:`jaxgc.parallel.make_mesh`.
    has_aux: the loss returns ``(loss, aux)``; aux comes back per chunk, ``[N, ...]``.
    mode: ``"exact"`` or ``"deadline"`` (:func:`jaxgc.protocols.stop_time`).
    deadline: simulated seconds, deadline mode.
    timeout: exact mode: when the PS gives up on a never-decodable step (its
      simulated cost); ``None``: the last finite finish time.
    message_loss_prob: probability that a sending worker's message is lost (an
      injected erasure).
    nan_message_prob: probability that a sending worker's message arrives as NaN
      (an injected erasure).
    report_condition: add ``condition_number`` to the metrics where the protocol
      reports one.
    check_vma: ``shard_map``'s varying-axes check.
    adaptive: an adaptive PS (:class:`jaxgc.adaptive.AdaptivePS` of ``protocol``)
      that re-chooses the placement of chunk lists on workers between steps;
      ``None``: the static placement.
    network: a :mod:`jaxgc.network` model; the step's simulated time is ``stop + comm``
      (``step_comm_time``). ``None``: messages are free.
    param_sharding: on a ``workers × model`` mesh, where parameters (and the
      optimizer state) live: ``None`` for the FSDP rule
      (:func:`jaxgc.backends.spmd.sharding.fsdp_rule`), a rule function
      ``(path, shape, k) -> PartitionSpec``, or a pytree of ``PartitionSpec``.
    fail_at: a deterministic fault schedule, ``[(worker, step), ...]``
      (:func:`jaxgc.faults.fault_schedule`): worker ``worker`` finishes no chunk
      in step ``step`` (its durations are ``+inf``).
  """
  if mesh is None and isinstance(tx, Mesh):
    tx, mesh = None, tx
  if not isinstance(mesh, Mesh):
    raise ValueError(f"mesh must be a jax.sharding.Mesh (jaxgc.parallel.make_mesh()), got "
                     f"{type(mesh).__name__}.")
  return CodedStep(protocol, straggler, loss_fn, tx, mesh, mode=mode, deadline=deadline,
                   timeout=timeout, message_loss_prob=message_loss_prob,
                   nan_message_prob=nan_message_prob, axis_name=axis_name,
                   report_condition=report_condition, check_vma=check_vma, adaptive=adaptive,
                   has_aux=has_aux, network=network, param_sharding=param_sharding,
                   fail_at=fail_at)


def _check_straggler(straggler) -> None:
  """Refuses, when the step is built, a straggler model that cannot draw durations."""
  if getattr(straggler, "stateful", False):
    ok = callable(getattr(straggler, "sample_step", None))
  else:
    ok = callable(getattr(straggler, "sample", None))
  if not ok:
    raise ValueError(
        f"straggler must be a straggler model with sample(key, assignment) (or, with memory, "
        f"sample_step), got {type(straggler).__name__} {straggler!r}; build one with "
        "jaxgc.timing.get_straggler_model(name) or e.g. jaxgc.timing.Slowdown(...).")


def _chunk_mean(model_state, aux):
  """The new model state: the mean over chunks of each chunk's (ghost batch norm)."""
  # (the ignore: jaxlib has no stub for PyTreeDef, so mypy cannot compare two)
  if jax.tree.structure(aux) != jax.tree.structure(model_state):  # type: ignore[operator]
    raise ValueError(f"the loss's aux must be the chunk's new model state, with the structure "
                     f"of state.model_state {jax.tree.structure(model_state)}, got "
                     f"{jax.tree.structure(aux)}.")
  mean = lambda a, old: (jnp.mean(a, 0).astype(old.dtype)
                         if jnp.issubdtype(a.dtype, jnp.floating) else a[0])
  return jax.tree.map(mean, aux, model_state)


# -- uncoded reference with the same per-device work --------------------------------

class PlainStep:
  """Same chunk gradients per device as the coded step, streamed, summed and ``psum``-ed.

  The reference for measuring coding overhead (time and memory: it accumulates
  the same per-device chunks one at a time), and a direct full-batch gradient
  (each chunk counted once) for tests.
  """

  def __init__(self, assignment, loss_fn, tx, mesh, *, compute_slots: int | None = None,
               axis_name: str = AXIS, check_vma: bool = True, param_sharding=None):
    _check_mesh(mesh, axis_name)
    self.assignment, self.param_sharding = assignment, param_sharding
    self.loss_fn, self.tx, self.mesh, self.axis_name = loss_fn, tx, mesh, axis_name
    self.chunk_loss = ChunkLoss(loss_fn)
    self.check_vma = check_vma
    self.layout = WorkerLayout(assignment, mesh, compute_slots, axis_name)
    # Weight 1/(#computed copies) per slot: every chunk counted exactly once.
    order = self.layout.order
    valid = order >= 0
    copies = np.bincount(order[valid], minlength=assignment.num_chunks)
    self.weight = np.where(valid, 1.0 / np.maximum(copies[np.maximum(order, 0)], 1),
                           0.0).astype(np.float32)

  def shard_chunks(self, chunks) -> WorkerChunks:
    return self.layout.shard_chunks(chunks)

  def gradient(self, params, chunks):
    """``(Σ_i g_i as a pytree, loss)``."""
    lay, ax = self.layout, self.axis_name
    msg = MessageLayout(_placement(self, params), 1)

    def body(params, local):
      wids = jax.lax.axis_index(ax) * lay.per_device + jnp.arange(lay.per_device)
      weight = jnp.asarray(self.weight)[wids]
      # The loss as the coded step counts it: each chunk once, at its loss-owning slot.
      owner = jnp.asarray(lay.loss_owner, jnp.float32)[wids]
      z, loss, _, _ = _stream(self.chunk_loss, pvary(params, ax), local, weight[..., None],
                              weight != 0, owner, msg, ax)
      g, loss = _psum_packed((tuple(jnp.sum(x, 0) for x in z), loss), ax)
      return msg.join(tuple(x[None] for x in g)), loss

    fn = jax.shard_map(body, mesh=self.mesh, in_specs=(P(), P(ax)), out_specs=(P(), P()),
                       axis_names={ax}, check_vma=self.check_vma)
    return fn(params, _as_worker_chunks(lay, chunks).data)

  def update(self, state: TrainState, chunks, key=None):
    del key
    grads, loss = self.gradient(state.params, chunks)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state), {"loss": loss}

  def jit(self, donate: bool = False):
    return jax.jit(self.update, donate_argnums=(0,) if donate else ())


def make_plain_step(assignment, loss_fn, tx, mesh, *, compute_slots: int | None = None,
                    axis_name: str = AXIS, check_vma: bool = True,
                    param_sharding=None) -> PlainStep:
  """Builds a :class:`PlainStep` (uncoded, same per-device work)."""
  return PlainStep(assignment, loss_fn, tx, mesh, compute_slots=compute_slots,
                   axis_name=axis_name, check_vma=check_vma, param_sharding=param_sharding)

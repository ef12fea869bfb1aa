"""The coded training step under ``shard_map`` (PROTOCOL.md §6): :class:`CodedStep`.

One step, one jitted graph, one code path: the step's plan was made one step
ahead (:mod:`jaxgc.backends.spmd.lookahead`); the gradient is streamed, decoded and,
after erasures, redone in :mod:`jaxgc.backends.spmd.gradient`; ``ĝ`` is
unflattened and applied with ``optax`` (:func:`jaxgc.backends.core.apply_step`). A
step that cannot be decoded at all, or whose update is non-finite, is skipped.

The data arrives per worker (:mod:`jaxgc.backends.spmd.layout`): a device holds
only its workers' chunks. On a 1-D mesh parameters and optimizer state are
replicated (``P()``). On a ``workers × model`` mesh (PROTOCOL.md §13) a worker is
a group of devices: ``shard_map`` is manual over ``workers`` only, the per-worker
computation is partitioned automatically over ``model``, parameters and optimizer
state are sharded over ``model`` (:mod:`jaxgc.backends.spmd.placement`), and
messages are held and decoded shard by shard
(:class:`jaxgc.backends.spmd.sharding.MessageLayout`).
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from jaxgc import adaptive as _adaptive
from jaxgc import faults as _faults
from jaxgc import network as _network
from jaxgc import precision as _precision
from jaxgc import protocols as _protocols
from jaxgc.backends import base as _backend
from jaxgc.backends import core
from jaxgc.backends.base import TrainState
from jaxgc.backends.chunk_rule import ChunkLoss, check_key
from jaxgc.backends.chunk_rule import chunk_mean as _chunk_mean
from jaxgc.backends.spmd import placement as _placement
from jaxgc.backends.spmd.devices import AXIS
from jaxgc.backends.spmd.gradient import GradientSpec, sharded_gradient
from jaxgc.backends.spmd.layout import WorkerChunks, WorkerLayout
from jaxgc.backends.spmd.lookahead import Lookahead
from jaxgc.backends.spmd.placement import PlacementSpec
from jaxgc.backends.spmd.sharding import Placement
from jaxgc.errors import ParamError

__all__ = ["CodedStep", "make_coded_step", "MODES", "check_batch_axis"]

MODES = _protocols.MODES


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
               fail_at=None, message_dtype: str = "float32",
               batch_axis_name: str | None = None):
    _backend.check_straggler(straggler)
    if tx is not None and not isinstance(tx, optax.GradientTransformation):
      raise ValueError(f"tx must be an optax.GradientTransformation (or None for gradients "
                       f"only), got {type(tx).__name__}.")
    self.chunk_loss = ChunkLoss(loss_fn, has_aux)
    self.has_aux = has_aux
    a = protocol.assignment
    if network is not None and not isinstance(network, _network.Network):
      raise TypeError(f"network must be a jaxgc.network model (get_network('ps', bandwidth=B)),"
                      f" got {type(network).__name__}.")
    _backend.check_adaptive(adaptive, protocol)
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
    self.message_dtype = _precision.check_message_dtype(message_dtype)
    self.axis_name = axis_name
    self.check_vma = check_vma
    self.report_condition = report_condition and protocol.reports_condition
    self.layout = WorkerLayout(a, mesh, core.slot_width(protocol), axis_name)
    self.param_sharding = param_sharding
    _placement.check_mesh(mesh, axis_name)
    self.batch_axis_name = check_batch_axis(batch_axis_name, mesh)
    self.place = PlacementSpec(mesh, axis_name, param_sharding)
    self.lookahead = Lookahead(protocol, straggler, self.layout, mode, self.deadline,
                               self.timeout, self.message_loss_prob, self.nan_message_prob,
                               self.fail_at, adaptive, self.network, self.message_dtype)
    # What the gradient depends on (it never calls back into the step).
    self.spec = GradientSpec(self.layout, self.chunk_loss, self.lookahead, self.network,
                             axis_name, self.place, check_vma, self.report_condition,
                             self.message_dtype, self.batch_axis_name)

  # -- the per-worker input ---------------------------------------------------
  def shard_chunks(self, chunks) -> WorkerChunks:
    """The step's chunks ``[N, ...]`` laid out per worker (:meth:`WorkerLayout.shard_chunks`)."""
    return self.layout.shard_chunks(chunks)

  # -- where parameters live ---------------------------------------------------
  def placement(self, params) -> Placement:
    """The :class:`~jaxgc.backends.spmd.sharding.Placement` of ``params`` (arrays or shapes)
    on the mesh: the FSDP rule, or ``param_sharding``. ``placement(p).summary()`` lists it."""
    return _placement.placement(self.place, params)

  def state_sharding(self, state: TrainState):
    """A :class:`TrainState` of ``NamedSharding``s: parameters and optimizer state as
    :meth:`placement` puts them, everything else replicated (``P()``)."""
    return _placement.state_sharding(self.place, state, self.tx)

  # -- PS side: the plan (jaxgc.backends.spmd.lookahead) --------------------------
  def init_straggler_state(self, key):
    """The straggler model's state before step 0 (``key``: the base key)."""
    return self.lookahead.init_straggler_state(key)

  def init_adaptive_state(self):
    """The adaptive PS's state before step 0 (the static placement); ``()`` without a PS."""
    return self.lookahead.init_adaptive_state()

  def plan_step(self, key, step=0, straggler_state=None, adaptive_state=None, params=None):
    """``(plan, straggler_state, adaptive_state)``: the :class:`Plan` of step ``step`` and
    the straggler model's and the adaptive PS's states after it.

    ``key`` is the base key (step ``s`` draws from ``fold_in(key, s)``);
    ``straggler_state`` and ``adaptive_state`` are the states before step
    ``step`` (default: the initial ones). ``params`` (or their shapes): the
    gradient's size, which an ``ℓ`` chosen per step weighs (PROTOCOL.md §14).
    """
    return self.lookahead.plan_step(key, step, straggler_state, adaptive_state,
                                    _grad_size(params))

  def init_state(self, params, key, model_state=()) -> TrainState:
    """A fresh :class:`TrainState` whose first step is already planned, its parameters
    and optimizer state placed (:meth:`placement`; sharded over ``model`` on a 2-D mesh).

    ``model_state``: the model's untrained variables (e.g. ``{"batch_stats": ...}``).
    """
    tx = self._need_tx("init_state")
    plan, straggler_state, adaptive_state = self._first_plan(key, _grad_size(params))
    place = self.placement(params)
    params = place.place(params) if place.sharded else params
    state = TrainState.create(params, tx, plan=plan, straggler_state=straggler_state,
                              adaptive_state=adaptive_state, model_state=model_state)
    return _placement.keep_placed(self.place, state, tx)

  def _first_plan(self, key, grad):
    """:meth:`plan_step` of step 0 as one compiled program.

    Run eagerly, its many small operations (the draw, the stop rule, the state) would
    each compile: seconds in a fresh process, against a fraction of one for this.
    """
    if self._first_plan_jit is None:
      self._first_plan_jit = jax.jit(
          lambda key, grad: self.lookahead.plan_step(key, 0, None, None, grad),
          static_argnums=1)
    return self._first_plan_jit(key, grad)

  _first_plan_jit: Callable | None = None

  def _need_tx(self, what: str) -> optax.GradientTransformation:
    """The optimizer; a ``ValueError`` naming ``what`` when the step was built without one."""
    if self.tx is None:
      raise ValueError(f"{what} applies an optimizer, but this step was built with tx=None; "
                       "pass tx (any optax.GradientTransformation) to make_coded_step, or "
                       "use gradient() / jaxgc.coded_value_and_grad and your own update.")
    return self.tx

  # -- the step's interface ---------------------------------------------------------
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
      and with ``has_aux`` the chunks' ``aux`` (leaves ``[N, ...]``). With ``ℓ``
      chosen per step (a set of ``ell``, PROTOCOL.md §14): the chosen ``ell`` and
      the clairvoyant bound ``ell_oracle_time`` (deadline mode: ``ell_oracle_error``).
    """
    draw, _ = self.lookahead.draw(key, self.init_straggler_state(key),
                                  self.init_adaptive_state())
    g, metrics, _ = sharded_gradient(self.spec, params, self.layout.worker_chunks(chunks),
                                     self.lookahead.plan(draw[0], draw[1], draw[2],
                                                         grad=_grad_size(params)), None, key, args)
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
    check_key(key)
    worker_chunks = self.layout.worker_chunks(chunks)
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
          key, state.step, fresh(straggler_state), fresh(adaptive_state), state.params)
    next_draw, straggler_state = self.lookahead.draw(jax.random.fold_in(key, state.step + 1),
                                                     straggler_state, adaptive_state,
                                                     state.step + 1)
    observed = adaptive_state     # the PS's state once it has seen this step's counts
    g, metrics, (next_plan, adaptive_state) = sharded_gradient(
        self.spec, state.params, worker_chunks, plan, (next_draw, adaptive_state),
        jax.random.fold_in(key, state.step), args)
    if self.adaptive is not None and self.adaptive.detector is not None:
      metrics["slow_workers"] = self.adaptive.slow_workers(observed)
    aux = metrics.pop("aux", ())
    model = {"model_state": _chunk_mean(state.model_state, aux)} if has_model_state else {}
    new, metrics = core.apply_step(state, g, metrics, tx, plan=next_plan,
                                   straggler_state=straggler_state,
                                   adaptive_state=adaptive_state, **model)
    return _placement.keep_placed(self.place, new, tx), metrics

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
                    param_sharding=None, fail_at=None,
                    message_dtype: str = "float32",
                    batch_axis_name: str | None = None) -> CodedStep:
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
    check_vma: ``shard_map``'s varying-axes check; ``False`` for a loss that binds its own
      axis (``vmap(axis_name=...)``, flax ``nn.vmap``) and does a collective over it,
      which that check refuses in JAX.
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
    message_dtype: the messages' precision on the wire (PROTOCOL.md §15,
      :mod:`jaxgc.precision`): ``"float32"`` (no cast), ``"bfloat16"`` or
      ``"int8"`` (one float32 scale per 256 numbers). Workers encode in float32, the PS
      decodes in float32; ``step_comm_time`` prices the real bytes.
    batch_axis_name: for a loss written for ``pmap`` (flax ``BatchNorm(axis_name="batch")``):
      the axis its collectives name, bound to each chunk alone (size 1), so a chunk's
      statistics are its own and the decode stays exact (PROTOCOL.md §12). A collective
      over any other axis is refused by name when the step is traced.
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
                   fail_at=fail_at, message_dtype=message_dtype,
                   batch_axis_name=batch_axis_name)


def _grad_size(params):
  """``(d, dtype)`` of a gradient like ``params`` (``None`` without them)."""
  if params is None:
    return None
  leaves = jax.tree.leaves(params)
  return (sum(int(np.prod(x.shape)) for x in leaves),
          jax.numpy.result_type(*(x.dtype for x in leaves)))


def check_batch_axis(name, mesh: Mesh) -> str | None:
  """``batch_axis_name``: ``None`` or a name that is not already one of the mesh's axes."""
  if name is None:
    return None
  if not isinstance(name, str) or not name:
    raise ParamError(f"batch_axis_name must be an axis name (a string such as 'batch', "
                     f"the one the model's collectives name) or None, got {name!r}.",
                     "batch_axis_name")
  if name in mesh.axis_names:
    raise ParamError(f"batch_axis_name={name!r} is already an axis of the mesh "
                     f"{tuple(mesh.axis_names)}; the step adds that axis itself (size 1, one "
                     f"chunk), so build the mesh without it (jaxgc.parallel.make_mesh).",
                     "batch_axis_name")
  return name

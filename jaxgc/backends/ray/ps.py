"""The parameter server: :class:`RayStep`, one coded step on Ray actors in real time.

The step runs in the phases of :mod:`jaxgc.backends.ray`: dispatch, watch,
round (with the erasure redo) and decode, each one method here; the update is
:meth:`RayStep.update`'s. The rules the SPMD step shares (work slots, the erasure
redo, the decode and skip rule, the metrics, the state's update) are
:mod:`jaxgc.backends.core`'s.
"""
from __future__ import annotations

import collections
import time
import uuid
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgc import faults as _faults
from jaxgc import precision as _precision
from jaxgc import protocols as _protocols
from jaxgc.backends import base as _backend
from jaxgc.backends import core
from jaxgc.backends.base import TrainState
from jaxgc.backends.chunk_rule import ChunkLoss, chunk_mean
from jaxgc.backends.ray import compute, messages
from jaxgc.backends.ray.chunk_aux import gather_aux
from jaxgc.backends.ray.kills import kill_scheduled
from jaxgc.backends.ray.liveness import ActorLiveness, call_each_live
from jaxgc.backends.ray.membership import Membership
from jaxgc.backends.ray.pool import WorkerPool, check_devices, device_options
from jaxgc.backends.ray.records import Seen, observed_durations, step_metrics
from jaxgc.backends.ray.watch import watch
from jaxgc.errors import ParamError

__all__ = ["RayStep"]


class RayStep:
  """A coded gradient step whose workers are Ray actors and whose PS is this process.

  The step interface of :class:`jaxgc.parallel.CodedStep` (``init_state``,
  ``update``, ``jit``), run on the host in real time; the phases are :mod:`jaxgc.backends.ray`'s.

  Args:
    protocol: a :mod:`jaxgc.protocols` protocol.
    straggler: a :mod:`jaxgc.timing` model; its durations become injected sleeps.
    loss_fn: ``loss(params, chunk, *args) -> scalar`` (``-> (loss, aux)`` with
      ``has_aux``), the SPMD step's contract (:mod:`jaxgc.backends.chunk_rule`): a
      keyword parameter ``rng`` gets the chunk's key (:func:`jaxgc.chunk_keys`).
    tx: an ``optax.GradientTransformation``.
    mode: ``"exact"`` or ``"deadline"``.
    deadline: ``T`` in simulated seconds (deadline mode): the PS stops at
      ``T · time_scale`` wall seconds after dispatch.
    timeout: exact mode, simulated seconds after which a step that cannot decode
      stops anyway (default: once nothing more can arrive).
    num_actors: Ray actors (ignored when ``pool`` is given).
    time_scale: wall seconds per simulated second of injected delay.
    address: Ray cluster to join; ``None`` starts a local instance.
    message_loss_prob: probability that a message is lost (injected, round 1).
    nan_message_prob: probability that a message arrives as NaN (injected, round 1).
    pool: a :class:`WorkerPool` to run on (shared, not closed by :meth:`close`).
    message_timeout: wall seconds to wait for messages; later ones are erased.
    keep_records: how many recent steps :attr:`records` keeps.
    fail_at: ``[(worker, step), ...]`` (:func:`jaxgc.faults.fault_schedule`): at the
      start of ``step`` the actor hosting ``worker`` is killed for real (so all of
      that actor's workers fail, until Ray has restarted it).
    report_condition: add ``condition_number`` (the final solve's) to the metrics
      where the protocol reports one, as the SPMD step does.
    message_dtype: the messages' precision on the wire (PROTOCOL.md §15,
      :mod:`jaxgc.precision`): ``"float32"``, ``"bfloat16"`` or ``"int8"``.
      The actors encode in float32 and send the cast message; the PS decodes in float32.
    has_aux: the loss returns ``(loss, aux)``; with a ``model_state`` in the state, ``aux``
      is the chunk's new model state and the next is the mean over the chunks that
      arrived (ghost batch norm, as :meth:`jaxgc.parallel.CodedStep.update`).
    adaptive: a :class:`jaxgc.adaptive.AdaptivePS` of ``protocol``: logical worker
      ``j``'s list runs on the actor of physical worker ``perm[j]`` with its injected
      durations, and the PS observes the state it saw (counts, and the stop in simulated
      seconds: wall seconds / ``time_scale``) to place the next step; its state is
      ``TrainState.adaptive_state``. ``None``: the static placement.
    num_spares: hot spares (:mod:`jaxgc.backends.ray.membership`): warm actors, one of
      which takes over a dead actor's workers at the next step (ignored with ``pool``:
      the pool's own).
    max_restarts: restarts Ray gives each actor (``None``: no limit; ignored with ``pool``).
    reform_protocol: ``assignment -> protocol`` for the re-formed code when the
      membership changes (PROTOCOL.md §16); default the same protocol class and ``ℓ``
      (at most the new load) with default options. A re-form drops ``adaptive``.
    model: each worker is a group of ``model`` devices of its actor, on a local
      ``workers × model`` mesh with the SPMD step's FSDP placement
      (:func:`jaxgc.parallel.place_params`): a CPU actor starts with ``model`` host
      devices, a GPU one (the PS's JAX runs on GPU) asks Ray for ``num_gpus=model``.
      With ``pool``, the pool's actors must have them.

  Attributes:
    liveness: the PS's :class:`jaxgc.backends.ray.ActorLiveness`; its ``restarts``
      lists each actor outage and how many steps and seconds it cost.
    membership: the :class:`jaxgc.backends.ray.membership.Membership`: epoch, spares
      and each re-form (:attr:`reforms`).
  """

  # A jaxgc.backends.StepBackend that runs on the host: no trace, host chunks, host params.
  traced = False
  layout = None

  def __init__(self, protocol, straggler, loss_fn: Callable, tx: optax.GradientTransformation, *,
               mode: str = "exact", deadline: float | None = None, timeout: float | None = None,
               num_actors: int = 4, time_scale: float = 0.01, address: str | None = None,
               message_loss_prob: float = 0.0, nan_message_prob: float = 0.0,
               pool: WorkerPool | None = None, message_timeout: float = 60.0,
               keep_records: int = 1000, fail_at=None, report_condition: bool = True,
               message_dtype: str = "float32", has_aux: bool = False, adaptive=None,
               num_spares: int = 0, max_restarts: int | None = None,
               reform_protocol: Callable | None = None, model: int = 1):
    _backend.check_step_args(protocol, mode, deadline, timeout, message_loss_prob,
                             nan_message_prob)
    _backend.check_straggler(straggler)
    self.chunk_loss = ChunkLoss(loss_fn, has_aux)
    self.has_aux = has_aux
    if getattr(protocol, "ells", None) is not None:
      raise ParamError(f"protocol: an ell chosen per step from {protocol.ells} runs on the spmd "
                       "backend only; give the Ray step one ell (PartialStraggler(assignment, "
                       "ell=2)).", "protocol")
    _backend.check_adaptive(adaptive, protocol)
    self.adaptive = adaptive
    # The PS's placement and observation, jitted once (used only with an adaptive PS).
    self._placement: Any = None if adaptive is None else jax.jit(adaptive.placement)
    self._observe: Any = None if adaptive is None else jax.jit(adaptive.observe)
    if not np.isfinite(time_scale) or time_scale <= 0:
      raise ParamError(f"time_scale must be positive (wall seconds per simulated second), got "
                       f"{time_scale!r}; pass e.g. time_scale=0.01.", "time_scale")
    self.protocol, self.assignment = protocol, protocol.assignment
    self.straggler, self.loss_fn, self.tx = straggler, loss_fn, tx
    self.mode = mode
    self.deadline = None if deadline is None else float(deadline)
    self.timeout = None if timeout is None else float(timeout)
    self.time_scale = float(time_scale)
    self.message_loss_prob = float(message_loss_prob)
    self.nan_message_prob = float(nan_message_prob)
    self.message_timeout = float(message_timeout)
    self.message_dtype = _precision.check_message_dtype(message_dtype)
    self.slots = core.work_slots(protocol)
    self.faults = _faults.fault_schedule(fail_at, protocol.assignment.num_workers)
    self.report_condition = bool(report_condition) and protocol.reports_condition
    self.closed = False
    if not isinstance(model, (int, np.integer)) or isinstance(model, bool) or model < 1:
      raise ParamError(f"model must be a positive integer (devices per worker), got {model!r}; "
                       "set --config.mesh.model.", "model")
    self.model = int(model)
    self.owns_pool = pool is None
    self.pool = WorkerPool(num_actors, address=address, num_spares=num_spares,
                           max_restarts=max_restarts, **device_options(self.model)
                           ) if pool is None else pool
    self.ray = self.pool.ray
    check_devices(self.pool, self.model)
    self.token, self.setup = self.pool.program(loss_fn)
    self.key = uuid.uuid4().hex
    self.records: collections.deque = collections.deque(maxlen=keep_records)
    self.last_record: dict | None = None
    self._warm = False
    self._straggler_state = None
    self._coefficients, self._complete, self._finish = compute.ps_functions(protocol)
    self.liveness = ActorLiveness(self.ray, self.pool.actors)
    self._fail_pairs = self.faults.pairs      # fail_at as given, for a re-formed code
    self._warm_call: Callable | None = None
    self.reform_protocol = reform_protocol or (lambda a: _protocols.get_protocol(
        protocol.name, a, min(protocol.ell, int(a.replication.min()))))
    self.membership = Membership(self, lambda h: None if self._warm_call is None
                                 else self._warm_call(h))

  def set_protocol(self, protocol) -> None:
    """Runs ``protocol`` (a re-formed code, PROTOCOL.md §16) from the next step on.

    Its programs compile at the next step's warm-up; ``fail_at`` keeps the workers that
    still exist; an adaptive placement (made for the old assignment) is dropped.
    """
    self.protocol, self.assignment = protocol, protocol.assignment
    m = protocol.assignment.num_workers
    self.slots = core.work_slots(protocol)
    self.faults = _faults.fault_schedule([(j, s) for j, s in self._fail_pairs if j < m], m)
    self.report_condition = self.report_condition and protocol.reports_condition
    self._coefficients, self._complete, self._finish = compute.ps_functions(protocol)
    self.adaptive = self._placement = self._observe = None
    self._warm = False

  def _check_open(self):
    if self.closed:
      raise ValueError("this RayStep is closed (its actors are gone); make a new one.")

  # -- state ------------------------------------------------------------------------
  def init_state(self, params, key, model_state=()) -> TrainState:
    """A fresh :class:`jaxgc.parallel.TrainState` (``plan`` unused: the PS plans in real time).

    ``model_state``: the model's untrained variables (e.g. ``{"batch_stats": ...}``).
    """
    state = TrainState.create(params, self.tx, model_state=model_state, adaptive_state=(
        () if self.adaptive is None else self.adaptive.init()))
    s0 = _backend.init_straggler_state(self.straggler, key, self.assignment.num_workers)
    if hasattr(state, "straggler_state"):
      state = state.replace(straggler_state=s0)
    else:      # a TrainState without the field: the model's memory lives here
      self._straggler_state = s0
    return state

  def warmup(self, params, chunks, straggler_state=None, args=(), model_state=()):
    """Compiles every actor's programs and the PS's, outside any step's clock.

    The first :meth:`update` or :meth:`gradient` calls it; call it earlier to
    keep compilation out of a measurement. Waits for restarting actors. ``args``:
    the loss's extra arguments (``model_state`` first, when the state has one).
    """
    self._check_open()
    host = jax.device_get(params)
    d = sum(int(np.size(x)) for x in jax.tree.leaves(host))
    if jax.tree.leaves(model_state):
      args = (model_state,) + tuple(args)
    self._warmup(self.ray.put(host), jax.tree.map(np.asarray, jax.device_get(chunks)), d,
                 jax.random.key(0), args)
    straggler_state = () if straggler_state is None else straggler_state
    adaptive_state = () if self.adaptive is None else self.adaptive.init()
    perm = None if self.adaptive is None else self._placement(adaptive_state)
    compute.draw(self.protocol, self.straggler, self.mode, self.deadline, self.timeout,
                 self.message_loss_prob, self.nan_message_prob, jax.random.key(0),
                 straggler_state, perm)
    state = TrainState.create(params, self.tx, straggler_state=straggler_state,
                              model_state=model_state, adaptive_state=adaptive_state)
    compute.apply_update(self.tx, state, np.zeros(d, np.float32),
                         _outcome(False, False, 0, 0.0),
                         self._fields(state, model_state, adaptive_state))

  def _fields(self, state, model_state, adaptive_state) -> dict:
    """The state fields an update replaces beyond the parameters (:func:`apply_update`)."""
    fields = {}
    if jax.tree.leaves(state.model_state):
      fields["model_state"] = model_state
    if self.adaptive is not None:
      fields["adaptive_state"] = adaptive_state
    return fields

  def _warmup(self, params_ref, chunks, d, step_key, args=()):
    """Each actor compiles on one chunk (restarting: waited for; dead: skipped), then the PS."""
    ray, a = self.ray, self.assignment
    one = jax.tree.map(lambda x: np.asarray(x[0]), chunks)
    keys = self._keys(step_key)
    args_ref = self.ray.put(jax.device_get(tuple(args)))
    def warm(h):     # also a spare's (or a joining actor's) warm-up, later
      return h.warmup.remote(self.token, self.setup, params_ref, one, a.max_load,
                             self.protocol.ell, self.message_dtype, self.has_aux, keys,
                             args_ref, self.model)

    call_each_live(ray, self.pool.actors, warm, self.pool.startup_timeout)
    counts = np.asarray(a.loads, np.int32)
    never = np.full((a.num_workers, a.max_load), np.inf, np.float32)
    enc, dec, condition = (np.asarray(x) for x in self._coefficients(jnp.asarray(counts)))
    msgs = np.zeros((a.num_workers, _protocols.base.num_blocks(d, self.protocol.ell)),
                    np.float32)
    jax.block_until_ready((self._complete(never), self._finish(
        msgs, dec, counts, np.any(enc != 0, axis=(1, 2)), float(condition), 0, False, d,
        self.report_condition)))
    # A spare (or a joining actor) compiles the same programs when it can.
    self._warm_call = warm
    self.membership.warm_spares(self.pool.startup_timeout)
    self._warm = True

  def gradient(self, params, chunks, key, *args, step: int = 0, straggler_state=None):
    """Runs the workers and the PS for one step: ``(ĝ as a pytree, metrics)``.

    Step ``step`` of base key ``key`` (it draws from ``fold_in(key, step)``, as
    :meth:`update`); ``args`` go to the loss after the chunk, the same on every
    worker. ``ĝ`` may be NaN only when ``metrics['skipped']``. With ``has_aux``,
    ``metrics["aux"]`` has leaves ``[N, ...]`` and ``metrics["aux_chunks"]`` bool ``[N]``
    marks the chunks whose ``aux`` arrived (zeros elsewhere). The step's record goes
    to :attr:`last_record` and :attr:`records`.
    """
    g, metrics, _ = self._gradient(params, chunks, jax.random.fold_in(key, step), step,
                                   straggler_state, args)
    return compute.unravel(params, g), metrics

  def _keys(self, step_key):
    """The chunks' keys as the actors take them, ``None`` for a loss without ``rng``."""
    if not self.chunk_loss.uses_rng:
      return None
    return compute.chunk_key_data(step_key, self.assignment.num_chunks)

  def _gradient(self, params, chunks, step_key, step, straggler_state, args=(),
                adaptive_state=None):
    """One step in the phases of the module docstring: ``(g [d], metrics, straggler_state)``.

    ``step_key``: the step's own key (durations, faults, the chunks' keys).
    """
    self._check_open()
    wall0 = time.perf_counter()
    # The step boundary: fail_at's kills, then takeovers by spares and re-forms.
    injected = kill_scheduled(self.liveness, self.faults, step)
    if self.membership.boundary(step):   # re-formed: the model's memory starts over for m'
      straggler_state = _backend.init_straggler_state(self.straggler, step_key,
                                                      self.assignment.num_workers)
    perm = (None if self.adaptive is None else np.asarray(self._placement(
        self.adaptive.init() if adaptive_state is None else adaptive_state)))
    tau, lost, corrupt, sim_stop, straggler_state = compute.draw(
        self.protocol, self.straggler, self.mode, self.deadline, self.timeout,
        self.message_loss_prob, self.nan_message_prob, step_key,
        () if straggler_state is None else straggler_state, perm)
    tau, lost, corrupt = np.asarray(tau, np.float64), np.asarray(lost), np.asarray(corrupt)
    host_params = jax.device_get(params)
    d = sum(int(np.size(x)) for x in jax.tree.leaves(host_params))
    chunks = jax.tree.map(np.asarray, jax.device_get(chunks))
    params_ref = self.ray.put(host_params)
    keys, args_ref = self._keys(step_key), self.ray.put(jax.device_get(tuple(args)))
    if not self._warm:
      self._warmup(params_ref, chunks, d, step_key, args)
      wall0 = time.perf_counter()
    a0 = time.perf_counter()
    alive = self.liveness.wait_alive(step, self.message_timeout)
    alive_wait = time.perf_counter() - a0
    t0, gens, workers_of = self._dispatch(step, tau, chunks, params_ref, alive, keys, args_ref,
                                          perm)
    seen = self._watch(step, gens, workers_of, t0, alive)
    rounds = messages.rounds(self.pool, self.liveness, self.key, step, self._coefficients, seen,
                             workers_of, lost, corrupt, d, self.protocol.ell,
                             timeout=self.message_timeout, message_dtype=self.message_dtype)
    g, metrics = self._decode(seen, rounds, d)
    if self.has_aux:
      metrics["aux"], metrics["aux_chunks"] = gather_aux(
          self.pool, self.key, step, self.assignment, self.slots, seen, workers_of,
          self.message_timeout)
    metrics.update(step_sim_time=float(sim_stop), faults_injected=injected,
                   alive_wait_s=alive_wait,
                   live_workers=self.assignment.num_workers - metrics["dead_workers"],
                   membership_epoch=self.membership.epoch)
    self.last_record = {
        "step": int(step), "time_scale": self.time_scale, "durations": tau,
        "lost": lost, "corrupt": corrupt,
        "finish_wall": seen.finish, "chunk_wall": seen.chunk_s, "compute_wall": seen.compute_s,
        "worker_wall": seen.worker_t, "counts_observed": seen.observed, "counts": rounds.counts,
        "stop_wall": seen.stop_wall, "sim_stop": float(sim_stop), "erased": seen.erased,
        "dead": seen.dead, "dispatch_s": t0 - wall0, "message_bytes": rounds.nbytes,
        "transfer_s": rounds.transfer_s,
    }
    self.records.append(self.last_record)
    return g, metrics, straggler_state

  def _dispatch(self, step, tau, chunks, params_ref, alive, keys=None, args_ref=(), perm=None):
    """Phase 1: each live actor gets its workers' lists, sleeps, chunks and the parameters
    (and the chunks' keys ``keys``, the loss's extra arguments ``args_ref``).

    Returns ``(t0, {generator: actor}, workers_of)``; ``workers_of[h]`` lists actor
    ``h``'s workers (worker ``j`` on actor ``j mod num_actors``; with an adaptive
    placement ``perm``, logical worker ``j`` on the actor of physical worker ``perm[j]``).
    """
    workers_of, shares = compute.actor_work(self.assignment, self.slots,
                                            tau * self.time_scale, len(self.pool.actors), perm)
    gens = {}
    t0 = time.perf_counter()
    for h, actor in enumerate(self.pool.actors):
      if not alive[h]:
        continue
      ids, work = shares[h]
      sub = jax.tree.map(lambda x, ids=ids: x[ids], chunks)
      sub_keys = None if keys is None else (keys[0][ids], keys[1])
      gen = actor.run.options(num_returns="streaming").remote(
          self.token, self.setup, self.key, step, params_ref, sub, work,
          self.assignment.max_load, self.has_aux, sub_keys, args_ref, self.model)
      gens[gen] = h
    return t0, gens, workers_of

  def _watch(self, step, gens, workers_of, t0, alive) -> Seen:
    """Phase 2: reports as they come; stop at completion, the deadline or nothing left."""
    if self.mode == "deadline":
      assert self.deadline is not None     # __init__ requires one in deadline mode
      limit = self.deadline * self.time_scale
    else:
      # The timeout is simulated seconds of injected delay; the workers' real compute
      # comes on top (it dominates at a small time_scale), so the PS waits
      # message_timeout more wall seconds before giving up on a step.
      limit = np.inf if self.timeout is None else (self.timeout * self.time_scale
                                                   + self.message_timeout)
    return watch(self.pool, self.liveness, self.assignment, self.slots, self._complete, step,
                 gens, workers_of, t0, alive, limit)

  def _decode(self, seen, rounds, d):
    """Phase 5 (the update is :meth:`update`'s): ``(g [d], metrics)`` from the messages:
    the decode and :func:`jaxgc.backends.core.step_outcome`, in one jitted call."""
    g, outcome = self._finish(rounds.msgs, rounds.dec, rounds.counts, rounds.senders,
                              rounds.condition, int(seen.erased.sum()), rounds.failed_again, d,
                              self.report_condition)
    return np.asarray(g), step_metrics(outcome, seen, rounds, self.assignment.num_chunks)

  def update(self, state: TrainState, chunks, key, *args):
    """One optimizer step: ``(new_state, metrics)``; never writes NaN into the parameters.

    As :meth:`jaxgc.parallel.CodedStep.update`: the loss gets ``state.model_state``
    (when it has one) and then ``args`` after the chunk, and
    ``rng=chunk_keys(fold_in(key, step), N)[i]`` when it takes ``rng``; with a model
    state the loss must have ``has_aux`` and return its chunk's new model state.

    Args:
      state: from :meth:`init_state`.
      chunks: pytree with leaves ``[N, chunk_batch, ...]`` (host or JAX arrays).
      key: the *base* key; step ``s`` draws from ``fold_in(key, s)``, so a run is a
        function of ``(key, data)`` and resumes exactly from a checkpoint.
    """
    model_state = getattr(state, "model_state", ())
    has_model_state = bool(jax.tree.leaves(model_state))
    if has_model_state and not self.has_aux:
      raise ParamError("the state has a model_state, so the loss must return (loss, "
                       "new_model_state) and the step be built with has_aux=True.", "has_aux")
    if not self._warm:
      self.warmup(state.params, chunks, getattr(state, "straggler_state", self._straggler_state),
                  args, model_state)
    wall0 = time.perf_counter()
    step = int(state.step)
    s_state = getattr(state, "straggler_state", self._straggler_state)
    a_state = getattr(state, "adaptive_state", ()) if self.adaptive is not None else None
    if a_state == ():      # a state made without this PS (TrainState.create)
      a_state = self.adaptive.init()
    loss_args = ((model_state,) if has_model_state else ()) + tuple(args)
    g, metrics, s_state = self._gradient(state.params, chunks, jax.random.fold_in(key, step),
                                         step, s_state, loss_args, a_state)
    new_model_state = model_state
    aux, have = metrics.pop("aux", None), metrics.pop("aux_chunks", None)
    if has_model_state and aux is not None:     # ghost batch norm over the chunks that arrived
      new_model_state = chunk_mean(model_state, jax.tree.map(lambda x: x[have], aux))
    if self.adaptive is not None:
      # The PS learns from what it saw: the counts at its stop and each report's arrival,
      # in simulated seconds, so a worker that finished its list early is not censored.
      rec = self.last_record or {}
      a_state = self._observe(a_state, np.asarray(rec["counts_observed"], np.int32),
                              np.float32(rec["stop_wall"] / self.time_scale),
                              observed_durations(rec, self.assignment.slot_mask))
      if self.adaptive.detector is not None:
        metrics["slow_workers"] = np.asarray(self.adaptive.slow_workers(a_state))
    new, tail = compute.apply_update(self.tx, state, g, _outcome(
        metrics["skipped"], metrics["exact"], metrics["erasures"], metrics["step_sim_time"]),
        self._fields(state, new_model_state, a_state))
    if hasattr(state, "straggler_state"):
      new = new.replace(straggler_state=s_state)
    else:
      self._straggler_state = s_state
    metrics = dict(metrics, skipped=bool(tail["skipped"]), exact=bool(tail["exact"]),
                   sim_time=float(tail["sim_time"]), wall_time=time.perf_counter() - wall0)
    return new, metrics

  def jit(self, donate: bool = False):
    """``update`` itself: the PS runs on the host in real time, there is nothing to trace."""
    del donate
    return self.update

  def placement(self, params) -> None:
    """``None``: the parameters live on the PS host (each actor gets a copy per step)."""
    del params

  def state_sharding(self, state) -> None:
    """``None``: the state is the PS's, on the host; the caller places it as it likes."""
    del state

  @property
  def restarts(self) -> list:
    """Every actor outage seen so far (:class:`jaxgc.backends.ray.Restart`)."""
    return self.liveness.restarts

  @property
  def reforms(self) -> list[dict]:
    """Each re-form so far: step, epoch, ``m`` and actors before and after, load, why."""
    return [r.as_dict() for r in self.membership.reforms]

  @property
  def membership_record(self) -> dict:
    """The membership a checkpoint keeps (:meth:`resume_membership` reads it back)."""
    return self.membership.record()

  def resume_membership(self, saved: dict, step: int) -> None:
    """Continues a checkpoint's membership; re-forms at once on another cluster size."""
    self.membership.resume(saved, step)

  def close(self):
    """Stops the actors (unless the pool was passed in) and a Ray instance this step started.

    The step cannot run afterwards; :attr:`pool` stays, closed if this step owned it.
    """
    if self.owns_pool and not self.closed:
      self.pool.close()
    self.closed = True

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _outcome(skipped: bool, exact: bool, erasures: int, step_sim_time: float) -> dict:
  """What :func:`~jaxgc.backends.ray.compute.apply_update` needs of a step's metrics, as
  NumPy scalars of fixed dtypes (so the warm-up's compile is the steps')."""
  return {"skipped": np.bool_(skipped), "exact": np.bool_(exact),
          "erasures": np.int32(erasures), "step_sim_time": np.float32(step_sim_time)}

"""The PS's look-ahead in an SPMD step: a step's draw, stop time, state and coefficient solve.

A step's :class:`Plan` needs its key (and the straggler model's and the adaptive
PS's states) only, never gradients, so the step makes it one step ahead, on one
device, while the others compute gradients (PROTOCOL.md §6):

1. :meth:`Lookahead.draw`: durations ``τ [m, max_load]`` and message faults from
   the step's key (:func:`jaxgc.backends.base.draw_step`), the fault schedule,
   the adaptive PS's placement;
2. :meth:`Lookahead.plan`: the stop time (:func:`jaxgc.protocols.stop_time`), the
   state ``k = progress(τ, stop)`` and the :class:`Solve` at ``k``;
3. :meth:`Lookahead.plan_observed`: the adaptive PS observes ``k``.

With ``ℓ`` chosen per step (a :class:`jaxgc.protocols.DynamicEll`, PROTOCOL.md §14),
step 2's stop time and ``ℓ`` come from :func:`jaxgc.protocols.choose_ell` (it needs
the messages' cost, so the gradient's size ``d``), and the :class:`Solve` is the
chosen member's, padded to the largest ``ℓ``.

:class:`Plan` and :class:`Solve` are what :attr:`jaxgc.backends.base.TrainState.plan`
holds (and checkpoints keep).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxgc import adaptive as _adaptive
from jaxgc import faults as _faults
from jaxgc import network as _network
from jaxgc import protocols as _protocols
from jaxgc import timing
from jaxgc.backends import base as _backend
from jaxgc.backends import core
from jaxgc.backends.spmd.layout import WorkerLayout

__all__ = ["Solve", "Plan", "Lookahead"]


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

  @property
  def coverage(self) -> core.Coverage:
    """The state's :class:`~jaxgc.backends.core.Coverage` (computed with the solve)."""
    return core.Coverage(self.decodable, self.min_coverage, self.chunks_below_ell)


class Plan(NamedTuple):
  """The PS's plan of one step, made from the key and straggler state alone.

  Attributes:
    stop: float32 ``[]``, simulated stop time (the step's simulated duration).
    counts: int32 ``[m]``, the state ``k`` at ``stop``.
    lost: bool ``[m_pad]``, messages lost in transit.
    corrupt: bool ``[m_pad]``, messages that arrive non-finite.
    solve: the :class:`Solve` at ``counts``.
    choice: with ``ℓ`` chosen per step, the :class:`jaxgc.protocols.EllChoice` (its
      ``member`` picks the ``ℓ``; ``solve`` is that member's, padded to the largest
      ``ℓ``); ``None`` otherwise (no leaf: static plans keep their structure).
  """
  stop: jax.Array
  counts: jax.Array
  lost: jax.Array
  corrupt: jax.Array
  solve: Solve
  choice: Any = None


class Lookahead(NamedTuple):
  """What a step's plan depends on, fixed when the step is built: the protocol, the
  straggler model, the stop rule, the injected faults and the adaptive PS.

  Attributes:
    layout: the step's :class:`~jaxgc.backends.spmd.layout.WorkerLayout` (``m_pad``,
      ``slots``: the plan is padded to it).
    fail_at: a checked :class:`jaxgc.faults.FaultSchedule`.
    adaptive: a :class:`jaxgc.adaptive.AdaptivePS`, or ``None`` (static placement).
    network: the messages' cost model (dynamic ``ℓ`` only: the rule weighs it).
    message_dtype: the messages' precision on the wire (dynamic ``ℓ`` only).
  """
  protocol: Any
  straggler: Any
  layout: WorkerLayout
  mode: str
  deadline: float | None
  timeout: float | None
  message_loss_prob: float
  nan_message_prob: float
  fail_at: _faults.FaultSchedule
  adaptive: _adaptive.AdaptivePS | None
  network: _network.Network | None = None
  message_dtype: str = "float32"

  @property
  def dynamic(self) -> bool:
    """Whether ``ℓ`` is chosen per step (the protocol is a :class:`~jaxgc.protocols.DynamicEll`)."""
    return isinstance(self.protocol, _protocols.DynamicEll)

  def member(self, index: int) -> Lookahead:
    """This look-ahead with the protocol of the ``index``-th ``ℓ`` (static)."""
    return self._replace(protocol=self.protocol.members[index])

  def solve(self, counts, index=None) -> Solve:
    """The coefficients at state ``counts`` ``[m]``, padded to ``m_pad`` workers and the
    layout's ``slots``; with ``ℓ`` chosen per step, member ``index``'s (``[]`` int32,
    traced: one solve runs), padded to the largest ``ℓ``."""
    if self.dynamic:
      top = max(self.protocol.ells)
      def one(k):
        s = self.member(k).solve(counts)
        grow = top - self.protocol.ells[k]
        return s._replace(enc=jnp.pad(s.enc, ((0, 0), (0, 0), (0, grow))),
                          dec=jnp.pad(s.dec, ((0, grow), (0, 0))))
      branches = [lambda k=k: one(k) for k in range(len(self.protocol.ells))]
      return jax.lax.switch(index, branches)
    lay, proto = self.layout, self.protocol
    c = proto.solve(counts)
    cov = core.coverage(proto, counts)
    pad = lambda x, axis: jnp.pad(x, [(0, lay.m_pad - lay.m) if i == axis else (0, 0)
                                      for i in range(x.ndim)])
    return Solve(enc=pad(c.enc, 0)[:, : lay.slots], dec=pad(c.dec, 1),
                 senders=pad(c.senders, 0), condition=jnp.asarray(c.condition, jnp.float32),
                 decodable=cov.decodable, min_coverage=cov.min_coverage,
                 chunks_below_ell=cov.chunks_below_ell)

  def draw(self, key, straggler_state, adaptive_state=(), step=None):
    """The cheap random part of a plan: ``((τ [m, max_load], lost [m_pad], corrupt [m_pad]),
    the model's next state)``.

    With an adaptive PS the durations are the logical workers' (placed by
    ``adaptive_state``'s placement). ``step``: the step's index, for the fault
    schedule (a failed worker's durations are ``+inf``); ``None``: no schedule.
    """
    assignment = self.protocol.assignment
    durations, lost, corrupt, straggler_state = _backend.draw_step(
        self.straggler, assignment, key, straggler_state, self.message_loss_prob,
        self.nan_message_prob)
    if step is not None and self.fail_at.pairs:
      # Physical workers fail (before any placement), as the Ray backend's killed actors do.
      failed = _faults.mask(self.fail_at, step, assignment.num_workers)
      durations = jnp.where(failed[:, None], jnp.inf, durations)
    if self.adaptive is not None:
      durations = _adaptive.apply_placement(durations, self.adaptive.placement(adaptive_state),
                                            assignment)
    # Drawn for the m real workers, then padded: the same draws on any device count
    # (and on the Ray backend), so num_devices does not change results.
    pad = lambda x: jnp.pad(x, (0, self.layout.m_pad - self.layout.m))
    return (durations, pad(lost), pad(corrupt)), straggler_state

  def plan(self, durations, lost, corrupt, grad=None) -> Plan:
    """The costly part: the stop rule, the state and the solve.

    ``grad``: ``(d, dtype)`` of the gradient, which dynamic ``ℓ`` needs (the messages'
    cost enters its rule); unused otherwise.
    """
    if self.dynamic:
      return self._plan_dynamic(durations, lost, corrupt, grad)
    stop = _protocols.stop_time(self.protocol, durations, self.mode, self.deadline, self.timeout)
    counts = timing.progress(durations, stop)
    return Plan(jnp.asarray(stop, jnp.float32), counts, lost, corrupt, self.solve(counts))

  def _plan_dynamic(self, durations, lost, corrupt, grad) -> Plan:
    """:func:`jaxgc.protocols.choose_ell`'s stop and ``ℓ``, and that member's solve."""
    if grad is None:
      raise ValueError("ell is a set: the PS's choice weighs the messages' cost, so the plan "
                       "needs the gradient's size; plan with grad=(d, dtype).")
    d, dtype = grad
    proto = self.protocol
    comm = _protocols.dynamic_ell.comm_model(self.network, proto, d, dtype, self.message_dtype)
    scenarios = _protocols.dynamic_ell.scenarios_of(self.straggler, proto.assignment)
    choice = _protocols.choose_ell(proto, durations, scenarios, comm, self.mode, self.deadline,
                                   self.timeout)
    counts = timing.progress(durations, choice.stop)
    return Plan(choice.stop, counts, lost, corrupt, self.solve(counts, choice.member), choice)

  def plan_observed(self, draw, adaptive_state, grad=None):
    """``(plan, adaptive_state)``: the plan, then the adaptive PS's observation of its state.

    The PS observes the counts before any erasure zeroes them: an erased message
    says nothing about its worker's speed. It also has each finished chunk's arrival
    (PROTOCOL.md §1), so a worker that ran out of work before the stop is timed by
    its last finish (:func:`jaxgc.adaptive.busy_times` reads nothing later than the
    stop). ``grad``: as :meth:`plan`.
    """
    durations, lost, corrupt = draw
    plan = self.plan(durations, lost, corrupt, grad=grad)
    if self.adaptive is not None:
      adaptive_state = self.adaptive.observe(adaptive_state, plan.counts, plan.stop, durations)
    return plan, adaptive_state

  def init_straggler_state(self, key):
    """The straggler model's state before step 0 (``key``: the base key)."""
    return _backend.init_straggler_state(self.straggler, key,
                                         self.protocol.assignment.num_workers)

  def init_adaptive_state(self):
    """The adaptive PS's state before step 0 (the static placement); ``()`` without a PS."""
    return () if self.adaptive is None else self.adaptive.init()

  def plan_step(self, key, step=0, straggler_state=None, adaptive_state=None, grad=None):
    """``(plan, straggler_state, adaptive_state)``: the :class:`Plan` of step ``step`` and
    the model's and the PS's states after it.

    ``key`` is the base key (step ``s`` draws from ``fold_in(key, s)``);
    ``straggler_state`` and ``adaptive_state`` are the states before step
    ``step`` (default: the initial ones). ``grad``: as :meth:`plan`.
    """
    if straggler_state is None:
      straggler_state = self.init_straggler_state(key)
    if adaptive_state is None:
      adaptive_state = self.init_adaptive_state()
    draw, straggler_state = self.draw(jax.random.fold_in(key, step), straggler_state,
                                      adaptive_state, step)
    plan, adaptive_state = self.plan_observed(draw, adaptive_state, grad)
    return plan, straggler_state, adaptive_state

"""``ℓ`` chosen each step from a set ``L`` (PROTOCOL.md §14): the rule of a
:class:`~jaxgc.protocols.DynamicEll` (the class lives in :mod:`jaxgc.protocols.partial_straggler`).

The message length is fixed only when the PS sends the coefficients, so the PS may
pick, per step, any ``ℓ ∈ L`` that the state allows. ``PartialStraggler(assignment,
ell=(1, 2, 4))`` builds a ``DynamicEll``: one ``PartialStraggler`` per
``ℓ`` (its own decoding matrix ``A_ℓ``), and :func:`choose_ell`, the causal rule.

Exact mode. ``T_ℓ`` is the first time with ``min_i c_i ≥ ℓ``. At each such time
``t`` the PS knows the state ``k(t)`` and the finish times so far, and nothing of
the durations still to come. It stops with the attained ``ℓ`` of least
``comm_ℓ(S(t))`` unless some larger ``ℓ'`` has an expected
``E[T_ℓ' + comm_ℓ'(S) | k(t)] < t + comm_ℓ(S(t))``; then it waits for the next
``T``. The expectation is over :data:`SAMPLES` scenarios drawn once from the
straggler model (a fixed quadrature, the same every step) and conditioned on the
progress (:func:`conditioned_finish_times`): a worker's chunks still to come are
scaled by its observed pace against the scenario's, and its row is taken from a
scenario whose current chunk runs longer than the ``e_j`` it has already run. The
clairvoyant ``min_ℓ (T_ℓ + comm_ℓ(S(T_ℓ)))`` is reported as a bound
(``ell_oracle_time``), never used.

Deadline mode. The deadline ``T`` bounds the whole step: with ``ℓ`` the PS stops
computing at ``u_ℓ = T − comm_ℓ(m)`` (all ``m`` may send), or earlier at ``T_ℓ``
if that comes first (exact). At each ``u_ℓ`` in increasing order it stops with
``ℓ`` unless a later ``u_ℓ'`` has a smaller expected error
``(1/ℓ') Σ_i max(0, ℓ' − c_i)`` (section 2's formula per unit of ``σ² d``).

Cost per step: ``|L|`` decision points, each ``|L|·SAMPLES`` completion times of
``[m, max_load]`` finish times (top-k over each chunk's holders), all on the PS,
from the state it already has; no gradient and no message is involved.
"""
from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxgc import timing
from jaxgc.assignments import Assignment
from jaxgc.errors import ParamError
from jaxgc.protocols.base import MODES

__all__ = ["EllChoice", "EllSet", "check_ells", "choose_ell", "conditioned_finish_times",
           "comm_model", "scenarios_of", "SAMPLES", "SEED", "PRIOR_CHUNKS"]

SAMPLES = 128
"""Scenarios of the straggler model the PS averages over (drawn once: a fixed quadrature)."""
SEED = 1234
"""Their key: the PS's own, apart from every step's."""
PRIOR_CHUNKS = 0.5
"""Weight of the scenario's pace against a worker's observed one, in chunks (shrinkage)."""


def check_ells(ell) -> tuple[int, ...]:
  """``ell`` as a sorted tuple of distinct positive integers (``ParamError`` on ``ell``)."""
  values = tuple(ell) if isinstance(ell, (tuple, list)) else (ell,)
  if not values or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 1
                           for e in values):
    raise ParamError(f"ell must be a positive integer or a set of them such as (1, 2, 4), "
                     f"got {ell!r}.", "ell")
  if len(set(values)) != len(values):
    raise ParamError(f"ell lists a value twice: {ell!r}; give each ell once, e.g. (1, 2, 4).",
                     "ell")
  return tuple(sorted(values))


class EllChoice(NamedTuple):
  """The PS's choice of one step.

  Attributes:
    stop: float32 ``[]``, when the PS stops computing.
    member: int32 ``[]``, position of the chosen ``ℓ`` in ``protocol.ells``.
    oracle: float32 ``[]``, the clairvoyant bound: exact mode, ``min_ℓ (T_ℓ + comm_ℓ)``
      (a time); deadline mode, the least error over ``ℓ`` per unit of ``σ² d``.
  """
  stop: jax.Array
  member: jax.Array
  oracle: jax.Array


class EllSet(typing.Protocol):
  """What the rule reads of a :class:`jaxgc.protocols.DynamicEll` (a structural type: the
  class lives with :class:`~jaxgc.protocols.PartialStraggler`, which builds it and
  imports this module's checks)."""
  assignment: Assignment
  ells: tuple[int, ...]
  members: tuple[Any, ...]

  def check_durations(self, durations): ...


def comm_model(network, protocol: EllSet, d: int, dtype,
               message_dtype: str = "float32") -> Callable[[int, jax.Array], jax.Array]:
  """``comm(k, S)``: seconds of one round of member ``k``'s messages (``⌈d/ℓ_k⌉`` numbers)
  with ``S`` senders (:func:`jaxgc.network.step_comm_time`)."""
  from jaxgc import network as _network  # pylint: disable=import-outside-toplevel
  return lambda k, senders: _network.step_comm_time(network, protocol.members[k], d, dtype,
                                                    senders, message_dtype=message_dtype)


def conditioned_finish_times(finish, t, scenarios):
  """Scenario finish times ``[R, m, max_load]`` given what the PS knows at time ``t``.

  Args:
    finish: ``F [m, max_load]``, the true finish times; only those ``≤ t`` are read.
    t: ``[]`` the decision time.
    scenarios: ``σ [R, m, max_load]`` durations drawn from the straggler model.
  Returns:
    The known ``F[j, p]`` for finished slots; for the rest ``t + rem + Σ`` of the
    scenario's later durations, scaled by ``s = (F_j + κμ)/(P_j + κμ)`` (``F_j``
    the worker's observed time for its ``k_j`` chunks, ``P_j`` the scenario's for
    the same chunks, ``μ`` the mean duration, ``κ`` = :data:`PRIOR_CHUNKS`), and
    ``rem`` the current chunk's remaining time: the worker's row is taken from a
    scenario whose current chunk runs longer than the elapsed ``e_j`` (its later
    chunks too), less ``e_j`` (any scenario if none runs that long).
  """
  f = jnp.asarray(finish)
  r, m, width = scenarios.shape
  done = (f <= t) & jnp.isfinite(f)
  k = jnp.sum(done, axis=-1)                                           # [m]
  slots = jnp.arange(width)
  start = jnp.max(jnp.where(done, f, 0.0), axis=-1)                    # [m]
  elapsed = t - start
  finite = jnp.isfinite(scenarios)
  mu = jnp.sum(jnp.where(finite, scenarios, 0)) / jnp.maximum(jnp.sum(finite), 1)
  past = jnp.sum(jnp.where(slots < k[:, None], scenarios, 0), axis=-1)   # [R, m]
  scale = (start + PRIOR_CHUNKS * mu) / (past + PRIOR_CHUNKS * mu)
  x = scale[..., None] * scenarios                                     # [R, m, W]
  current = jnp.minimum(k, width - 1)
  at = lambda y: jnp.take_along_axis(y, jnp.broadcast_to(current[None, :, None], (r, m, 1)),
                                     -1)[..., 0]
  cur = at(x)                                                          # [R, m]
  # Conditioning on τ > e_j: the scenarios whose current chunk runs longer than e_j,
  # spread over the R scenarios, each worker on its own. The whole row follows: a
  # chunk that runs long says the worker is slow in this step (Slowdown, Markov).
  longer = jnp.sum(cur > elapsed, axis=0)                              # [m]
  pick = r - longer + jnp.arange(r)[:, None] % jnp.maximum(longer, 1)
  rows = jnp.take_along_axis(jnp.argsort(cur, axis=0), jnp.minimum(pick, r - 1), axis=0)
  rows = jnp.where(longer > 0, rows, jnp.arange(r)[:, None])          # [R, m] scenario ids
  x = x[rows, jnp.arange(m)[None, :]]                                  # [R, m, W]
  cur = at(x)
  rem = jnp.where(longer > 0, cur - elapsed, cur)                      # [R, m]
  later = jnp.cumsum(jnp.where(slots > k[:, None], x, 0), axis=-1)
  future = t + rem[..., None] + later
  return jnp.where(slots < k[:, None], f, future)


def _senders(finish, t):
  """Workers with ``k_j > 0`` at ``t`` (they send), ``[...]``."""
  return jnp.sum(finish[..., 0] <= t[..., None], axis=-1)


def _fallback(finish, timeout):
  """When a PS that never reaches exactness stops (as :func:`jaxgc.protocols.stop_time`)."""
  if timeout is not None:
    return jnp.asarray(timeout, jnp.float32)
  return jnp.max(jnp.where(jnp.isfinite(finish), finish, 0.0))


def _expected_costs(protocol: EllSet, finish, t, scenarios, comm):
  """``E[T_ℓ + comm_ℓ(S(T_ℓ)) | state at t]`` per member, ``[K]``."""
  fin = conditioned_finish_times(finish, t, scenarios)
  out = []
  for k, member in enumerate(protocol.members):
    tk = member.completion_from_finish(fin)                                     # [R]
    out.append(jnp.mean(tk + comm(k, _senders(fin, tk))))
  return jnp.stack(out)


def _choose_exact(protocol: EllSet, durations, scenarios, comm, timeout) -> EllChoice:
  f = timing.finish_times(durations)
  big = len(protocol.ells)
  t_true = jnp.stack([p.completion_from_finish(f) for p in protocol.members])  # [K], grows
  cost_true = jnp.stack([t_true[k] + comm(k, _senders(f, t_true[k])) for k in range(big)])
  fallback = _fallback(f, timeout)
  t, done = t_true[0], jnp.zeros((), bool)
  stop, index = t, jnp.zeros((), jnp.int32)
  for _ in range(big):
    attained = t_true <= t
    now = jnp.stack([jnp.where(attained[k], t + comm(k, _senders(f, t)), jnp.inf)
                     for k in range(big)])
    est = jnp.where(attained, jnp.inf, _expected_costs(protocol, f, t, scenarios, comm))
    t_next = jnp.min(jnp.where(attained, jnp.inf, t_true))
    here = ~done & ~(jnp.min(est) < jnp.min(now))
    # Waiting for an ℓ that is never reached (failures): the PS gives up at the fallback.
    lost = ~done & ~here & ~jnp.isfinite(t_next)
    stop = jnp.where(here, t, jnp.where(lost, jnp.maximum(t, fallback), stop))
    index = jnp.where(here | lost, jnp.argmin(now).astype(jnp.int32), index)
    done = done | here | lost
    t = jnp.where(done, t, t_next)
  never = ~jnp.isfinite(t_true[0])
  stop = jnp.where(never, fallback, stop)
  index = jnp.where(never, 0, index)
  return EllChoice(stop.astype(jnp.float32), index, jnp.min(cost_true).astype(jnp.float32))


def _error(ell: int, coverage):
  """Expected error per unit of ``σ² d``: ``(1/ℓ) Σ_i max(0, ℓ − c_i)``, ``[...]``."""
  return jnp.sum(jnp.maximum(0, ell - coverage), axis=-1) / ell


def _choose_deadline(protocol: EllSet, durations, scenarios, comm, deadline) -> EllChoice:
  f = timing.finish_times(durations)
  a, m, big = protocol.assignment, protocol.assignment.num_workers, len(protocol.ells)
  ells = protocol.ells
  u = jnp.stack([jnp.asarray(deadline, jnp.float32) - comm(k, jnp.asarray(m))
                 for k in range(big)])                                  # [K] compute stops
  u = jnp.maximum(u, 0.0)
  t_true = jnp.stack([p.completion_from_finish(f) for p in protocol.members])
  exact = jnp.where(t_true <= u, t_true, jnp.inf)                       # exact before u_ℓ
  first = jnp.min(exact)
  # Among the ℓ exact at that moment, the largest (the cheapest messages).
  exact_index = jnp.max(jnp.where(exact <= first, jnp.arange(big), -1)).astype(jnp.int32)
  cov = lambda t: a.coverage(timing.progress(durations, t))
  oracle = jnp.min(jnp.stack([_error(ells[k], cov(jnp.minimum(u[k], t_true[k])))
                              for k in range(big)]))
  order = jnp.argsort(u)
  done = jnp.zeros((), bool)
  stop, index = u[order[0]], order[0].astype(jnp.int32)
  for i in range(big):
    k_i, t = order[i], u[order[i]]
    hit = ~done & (first <= t)
    fin = conditioned_finish_times(f, t, scenarios)
    est = jnp.stack([jnp.mean(_error(ells[k], a.coverage(jnp.sum(fin <= u[k], -1))))
                     for k in range(big)])
    now = jnp.stack([_error(ells[k], cov(t)) for k in range(big)])[k_i]
    est = jnp.where(u > t, est, jnp.inf)
    here = ~done & ~hit & ~(jnp.min(est) < now)
    stop = jnp.where(hit, first, jnp.where(here, t, stop))
    index = jnp.where(hit, exact_index, jnp.where(here, k_i.astype(jnp.int32), index))
    done = done | hit | here
  return EllChoice(stop.astype(jnp.float32), index, oracle.astype(jnp.float32))


def choose_ell(protocol: EllSet, durations, scenarios, comm, mode: str = "exact",
               deadline=None, timeout=None) -> EllChoice:
  """The PS's causal choice of ``ℓ`` and its stop time from durations ``[m, max_load]``.

  Args:
    protocol: a :class:`DynamicEll`.
    durations: the step's true durations; the rule reads only what has finished by each
      decision time (the module docstring).
    scenarios: ``[R, m, max_load]`` draws of the straggler model
      (``straggler.sample(PRNGKey(SEED), assignment, (SAMPLES,))``).
    comm: :func:`comm_model`'s ``comm(k, S)``.
    mode: ``"exact"`` or ``"deadline"``, as :func:`jaxgc.protocols.stop_time`.
    deadline: deadline mode; it bounds the whole step (computation and messages).
    timeout: exact mode: when a PS that never reaches exactness gives up.
  Returns: an :class:`EllChoice`. One step; ``jax.vmap`` for a batch.
  """
  if mode not in MODES:
    raise ParamError(f"unknown mode {mode!r}; choose one of {MODES}.", "mode")
  durations = protocol.check_durations(durations)
  scenarios = jnp.asarray(scenarios, jnp.float32)
  if mode == "deadline":
    if deadline is None:
      raise ParamError("deadline mode needs a deadline (simulated seconds).", "deadline")
    return _choose_deadline(protocol, durations, scenarios, comm, deadline)
  return _choose_exact(protocol, durations, scenarios, comm, timeout)


def scenarios_of(straggler, assignment: Assignment):
  """The PS's fixed scenarios of ``straggler``: ``[SAMPLES, m, max_load]``."""
  return straggler.sample(jax.random.PRNGKey(SEED), assignment, (SAMPLES,))

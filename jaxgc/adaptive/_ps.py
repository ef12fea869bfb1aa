"""The adaptive PS: its state, the rate estimates and the placement (see the package docstring)."""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgc import assignments, timing
from jaxgc.detector import Detector, observation

__all__ = ["AdaptiveState", "AdaptivePS", "update_rates", "apply_placement", "spread_positions",
           "order_completion_time", "busy_times"]

class AdaptiveState(NamedTuple):
  """What the PS remembers (per *physical* worker).

  Attributes:
    rate: ``[m]`` estimated chunks per unit of time.
    perm: int32 ``[m]``: the placement of the coming step (physical worker of
      logical worker ``j``).
    num_obs: int32 ``[]``: steps observed.
    detect: the :class:`~jaxgc.detector.DetectorState` of ``AdaptivePS.detector``
      (``()`` without one).
    order: with ``reassign``: int32 ``[m, width]``, the unequal-load lists
      (:func:`jaxgc.assignments.by_speed` of the estimated speeds) by *physical* worker,
      ``-1`` = empty; ``()`` without.
    use_order: with ``reassign``: bool ``[]``, the coming step runs ``order`` rather than
      the equal-load assignment placed by ``perm``; ``()`` without.
  """
  rate: jax.Array
  perm: jax.Array
  num_obs: jax.Array
  detect: Any = ()
  order: Any = ()
  use_order: Any = ()


def update_rates(rate, counts, loads, stop, decay):
  """EWMA of ``k_p / stop``, ``[m]``; censored where ``k_p = δ_p`` (finished its list).

  A worker done before the stop could have done more, so ``k_p / stop`` is only a
  lower bound on its rate: it may raise the estimate, never lower it. Without this
  a worker given a short list looks slow because it is short, and stays short.
  A non-finite or zero stop (nothing finished) leaves the estimates as they are.
  """
  stop = jnp.asarray(stop, jnp.float32)
  ok = jnp.isfinite(stop) & (stop > 0)
  obs = jnp.asarray(counts, jnp.float32) / jnp.where(ok, stop, 1.0)
  new = (1 - decay) * rate + decay * obs
  censored = jnp.asarray(counts) >= jnp.asarray(loads)
  new = jnp.where(censored, jnp.maximum(rate, new), new)
  return jnp.where(ok, new, rate)


def busy_times(durations, counts, stop):
  """How long each worker was busy up to the stop, ``e_j = min(stop, F_{j,δ_j})``, and whether
  it was still busy (``k_j < δ_j``), ``[m]`` each, from its durations ``[m, width]``
  (``inf`` = empty slot).

  The PS learns these from the per-chunk messages (§1); a worker that ran out of work
  was idle for ``stop − F_{j,δ_j}``, which says nothing about its speed.
  """
  tau = jnp.asarray(durations)
  f = jnp.cumsum(tau, axis=-1)
  last = jnp.max(jnp.where(jnp.isfinite(f), f, 0.0), axis=-1)     # its whole list, or 0
  loads = jnp.sum(jnp.isfinite(tau), axis=-1)
  busy = jnp.asarray(counts) < loads
  stop = jnp.asarray(stop, jnp.float32)
  return jnp.where(busy, stop, jnp.minimum(stop, last)), busy


def _rate_obs(counts, busy_time, busy):
  """One step's rate ``(k_j + ½ b_j) / e_j``: the chunk in progress at the stop counts half,
  so a worker that finished none is seen as slow, not as stopped (``k/e = 0`` would drag
  its estimate to the floor in a few steps)."""
  n = jnp.asarray(counts, jnp.float32) + 0.5 * jnp.asarray(busy, jnp.float32)
  return n / jnp.where(busy_time > 0, busy_time, 1.0)


def order_completion_time(order, durations, ell: int):
  """``t*`` of explicit lists ``order`` ``[m, width]`` (a traced array: any lists of ``N = m``
  chunks, ``-1`` = empty) on durations ``[..., m, width]``, ``[...]`` (jittable).

  ``max_i`` of the ``ℓ``-th smallest finish time of chunk ``i`` over its holders (§4);
  ``inf`` where some chunk has fewer than ``ℓ`` finite finishes.
  """
  order = jnp.asarray(order)
  f = jnp.cumsum(jnp.asarray(durations), axis=-1)
  m, width = order.shape
  held = order[None] == jnp.arange(m)[:, None, None]                  # [N, m, width]
  vals = jnp.where(held, f[..., None, :, :], jnp.inf)                 # [..., N, m, width]
  per_chunk = timing.kth_smallest(vals.reshape(*vals.shape[:-2], m * width), ell)
  return jnp.max(per_chunk, axis=-1)


def spread_positions(num_workers: int) -> np.ndarray:
  """``[m, m]`` int: row ``s`` lists the ``s`` evenly spread logical positions ``⌊i·m/s⌋``
  (``i < s``) followed by the other positions in ascending order."""
  m = num_workers
  out = np.zeros((m + 1, m), np.int32)
  for s in range(m + 1):
    spread = [i * m // s for i in range(s)] if s else []
    out[s] = spread + [p for p in range(m) if p not in set(spread)]
  return out[1:]


def apply_placement(durations, perm, assignment):
  """Logical durations ``τ[..., perm[j], :]`` ``[..., m, max_load]``, empty slots ``inf``.

  Physical worker ``perm[j]``'s ``t``-th chunk time becomes logical worker ``j``'s.
  """
  tau = jnp.take(jnp.asarray(durations), jnp.asarray(perm), axis=-2)
  return jnp.where(jnp.asarray(assignment.slot_mask), tau, jnp.inf)


class AdaptivePS(NamedTuple):
  """Placement by estimated speed for ``protocol`` (its ``completion_time`` is the objective).

  ``decay``: weight of the newest step in the estimates (``1/decay`` steps of memory).
  ``floor``: lower bound on the rate, so a worker never seen finishing gets a
  large but finite mean duration.
  ``detector``: a :class:`jaxgc.detector.Detector`: a change point in a worker's chunk
  times resets its rate to the newest observation (the EWMA would take ``~1/decay``
  steps), and its slow flags are reported (``slow_workers``).
  ``reassign``: also consider unequal loads each step: the lists
  :func:`jaxgc.assignments.by_speed` gives for the estimated speeds (loads up to
  ``width``, default ``min(N, 2·max_load)``), used when their estimated ``E[t*]`` is below
  the best placement's by the fraction ``margin`` and (with a detector) the detector's
  slow flags have come true at the next step at least ``persistence`` of the time
  (``DetectorState.precision``: slowness drawn afresh each step is not worth
  re-placing work for). For a cyclic-like assignment
  (``N = m``) of the partial-straggler protocol in exact mode; in :func:`simulate`
  (the steps keep their assignment and refuse ``reassign``).
  """
  protocol: Any
  decay: float = 0.3
  floor: float = 0.05
  num_draws: int = 16
  detector: Detector | None = None
  reassign: bool = False
  width: int | None = None
  margin: float = 0.05
  persistence: float = 0.5

  @property
  def slot_width(self) -> int:
    """Slots per worker the PS plans with: ``max_load``, or ``width`` with ``reassign``."""
    asg = self.protocol.assignment
    if not self.reassign:
      return asg.max_load
    return min(asg.num_chunks, 2 * asg.max_load) if self.width is None else self.width

  @property
  def num_workers(self) -> int:
    return self.protocol.assignment.num_workers

  def init(self, num_workers: int | None = None) -> AdaptiveState:
    """No knowledge: every worker equally fast, identity placement (the static PS)."""
    m = self.num_workers if num_workers is None else num_workers
    if m != self.num_workers:
      raise ValueError(f"AdaptivePS: the protocol has {self.num_workers} workers, got "
                       f"num_workers={m}; build AdaptivePS with the step's protocol.")
    if not 0 < self.decay <= 1:
      raise ValueError(f"AdaptivePS decay must be in (0, 1], got {self.decay}.")
    state = AdaptiveState(rate=jnp.ones((m,), jnp.float32),
                          perm=jnp.arange(m, dtype=jnp.int32), num_obs=jnp.zeros((), jnp.int32))
    if self.detector is not None:
      state = state._replace(detect=self.detector.init(m))
    if self.reassign:
      self._check_reassign()
      order = np.full((m, self.slot_width), -1, np.int32)
      order[:, : self.protocol.assignment.max_load] = self.protocol.assignment.order
      state = state._replace(order=jnp.asarray(order), use_order=jnp.zeros((), bool))
    return state

  def _check_reassign(self) -> None:
    from jaxgc.protocols.partial_straggler import (  # pylint: disable=import-outside-toplevel
      PartialStraggler,
    )
    asg = self.protocol.assignment
    if asg.num_chunks != asg.num_workers or not isinstance(self.protocol, PartialStraggler):
      raise ValueError(
          f"AdaptivePS reassign needs the partial-straggler protocol (its exact-mode t* is "
          f"what unequal lists are planned with) on an assignment of N = m chunks (got "
          f"{type(self.protocol).__name__} on {asg!r}); use reassign=False.")
    if not asg.max_load <= self.slot_width <= asg.num_chunks:
      raise ValueError(f"AdaptivePS width must be in max_load..N = {asg.max_load}.."
                       f"{asg.num_chunks}, got {self.width}.")

  def slow_workers(self, state: AdaptiveState):
    """bool ``[m]`` by physical worker: flagged slow by the detector (all ``False``
    without one)."""
    if self.detector is None:
      return jnp.zeros((self.num_workers,), bool)
    return self.detector.slow(state.detect)

  def mean_durations(self, state: AdaptiveState):
    """Estimated mean chunk duration per physical worker, ``μ_p = 1 / rate_p``, ``[m]``."""
    return 1.0 / jnp.maximum(state.rate, self.floor)

  def observe(self, state: AdaptiveState, counts, stop, durations=None) -> AdaptiveState:
    """Folds in one step's state ``counts`` ``[m]`` (logical, as the protocol saw it) and stop time,
    then re-chooses the placement for the next step.

    ``durations``: the step's logical durations ``[m, slots]`` (``inf`` = empty). With
    them the PS knows when each worker ran out of work (:func:`busy_times`), so its
    rate ``(k_j + ½ b_j) / e_j`` needs no censoring (both steps pass them: the PS times
    each chunk's report); without them a worker that finished its list only bounds its
    rate from below (:func:`update_rates`). After a step that ran ``state.order``
    (``reassign``), counts and durations are by physical worker.
    """
    m = self.num_workers
    perm = state.perm
    if self.reassign:
      perm = jnp.where(state.use_order, jnp.arange(m, dtype=jnp.int32), perm)
      loads_logical = jnp.where(state.use_order, jnp.sum(state.order >= 0, -1),
                                jnp.asarray(self.protocol.assignment.loads))
    else:
      loads_logical = jnp.asarray(self.protocol.assignment.loads)
    k_phys = jnp.zeros((m,), jnp.int32).at[perm].set(jnp.asarray(counts, jnp.int32))
    load_phys = jnp.zeros((m,), jnp.int32).at[perm].set(loads_logical.astype(jnp.int32))
    decay = jnp.float32(self.decay)
    stop = jnp.asarray(stop, jnp.float32)
    if durations is None:
      rate = update_rates(state.rate, k_phys, load_phys, stop, decay)
      busy_time, busy = jnp.broadcast_to(stop, (m,)), k_phys < load_phys
    else:
      e, b = busy_times(durations, counts, stop)
      busy_time = jnp.zeros((m,), jnp.float32).at[perm].set(e)
      busy = jnp.zeros((m,), bool).at[perm].set(b)
      ok = jnp.isfinite(busy_time) & (busy_time > 0)
      rate = jnp.where(ok, (1 - decay) * state.rate + decay * _rate_obs(k_phys, busy_time, busy),
                       state.rate)
    new = state._replace(rate=rate, num_obs=state.num_obs + 1)
    if self.detector is not None:
      # Without durations a worker done early only bounds its chunk time: not observed.
      x, ok = observation(k_phys, busy_time, busy, None if durations is not None else busy)
      det, alarm = self.detector.update(state.detect, x, ok)
      # A change point (or the first observation): the old estimate describes another
      # regime, or none; restart from this step.
      fresh = alarm | (ok & (state.detect.length == 0))
      new = new._replace(detect=det, rate=jnp.where(fresh, _rate_obs(k_phys, busy_time, busy),
                                                    new.rate))
    new = new._replace(perm=self.choose(new))
    if self.reassign:
      new = self._reassign(new)
    return new

  def _reassign(self, state: AdaptiveState) -> AdaptiveState:
    """Unequal loads for the estimated speeds (:func:`jaxgc.assignments.by_speed`), kept
    when they beat the chosen placement's estimated ``E[t*]`` by ``margin``."""
    asg = self.protocol.assignment
    m, width = self.num_workers, self.slot_width
    order = jax.pure_callback(functools.partial(_by_speed_lists, int(asg.max_load), width),
                              jax.ShapeDtypeStruct((m, width), jnp.int32),
                              self.planning_speeds(state))
    # Both candidates under the same snapped speeds and on fresh draws: the placement
    # was picked as the best of many under the noisy rates and on the objective's
    # fixed draws, and would win on that noise alone.
    planned = state._replace(rate=self.planning_speeds(state) * jnp.median(state.rate))
    tau = self._draws(planned, jax.random.PRNGKey(1), 4 * self.num_draws)
    placed = jnp.mean(self.protocol.completion_time(
        apply_placement(tau[..., : asg.max_load], state.perm, asg)))
    loaded = jnp.mean(order_completion_time(order, jnp.where(order >= 0, tau, jnp.inf),
                                            self.protocol.ell))
    use = loaded < (1 - self.margin) * placed
    if self.detector is not None:
      use = use & (state.detect.precision >= self.persistence)
    return state._replace(order=order, use_order=use)

  def planning_speeds(self, state: AdaptiveState):
    """Relative speeds ``[m]`` the unequal loads are sized by: ``1`` for a worker not
    flagged slow, else its rate over the median rate, ``e^{-0.1}``-quantised.

    The per-step rates of the fast majority are noisy (a worker finishes one or two
    chunks per step); sizing loads by them would move chunks back and forth between
    equally fast workers. Only the detected slow workers (the detector's flags, or
    without one a rate below half the median) get less work, by their estimated factor.
    """
    rate = jnp.maximum(state.rate, self.floor)
    ratio = rate / jnp.median(rate)
    slow = self.slow_workers(state) if self.detector is not None else ratio < 0.5
    ratio = jnp.exp(jnp.round(jnp.log(jnp.minimum(ratio, 1.0)) * 10) / 10)
    return jnp.where(slow, ratio, 1.0)

  def _draws(self, state: AdaptiveState, key=None, num: int | None = None):
    """``μ_p · ε`` ``[S, m, slot_width]``: fixed mean-one draws (``key``, default
    ``PRNGKey(0)``; ``num`` of them, default ``num_draws``) at the estimated means."""
    key = jax.random.PRNGKey(0) if key is None else key
    shape = (self.num_draws if num is None else num, self.num_workers, self.slot_width)
    eps = (1.0 + jax.random.exponential(key, shape)) / 2
    return self.mean_durations(state)[:, None] * eps

  def placement(self, state: AdaptiveState):
    """The permutation ``perm`` ``[m]`` for the coming step."""
    return state.perm

  def candidates(self, state: AdaptiveState):
    """Candidate placements ``[1 + m, m]``: the current one, then ``s = 1..m`` slowest spread."""
    mu = self.mean_durations(state)
    slowest_first = jnp.argsort(-mu, stable=True).astype(jnp.int32)
    pos = jnp.asarray(spread_positions(self.num_workers))            # [m, m]
    spread = jnp.zeros_like(pos).at[jnp.arange(pos.shape[0])[:, None], pos].set(
        slowest_first[None, :])
    return jnp.concatenate([state.perm[None], spread], axis=0)

  def objective(self, state: AdaptiveState, perms):
    """Estimated ``E[t*]`` for placements ``perms`` ``[K, m]``, ``[K]``.

    Mean of the protocol's ``t*`` over ``num_draws`` fixed draws of chunk durations
    ``μ_p · ε``, ``ε`` i.i.d. mean-one ``(1 + Exp(1)) / 2`` (the PS knows speeds,
    not the noise law; this one has the default model's shape). The same draws
    for every candidate and every step (common random numbers), so the choice is
    a deterministic function of the estimates and candidates compare without noise.
    """
    asg = self.protocol.assignment
    tau = self._draws(state)[..., : asg.max_load]                     # [S, m, max_load]
    logical = jax.vmap(lambda p: apply_placement(tau, p, asg))(perms)  # [K, S, m, max_load]
    return jnp.mean(self.protocol.completion_time(logical), axis=-1)

  def choose(self, state: AdaptiveState):
    perms = self.candidates(state)
    return perms[jnp.argmin(self.objective(state, perms))]


@functools.lru_cache(maxsize=256)
def _by_speed_cached(load: int, width: int, speeds: tuple[float, ...]) -> np.ndarray:
  out = np.full((len(speeds), width), -1, np.int32)
  order = assignments.by_speed(np.asarray(speeds), load, max_load=width).order
  out[:, : order.shape[1]] = order
  return out


def _by_speed_lists(load: int, width: int, speeds) -> np.ndarray:
  """Host side of :meth:`AdaptivePS._reassign` (speeds are quantised, so a cache hits)."""
  return _by_speed_cached(load, width, tuple(np.round(np.asarray(speeds, np.float64), 6)))

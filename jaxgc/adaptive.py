"""An adaptive PS (PROTOCOL.md §10): learn who is slow, and place the work accordingly.

The PS sees the state ``k`` at every stop. From it, it keeps an exponentially
weighted estimate of each *physical* worker's chunk rate, ``rate_p = EWMA(k_p / stop)``
(a worker that finished its whole list only shows a lower bound, so its estimate
may rise but not fall: see :func:`update_rates`). Between steps it re-chooses a **placement**:
a permutation ``perm`` ``[m]`` saying which physical worker runs logical worker
``j``'s chunk list, so ``τ_logical[j] = τ_physical[perm[j]]``. Each step's chunks
are fresh samples, so moving a list costs nothing beyond routing the input, and
the protocol (its assignment, ordering, code) is untouched: exactness is too.

What it optimises: ``E[t*]`` of the protocol under the estimated speeds (mean
chunk duration ``μ_p = 1 / rate_p``, times a fixed set of mean-one noise draws),
over a family of candidate placements:
the current one and, for ``s = 1..m``, "the ``s`` slowest workers spread evenly
around the list of logical workers, the rest in rank order". Spreading is what
the structure asks for: with a cyclic assignment a chunk's holders are ``δ``
consecutive logical workers, so adjacent slow workers starve the chunks they
share, while spread ones leave every chunk fast holders. The count ``s`` is
chosen by the objective, so no threshold on "slow" is needed. Ties keep the
current placement (no churn when nothing is learnt).

Under an i.i.d. straggler model the physical workers are exchangeable and the
placement depends only on past steps, so the completion time has the same law
as with a static placement: never worse than static.

Everything is a pure, jittable function of a NamedTuple state, so the training
step can carry the state in its ``TrainState`` and checkpoint it. In a step that
plans step ``t`` (durations, stop, state ``k``) before any gradient moves:

    tau, s_state = timing.sample_step(straggler, key_t, s_state, assignment)
    tau = apply_placement(tau, ps.placement(a_state), assignment)   # logical workers
    stop = stop_time(protocol, tau); counts = timing.progress(tau, stop)
    a_state = ps.observe(a_state, counts, stop)                      # for step t + 1

Only the simulated durations move: each logical worker's chunks and gradients are
the same, so the estimate, and exact mode, do not change.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgc import timing
from jaxgc.protocols.base import stop_time

__all__ = ["AdaptiveState", "AdaptivePS", "update_rates", "apply_placement", "spread_positions",
           "simulate", "speed_assignment", "completion_time_of", "simulate_assignment"]


class AdaptiveState(NamedTuple):
  """What the PS remembers (per *physical* worker).

  Attributes:
    rate: ``[m]`` estimated chunks per unit of time.
    perm: int32 ``[m]``: the placement of the coming step (physical worker of
      logical worker ``j``).
    num_obs: int32 ``[]``: steps observed.
  """
  rate: jax.Array
  perm: jax.Array
  num_obs: jax.Array


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
  """
  protocol: Any
  decay: float = 0.3
  floor: float = 0.05
  num_draws: int = 16

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
    return AdaptiveState(rate=jnp.ones((m,), jnp.float32), perm=jnp.arange(m, dtype=jnp.int32),
                         num_obs=jnp.zeros((), jnp.int32))

  def mean_durations(self, state: AdaptiveState):
    """Estimated mean chunk duration per physical worker, ``μ_p = 1 / rate_p``, ``[m]``."""
    return 1.0 / jnp.maximum(state.rate, self.floor)

  def observe(self, state: AdaptiveState, counts, stop) -> AdaptiveState:
    """Folds in one step's state ``counts`` ``[m]`` (logical, as the protocol saw it) and stop time,
    then re-chooses the placement for the next step."""
    perm = state.perm
    k_phys = jnp.zeros((self.num_workers,), jnp.int32).at[perm].set(jnp.asarray(counts, jnp.int32))
    load_phys = jnp.zeros((self.num_workers,), jnp.int32).at[perm].set(
        jnp.asarray(self.protocol.assignment.loads))
    rate = update_rates(state.rate, k_phys, load_phys, stop, jnp.float32(self.decay))
    new = state._replace(rate=rate, num_obs=state.num_obs + 1)
    return new._replace(perm=self.choose(new))

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
    mu = self.mean_durations(state)
    eps = (1.0 + jax.random.exponential(jax.random.PRNGKey(0),
                                        (self.num_draws, *asg.order.shape))) / 2.0
    tau = mu[:, None] * eps                                           # [S, m, max_load]
    logical = jax.vmap(lambda p: apply_placement(tau, p, asg))(perms)  # [K, S, m, max_load]
    return jnp.mean(self.protocol.completion_time(logical), axis=-1)

  def choose(self, state: AdaptiveState):
    perms = self.candidates(state)
    return perms[jnp.argmin(self.objective(state, perms))]


def simulate(protocol, straggler, key, num_steps: int, adaptive: AdaptivePS | None = None,
             state=None, others=None, keep_durations: bool = False):
  """Runs ``num_steps`` exact-mode steps; per-step arrays ``[T]``.

  Returns a dict: ``time`` (the protocol's stop time with the placement in
  force, or the identity when ``adaptive`` is None), ``oracle`` (the oracle bound
  on the same durations), ``perm`` ``[T, m]``, and for each ``name: protocol`` in
  ``others`` its completion time on the same (unplaced) durations, and with
  ``keep_durations`` those durations ``[T, m, max_load]`` as ``durations``. The
  straggler model's chain (if any) starts from ``state`` or from its
  stationary law; the durations are those of :func:`timing.sample_steps` with
  the same key, whatever the placement.
  """
  asg = protocol.assignment
  m = asg.num_workers
  k0, key = jax.random.split(key)
  if state is None:
    state = timing.init_state(straggler, k0, m)
  ada = adaptive.init() if adaptive is not None else None

  def body(carry, t):
    s, a = carry
    tau, s = timing.sample_step(straggler, jax.random.fold_in(key, t), s, asg)
    perm = adaptive.placement(a) if adaptive is not None else jnp.arange(m, dtype=jnp.int32)
    logical = apply_placement(tau, perm, asg)
    stop = stop_time(protocol, logical)
    if adaptive is not None:
      a = adaptive.observe(a, timing.progress(logical, stop), stop)
    out = {"time": stop, "oracle": timing.oracle_time(tau, asg, protocol.ell), "perm": perm}
    out.update({name: p.completion_time(tau) for name, p in (others or {}).items()})
    if keep_durations:
      out["durations"] = tau
    return (s, a), out

  return jax.lax.scan(body, (state, ada), jnp.arange(num_steps))[1]


# -- simulator only: re-choosing the assignment itself ------------------------------

def speed_assignment(mean_durations, num_chunks: int, total_slots: int,
                     max_load: int) -> np.ndarray:
  """Chunk lists with unequal loads for estimated speeds, by greedy list scheduling.

  Worker ``p``'s ``t``-th slot would finish at ``(t+1)·μ_p`` at its mean speed.
  Slots are handed out in that time order, the first ``total_slots`` of them (the
  static assignment's total work, ``N·δ``; every worker keeps its first slot so it
  stays observed), each to the least-covered chunk the
  worker does not hold yet (ties: the chunk after ``p`` cyclically). At the mean
  speeds coverage then grows as evenly as the fleet allows, which is what the
  oracle bound assumes. Returns ``order`` int32 ``[m, max_load]`` (``-1`` = empty).
  """
  mu = np.asarray(mean_durations, np.float64)
  m = len(mu)
  if max_load > num_chunks:
    raise ValueError(f"max_load={max_load} exceeds num_chunks={num_chunks}; a worker holds "
                     "each chunk at most once.")
  t = np.arange(1, max_load + 1)
  finish = (t[None, :] * mu[:, None]).ravel()
  # Every worker keeps at least one slot: a worker given nothing is never observed
  # again, and could never be found to have recovered.
  first = np.zeros((m, max_load), bool)
  first[:, 0] = True
  rest = np.flatnonzero(~first.ravel())
  rest = rest[np.lexsort((rest // max_load, finish[rest]))][: max(total_slots - m, 0)]
  chosen = np.concatenate([np.flatnonzero(first.ravel()), rest])
  events = chosen[np.lexsort((chosen // max_load, finish[chosen]))]
  order = np.full((m, max_load), -1, np.int32)
  cov = np.zeros(num_chunks, np.int64)
  held = np.zeros((m, num_chunks), bool)
  fill = np.zeros(m, np.int64)
  for e in events:
    p = e // max_load
    key = np.where(held[p], np.iinfo(np.int64).max,
                   cov * num_chunks + (np.arange(num_chunks) - p) % num_chunks)
    c = int(np.argmin(key))
    order[p, fill[p]] = c
    fill[p] += 1
    held[p, c] = True
    cov[c] += 1
  return order


def completion_time_of(order, durations, ell: int) -> float:
  """``t* = max_i ℓ-th smallest F_{j,pos_j(i)}`` for one state of explicit lists (NumPy)."""
  order = np.asarray(order)
  f = np.cumsum(np.asarray(durations, np.float64), axis=-1)
  used = order >= 0
  chunk, fin = order[used], f[used]
  idx = np.lexsort((fin, chunk))
  chunk, fin = chunk[idx], fin[idx]
  n = int(order.max()) + 1
  start = np.searchsorted(chunk, np.arange(n))
  count = np.bincount(chunk, minlength=n)
  if (count < ell).any():
    return float("inf")
  return float(np.max(fin[start + ell - 1]))


def simulate_assignment(straggler, key, num_steps: int, *, num_workers: int, load: int,
                        ell: int, max_load: int | None = None, decay: float = 0.3,
                        floor: float = 0.05):
  """Simulator only: an adaptive PS that re-chooses the whole assignment every step.

  Same speed estimates as :class:`AdaptivePS`; the lists come from
  :func:`speed_assignment` with ``N = m`` chunks and the static total work
  ``m·load``, loads up to ``max_load`` (default ``2·load``). Physical durations
  are drawn for ``max_load`` slots per worker (per-chunk times at the static
  load's scale) and the oracle bound uses those slots too. Returns per-step
  ``time`` and ``oracle`` (NumPy ``[T]``) and ``loads`` ``[T, m]``.
  """
  from jaxgc import assignments  # pylint: disable=import-outside-toplevel
  m, n = num_workers, num_workers
  max_load = 2 * load if max_load is None else max_load
  carrier = assignments.cyclic(m, max_load)
  scale = max_load / load if isinstance(_unwrap(straggler), timing.TraceReplay) else 1.0
  k0, key = jax.random.split(key)
  taus = np.asarray(timing.sample_steps(straggler, key, carrier, num_steps,
                                        timing.init_state(straggler, k0, m))) * scale
  oracle = np.asarray(timing.oracle_time(taus, carrier, ell))
  rate, out_t, out_l = np.ones(m, np.float32), [], []
  for tau in taus:
    mu = 1.0 / np.maximum(rate, floor)
    order = speed_assignment(mu, n, m * load, max_load)
    tau = np.where(order >= 0, tau, np.inf)
    t = completion_time_of(order, tau, ell)
    stop = t if np.isfinite(t) else float(np.max(np.where(np.isfinite(np.cumsum(tau, -1)),
                                                           np.cumsum(tau, -1), 0.0)))
    k = np.sum((np.cumsum(tau, -1) <= stop) & (order >= 0), axis=-1)
    rate = np.asarray(update_rates(rate, k, (order >= 0).sum(-1), stop, decay))
    out_t.append(stop)
    out_l.append((order >= 0).sum(-1))
  return {"time": np.asarray(out_t), "oracle": oracle, "loads": np.asarray(out_l)}


def _unwrap(model):
  return _unwrap(model.base) if isinstance(model, timing.Failures) else model

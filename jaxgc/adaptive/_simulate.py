"""The adaptive PS in simulation: :func:`simulate`, and re-choosing the assignment itself."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxgc import assignments, timing
from jaxgc.adaptive._ps import AdaptivePS, apply_placement, order_completion_time, update_rates
from jaxgc.protocols.base import stop_time

__all__ = ["simulate", "speed_assignment", "completion_time_of", "simulate_assignment"]

def simulate(protocol, straggler, key, num_steps: int, adaptive: AdaptivePS | None = None,
             state=None, others=None, keep_durations: bool = False, width: int | None = None):
  """Runs ``num_steps`` exact-mode steps; per-step arrays ``[T]``.

  Returns a dict: ``time`` (the protocol's stop time with the placement in
  force, or the identity when ``adaptive`` is None), ``oracle`` (the oracle bound
  on the same durations), ``perm`` ``[T, m]``, and for each ``name: protocol`` in
  ``others`` its completion time on the same (unplaced) durations, and with
  ``keep_durations`` those durations ``[T, m, max_load]`` as ``durations``. The
  straggler model's chain (if any) starts from ``state`` or from its
  stationary law; the durations are those of :func:`timing.sample_steps` with
  the same key, whatever the placement.

  ``width``: draw ``width`` slots per worker (on ``cyclic(m, width)``; a trace's
  per-chunk times stay at the protocol's load), of which a fixed assignment uses its
  first ``max_load``; the oracle uses them all. Default: the adaptive PS's
  ``slot_width`` (``max_load`` unless it may ``reassign``). Give the same ``width`` to a
  static and an adaptive run to compare them on the same durations. The adaptive PS
  observes the durations up to the stop (:meth:`AdaptivePS.observe`), and with a
  detector or ``reassign`` the dict also has ``slow_workers`` ``[T, m]`` (physical
  workers flagged slow when the step was planned), ``loads`` ``[T, m]`` (each physical
  worker's load) and ``unequal`` ``[T]`` (the step ran the unequal-load lists).
  """
  asg = protocol.assignment
  m = asg.num_workers
  if width is None and adaptive is not None:
    width = adaptive.slot_width
  width = asg.max_load if width is None else width
  if width == asg.max_load:
    carrier, scale = asg, 1.0
  else:
    if asg.num_chunks != m or not asg.max_load <= width <= m:
      raise ValueError(f"simulate: width={width} needs N = m chunks and max_load <= width <= m "
                       f"(got {asg!r}).")
    carrier = assignments.cyclic(m, width)
    scale = width / asg.max_load if isinstance(_unwrap(straggler), timing.TraceReplay) else 1.0
  k0, key = jax.random.split(key)
  if state is None:
    state = timing.init_state(straggler, k0, m)
  ada = adaptive.init() if adaptive is not None else None
  extra = adaptive is not None and (adaptive.detector is not None or adaptive.reassign)
  mask = jnp.asarray(asg.slot_mask)

  def body(carry, t):
    s, a = carry
    tau_c, s = timing.sample_step(straggler, jax.random.fold_in(key, t), s, carrier)
    tau_c = tau_c * scale
    tau = jnp.where(mask, tau_c[:, : asg.max_load], jnp.inf)
    perm = adaptive.placement(a) if adaptive is not None else jnp.arange(m, dtype=jnp.int32)
    logical = apply_placement(tau, perm, asg)
    stop = stop_time(protocol, logical)
    seen = jnp.pad(logical, ((0, 0), (0, width - asg.max_load)), constant_values=jnp.inf)
    loads = jnp.zeros((m,), jnp.int32).at[perm].set(jnp.asarray(asg.loads))
    unequal = jnp.zeros((), bool)
    if adaptive is not None and adaptive.reassign:
      own = jnp.where(a.order >= 0, tau_c, jnp.inf)                     # physical = logical
      t_own = order_completion_time(a.order, own, protocol.ell)
      f = jnp.cumsum(own, -1)
      t_own = jnp.where(jnp.isfinite(t_own), t_own,
                        jnp.max(jnp.where(jnp.isfinite(f), f, 0.0)))
      unequal = a.use_order
      stop = jnp.where(unequal, t_own, stop)
      seen = jnp.where(unequal, own, seen)
      loads = jnp.where(unequal, jnp.sum(a.order >= 0, -1), loads)
    out = {"time": stop, "oracle": timing.oracle_time(tau_c, carrier, protocol.ell),
           "perm": perm}
    if extra and adaptive is not None:
      out.update(slow_workers=adaptive.slow_workers(a), loads=loads, unequal=unequal)
    if adaptive is not None:
      a = adaptive.observe(a, timing.progress(seen, stop), stop, seen)
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

"""The planner: which protocol, load and ``ℓ`` to deploy on a cluster (PROTOCOL.md §11).

For each candidate ``(protocol, load, ℓ)`` on a cyclic assignment of ``m`` workers it
draws ``trials`` steps of chunk durations ``τ [trials, m, load]`` from the straggler
model, runs the one stop rule (:func:`jaxgc.protocols.stop_time`, the vectorised
completion time) and the protocol's own solve at the state it stops in (its senders),
and prices the messages with the network model (:func:`jaxgc.network.step_comm_time`):

``step time = stop + comm``, ``E[step time]`` and its 95th percentile over the draws.

Two stages, so a map over model sizes and bandwidths costs one simulation:
:func:`simulate` (the stop times and sender counts, independent of ``d`` and the network)
and :func:`rank` (prices them for one ``d`` and network). :func:`plan` does both.

Backup workers drop ``num_backup`` workers' chunks every step (an inexact gradient); they
are ranked on time alone, as a deployment would compare them. Uncoded and backup workers
run at load 1 and ``ℓ = 1`` whatever the grid says.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np

from jaxgc import assignments, protocols, timing
from jaxgc import network as _network

__all__ = [
    "Candidate", "Simulated", "DEFAULT_PROTOCOLS", "DEFAULT_LOADS", "DEFAULT_ELLS",
    "candidates", "simulate", "rank", "plan", "check_num_params",
]

DEFAULT_PROTOCOLS = ("partial_straggler", "original", "uncoded", "backup_workers")
DEFAULT_LOADS = (2, 3, 4, 6)
DEFAULT_ELLS = (1, 2, 3)
_ONE_COPY = ("uncoded", "backup_workers")      # each chunk computed once, load 1, ℓ = 1


class Candidate(NamedTuple):
  """One deployment: protocol name, load, ``ℓ`` and ``num_backup`` (backup workers only)."""
  protocol: str
  load: int
  ell: int
  num_backup: int | None = None


class Simulated(NamedTuple):
  """A candidate's simulated steps: stop times, first-round senders and whether the
  gradient is exact at the stop, ``[trials]`` each."""
  candidate: Candidate
  stop: np.ndarray
  senders: np.ndarray
  protocol: Any
  exact: np.ndarray


def check_num_params(num_params) -> int:
  """``d`` as an int; a ``ValueError`` naming ``num_params`` unless a positive whole number."""
  ok = (not isinstance(num_params, bool) and isinstance(num_params, numbers.Real)
        and math.isfinite(num_params) and float(num_params) >= 1
        and float(num_params).is_integer())
  if not ok:
    raise ValueError(f"num_params must be a positive whole number of parameters (e.g. 1e9), "
                     f"got {num_params!r}.")
  return int(num_params)


def _check_grid(name: str, values, low: int = 1) -> tuple[int, ...]:
  values = tuple(values)
  if not values or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low
                       for v in values):
    raise ValueError(f"{name} must be a non-empty list of integers >= {low}, got {values!r}.")
  return tuple(sorted(set(int(v) for v in values)))


def candidates(num_workers: int, names=DEFAULT_PROTOCOLS, loads=DEFAULT_LOADS,
               ells=DEFAULT_ELLS, backups=None) -> list[Candidate]:
  """The grid: coded protocols over ``load ≤ m`` and ``ℓ ≤ load``; one-copy ones once.

  ``backups``: ``num_backup`` values for backup workers (default ``m/10`` and ``m/5``,
  at least 1).
  """
  m = num_workers
  loads = [n for n in _check_grid("loads", loads) if n <= m]
  ells = _check_grid("ells", ells)
  if backups is None:
    backups = sorted({max(1, round(f * m)) for f in (0.1, 0.2)})
  backups = [b for b in _check_grid("backups", backups) if b < m]
  out = []
  for name in names:
    if name not in protocols.PROTOCOLS:
      raise ValueError(f"unknown protocol {name!r}; choose from {sorted(protocols.PROTOCOLS)}.")
    if not cast("type[protocols.Protocol]", protocols.PROTOCOLS[name]).has_exact_mode:
      raise ValueError(f"{name} has no exact mode, so no step time to plan with; the planner "
                       "ranks exact protocols and backup_workers.")
    if name == "uncoded":
      out.append(Candidate(name, 1, 1))
    elif name == "backup_workers":
      out += [Candidate(name, 1, 1, b) for b in backups]
    elif name == "graph_code":
      out += [Candidate(name, n, 1) for n in loads]
    else:
      out += [Candidate(name, n, e) for n in loads for e in ells if e <= n]
  if not out:
    raise ValueError(f"no candidate fits num_workers={m} (loads {loads}, ells {ells}).")
  return out


def _build(c: Candidate, num_workers: int):
  asg = assignments.cyclic(num_workers, c.load)
  options = {} if c.num_backup is None else {"num_backup": c.num_backup}
  return protocols.get_protocol(c.protocol, asg, c.ell, **options)


def simulate(num_workers: int, straggler=None, grid: Sequence[Candidate] | None = None, *,
             trials: int = 1000, seed: int = 0, timeout: float | None = None,
             need_senders: bool = True) -> list[Simulated]:
  """Stop times and senders of ``trials`` simulated steps per candidate.

  The candidates of load ``δ`` share the draws ``straggler.sample(jax.random.key(seed),
  cyclic(m, δ), (trials,))`` (common random numbers: their ranking is not noise); ``straggler`` is a
  :mod:`jaxgc.timing` model (a stateful one is drawn from its stationary law) or a
  registered name (:func:`jaxgc.timing.get_straggler_model`). ``timeout``: what a step
  that never decodes costs (see :func:`jaxgc.protocols.stop_time`). Without
  ``need_senders`` (a network whose time does not depend on them) the solve is skipped.
  """
  if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)) \
      or num_workers < 2:
    raise ValueError(f"num_workers must be an integer >= 2, got {num_workers!r}.")
  if isinstance(trials, bool) or not isinstance(trials, (int, np.integer)) or trials < 1:
    raise ValueError(f"trials must be a positive integer, got {trials!r}.")
  straggler = _straggler(straggler)
  grid = candidates(num_workers) if grid is None else list(grid)
  protos = [_build(c, int(num_workers)) for c in grid]
  stops, senders, exact = _simulate_all(protos, straggler, jax.random.key(seed), int(trials),
                                        timeout, need_senders)
  return [Simulated(c, np.asarray(t, np.float64), np.asarray(s, np.float64), p, np.asarray(e))
          for c, p, t, s, e in zip(grid, protos, stops, senders, exact, strict=True)]


def _straggler(straggler):
  if straggler is None:
    return timing.get_straggler_model("slowdown")
  if isinstance(straggler, str):
    return timing.get_straggler_model(straggler)
  if not hasattr(straggler, "sample"):
    raise ValueError(f"straggler must be a jaxgc.timing model or a registered name, got "
                     f"{straggler!r}.")
  return straggler


def _simulate_all(protos, straggler, key, trials, timeout, need_senders):
  """One compiled program for the whole grid: one compile instead of one per candidate
  (a quarter of the time), and candidates of one load share their draws."""
  loads = sorted({p.assignment.max_load for p in protos})

  @jax.jit
  def run(key):
    tau = {n: straggler.sample(key, assignments.cyclic(protos[0].assignment.num_workers, n),
                               (trials,)) for n in loads}
    stops, senders, exact = [], [], []
    for p in protos:
      t = tau[p.assignment.max_load]
      stop = protocols.stop_time(p, t, "exact", timeout=timeout)
      counts = timing.progress(t, stop)
      stops.append(stop)
      exact.append(p.is_decodable(counts))
      if need_senders:
        senders.append(jnp.sum(jax.vmap(p.solve)(counts).senders, axis=-1, dtype=jnp.float32))
      else:                       # NaN: not simulated (rank refuses a network that needs them)
        senders.append(jnp.full_like(stop, jnp.nan))
    return stops, senders, exact
  return jax.device_get(run(key))


def rank(simulated: Sequence[Simulated], num_params, network=None,
         dtype=jnp.float32) -> list[dict]:
  """Rows ``{protocol, load, ell, num_backup, mean_step_time, p95_step_time, compute_time,
  comm_time, bytes_per_worker, exact_fraction}`` for gradient length ``num_params``, best
  (lowest mean step time) first. Times in seconds; ``bytes_per_worker``: one message,
  ``⌈d/ℓ⌉ · b``; ``exact_fraction``: the share of steps whose gradient is exact (0 for
  backup workers, which drop chunks; below 1 where failures make a step undecodable)."""
  d = check_num_params(num_params)
  network = _network.NoNetwork() if network is None else network
  if not isinstance(network, _network.Network):
    raise ValueError(f"network must be a jaxgc.network model, got {network!r}; build one "
                     "with jaxgc.network.get_network('ps', bandwidth=B, latency=L).")
  rows = []
  for s in simulated:
    if network.depends_on_senders and np.isnan(s.senders).any():
      raise ValueError(f"{network.name} network: its time depends on the senders, which were not "
                       "simulated; call simulate(..., need_senders=True).")
    comm = np.asarray(_network.step_comm_time(network, s.protocol, d, dtype, s.senders),
                      np.float64)
    total = s.stop + comm
    rows.append({
        "protocol": s.candidate.protocol, "load": s.candidate.load, "ell": s.candidate.ell,
        "num_backup": s.candidate.num_backup,
        "mean_step_time": float(np.mean(total)),
        "p95_step_time": float(np.percentile(total, 95)),
        "compute_time": float(np.mean(s.stop)), "comm_time": float(np.mean(comm)),
        "bytes_per_worker": _network.message_bytes(s.protocol, d, dtype),
        "exact_fraction": float(np.mean(s.exact)),
    })
  return sorted(rows, key=lambda r: (r["mean_step_time"], r["ell"], r["load"]))


def plan(num_workers: int, num_params, straggler=None, network=None, *,
         protocols=DEFAULT_PROTOCOLS, loads=DEFAULT_LOADS, ells=DEFAULT_ELLS, backups=None,
         trials: int = 1000, seed: int = 0, dtype=jnp.float32,
         timeout: float | None = None) -> list[dict]:  # pylint: disable=redefined-outer-name
  """Simulates ``E[step time]`` for every ``(protocol, load, ℓ)`` and ranks them, best first.

  Args:
    num_workers: ``m``.
    num_params: ``d``, the gradient length (e.g. ``1e9``).
    straggler: a :mod:`jaxgc.timing` model or a registered name (default: ``slowdown``,
      the experiment's default); its durations are seconds.
    network: a :mod:`jaxgc.network` model (default: none, messages free).
    protocols: protocol names of the grid (:func:`candidates`).
    loads: loads of the grid (:func:`candidates`).
    ells: ``ℓ`` values of the grid (:func:`candidates`).
    backups: backup-worker counts of the grid (:func:`candidates`).
    trials: simulated steps per candidate.
    seed: their key.
    dtype: the gradient's dtype (bytes per number).
    timeout: what a never-decodable step costs (failures), as in ``stop_time``.
  Returns:
    rows (dicts) as in :func:`rank`.
  """
  d = check_num_params(num_params)
  network = _network.NoNetwork() if network is None else network
  grid = candidates(num_workers, protocols, loads, ells, backups)
  sims = simulate(num_workers, straggler, grid, trials=trials, seed=seed, timeout=timeout,
                  need_senders=network.depends_on_senders)
  return rank(sims, d, network, dtype)

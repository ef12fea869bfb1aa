"""The planner's library: the grid, the simulation and the ranking (PROTOCOL.md §11).

Public through :mod:`jaxgc.planner`; see its docstring for the method.
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
from jaxgc import precision as _precision
from jaxgc.errors import ParamError

__all__ = [
    "Candidate", "Simulated", "DEFAULT_PROTOCOLS", "DEFAULT_LOADS", "DEFAULT_ELLS",
    "candidates", "simulate", "rank", "plan", "check_num_params", "check_message_dtypes",
]

DEFAULT_PROTOCOLS = ("partial_straggler", "original", "uncoded", "backup_workers")
DEFAULT_LOADS = (2, 3, 4, 6)
DEFAULT_ELLS = (1, 2, 3)
_ONE_COPY = ("uncoded", "backup_workers")      # each chunk computed once, load 1, ℓ = 1


class Candidate(NamedTuple):
  """One deployment: protocol name, load, ``ℓ`` and ``num_backup`` (backup workers only).

  ``ell`` may be a set (a sorted tuple) for partial_straggler: the PS chooses ``ℓ`` in it
  each step (PROTOCOL.md §14), and the set is one candidate, ranked by that rule's steps.
  """
  protocol: str
  load: int
  ell: int | tuple[int, ...]
  num_backup: int | None = None


class Simulated(NamedTuple):
  """A candidate's simulated steps: stop times, first-round senders and whether the
  gradient is exact at the stop, ``[trials]`` each. A set of ``ℓ`` keeps its draws
  (``durations``, ``[trials, m, max_load]``) and straggler model: its stop depends on
  the network and ``d``, so :func:`rank` runs its rule."""
  candidate: Candidate
  stop: np.ndarray
  senders: np.ndarray
  protocol: Any
  exact: np.ndarray
  durations: Any = None
  straggler: Any = None


def check_num_params(num_params) -> int:
  """``d`` as an int; a ``ValueError`` naming ``num_params`` unless a positive whole number."""
  ok = (not isinstance(num_params, bool) and isinstance(num_params, numbers.Real)
        and math.isfinite(num_params) and float(num_params) >= 1
        and float(num_params).is_integer())
  if not ok:
    raise ParamError(f"num_params must be a positive whole number of parameters (e.g. 1e9), "
                     f"got {num_params!r}.", "num_params")
  return int(num_params)


def _check_grid(name: str, values, low: int = 1) -> tuple[int, ...]:
  values = tuple(values)
  if not values or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low
                       for v in values):
    raise ParamError(f"{name} must be a non-empty list of integers >= {low}, got {values!r}.",
                     name)
  return tuple(sorted(set(int(v) for v in values)))


def candidates(num_workers: int, names=DEFAULT_PROTOCOLS, loads=DEFAULT_LOADS,
               ells=DEFAULT_ELLS, backups=None, ell_sets=()) -> list[Candidate]:
  """The grid: coded protocols over ``load ≤ m`` and ``ℓ ≤ load``; one-copy ones once.

  ``backups``: ``num_backup`` values for backup workers (default ``m/10`` and ``m/5``,
  at least 1). ``ell_sets``: sets of ``ℓ`` (e.g. ``[(1, 2, 4)]``), each one
  partial_straggler candidate per load ``≥ max(set)`` (PROTOCOL.md §14).

  Raises:
    jaxgc.errors.ParamError: (a ``ValueError``) an unknown or inexact protocol
      (``param="protocols"``), or a coded protocol left with no candidate: no load fits
      ``num_workers`` (``"loads"``) or no ``ℓ`` fits a load (``"ells"``).
  """
  m = num_workers
  given_loads = _check_grid("loads", loads)
  loads = [n for n in given_loads if n <= m]
  ells = _check_grid("ells", ells)
  if backups is None:
    backups = sorted({max(1, round(f * m)) for f in (0.1, 0.2)})
  backups = [b for b in _check_grid("backups", backups) if b < m]
  out, empty = [], []
  for name in names:
    if name not in protocols.PROTOCOLS:
      raise ParamError(f"unknown protocol {name!r}; choose from {sorted(protocols.PROTOCOLS)}.",
                       "protocols")
    if not cast("type[protocols.Protocol]", protocols.PROTOCOLS[name]).has_exact_mode:
      raise ParamError(f"{name} has no exact mode, so no step time to plan with; the planner "
                       "ranks exact protocols and backup_workers.", "protocols")
    if name == "uncoded":
      row = [Candidate(name, 1, 1)]
    elif name == "backup_workers":
      row = [Candidate(name, 1, 1, b) for b in backups]
    elif name == "graph_code":
      row = [Candidate(name, n, 1) for n in loads]
    else:
      row = [Candidate(name, n, e) for n in loads for e in ells if e <= n]
      if name == "partial_straggler":
        row += [Candidate(name, n, s) for s in _check_sets(ell_sets) for n in loads
                if max(s) <= n]
    out += row
    empty += [] if row or name in _ONE_COPY else [name]
  if empty:
    # A coded protocol the caller asked for must not vanish from the table unseen.
    raise _no_coded_candidate(empty, m, loads, ells, given_loads)
  if not out:
    raise ParamError(f"no candidate fits num_workers={m} (loads {loads}, ells {ells}).",
                     "loads")
  return out


def _no_coded_candidate(names: list[str], m: int, loads: list[int], ells: tuple[int, ...],
                        given_loads: tuple[int, ...]) -> ParamError:
  """``loads`` (none fits ``m``) or ``ells`` (none fits a load): what leaves ``names`` empty."""
  if not loads:
    return ParamError(
        f"no coded candidate for {', '.join(names)}: every load in {list(given_loads)} exceeds "
        f"num_workers={m}; pass loads <= {m}.", "loads")
  bigger = f" or a load in {min(ells)}..{m}" if min(ells) <= m else ""
  return ParamError(
      f"no coded candidate for {', '.join(names)}: each needs ell <= load, but ells "
      f"{list(ells)} are all above loads {loads}; pass an ell <= {max(loads)}{bigger}.", "ells")


def _check_sets(ell_sets) -> list[tuple[int, ...]]:
  """``ell_sets`` as sorted tuples (:func:`jaxgc.protocols.dynamic_ell.check_ells`)."""
  try:
    return [protocols.dynamic_ell.check_ells(tuple(s)) for s in ell_sets]
  except (TypeError, ValueError) as e:
    raise ParamError(f"ell_sets must be sets of positive integers such as [(1, 2, 4)], got "
                     f"{ell_sets!r} ({e}).", "ell_sets") from None


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
    raise ParamError(f"num_workers must be an integer >= 2, got {num_workers!r}.",
                     "num_workers")
  if isinstance(trials, bool) or not isinstance(trials, (int, np.integer)) or trials < 1:
    raise ParamError(f"trials must be a positive integer, got {trials!r}.", "trials")
  straggler = _straggler(straggler)
  grid = candidates(num_workers) if grid is None else list(grid)
  protos = [_build(c, int(num_workers)) for c in grid]
  stops, senders, exact, draws = _simulate_all(protos, straggler, jax.random.key(seed),
                                               int(trials), timeout, need_senders)
  return [Simulated(c, np.asarray(t, np.float64), np.asarray(s, np.float64), p, np.asarray(e),
                    *((draws[p.assignment.max_load], straggler)
                      if isinstance(p, protocols.DynamicEll) else ()))
          for c, p, t, s, e in zip(grid, protos, stops, senders, exact, strict=True)]


def _straggler(straggler):
  if straggler is None:
    return timing.get_straggler_model("slowdown")
  if isinstance(straggler, str):
    return timing.get_straggler_model(straggler)
  if not hasattr(straggler, "sample"):
    raise ParamError(f"straggler must be a jaxgc.timing model or a registered name, got "
                     f"{straggler!r}.", "straggler")
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
    # The draws of the loads a set of ℓ uses: rank() runs its rule on them.
    dynamic = {p.assignment.max_load for p in protos if isinstance(p, protocols.DynamicEll)}
    return stops, senders, exact, {n: tau[n] for n in dynamic}
  return jax.device_get(run(key))


def _dynamic_steps(s: Simulated, d: int, network, dtype, wire: str):
  """``(stop + comm, stop, comm, exact)`` ``[trials]`` of a set of ``ℓ``: the causal rule
  (:func:`jaxgc.protocols.choose_ell`) on the candidate's draws, with this network."""
  proto = s.protocol
  comm = protocols.dynamic_ell.comm_model(network, proto, d, dtype, wire)
  scenarios = protocols.dynamic_ell.scenarios_of(s.straggler, proto.assignment)

  @jax.jit
  def run(tau):
    c = jax.vmap(lambda t: protocols.choose_ell(proto, t, scenarios, comm))(tau)
    counts = timing.progress(tau, c.stop)
    senders = jnp.sum(counts > 0, axis=-1)
    per = jnp.stack([comm(k, senders) for k in range(len(proto.ells))])
    cost = per[c.member, jnp.arange(tau.shape[0])]
    exact = jnp.stack([p.is_decodable(counts) for p in proto.members])[c.member,
                                                                        jnp.arange(tau.shape[0])]
    return c.stop, cost, exact
  stop, comm_time, exact = (np.asarray(x, np.float64) for x in run(jnp.asarray(s.durations)))
  return stop + comm_time, stop, comm_time, exact


def check_message_dtypes(message_dtypes) -> tuple[str, ...]:
  """The precisions to plan with, in :data:`jaxgc.precision.MESSAGE_DTYPES` order
  (``None``: ``("float32",)``); a ``ParamError`` naming ``message_dtypes`` otherwise."""
  if message_dtypes is None:
    return ("float32",)
  values = (message_dtypes,) if isinstance(message_dtypes, str) else tuple(message_dtypes)
  try:
    names = {_precision.check_message_dtype(v) for v in values}
  except ParamError as e:
    raise ParamError(e.message.replace("message_dtype", "message_dtypes", 1),
                     "message_dtypes") from None
  if not names:
    raise ParamError(f"message_dtypes must name at least one of "
                     f"{list(_precision.MESSAGE_DTYPES)}.", "message_dtypes")
  return tuple(n for n in _precision.MESSAGE_DTYPES if n in names)


def rank(simulated: Sequence[Simulated], num_params, network=None,
         dtype=jnp.float32, message_dtypes=None) -> list[dict]:
  """Rows ``{protocol, load, ell, num_backup, message_dtype, mean_step_time, p95_step_time,
  compute_time, comm_time, bytes_per_worker, exact_fraction, precision_eps}`` for gradient
  length ``num_params``, best (lowest mean step time) first. Times in seconds;
  ``bytes_per_worker``: one message, ``⌈d/ℓ⌉ · b``; ``exact_fraction``: the share of steps
  whose gradient is exact (0 for backup workers, which drop chunks; below 1 where failures
  make a step undecodable).

  ``message_dtypes``: the precisions on the wire to choose from together with ``ℓ``
  (PROTOCOL.md §15; default float32 only): one row per candidate and precision, the
  messages priced by their real bytes (:func:`jaxgc.network.message_bytes`). A lower
  precision only shortens the messages; its cost is the decode error, about
  ``condition number × precision_eps`` (:func:`jaxgc.precision.epsilon`), so
  among equal times the higher precision ranks first.
  """
  d = check_num_params(num_params)
  wires = check_message_dtypes(message_dtypes)
  network = _network.NoNetwork() if network is None else network
  if not isinstance(network, _network.Network):
    raise ParamError(f"network must be a jaxgc.network model, got {network!r}; build one "
                     "with jaxgc.network.get_network('ps', bandwidth=B, latency=L).", "network")
  rows = []
  for s in simulated:
    if network.depends_on_senders and np.isnan(s.senders).any():
      raise ValueError(f"{network.name} network: its time depends on the senders, which were not "
                       "simulated; call simulate(..., need_senders=True).")
    for wire in wires:     # one simulation: the precision changes the messages only
      stop, exact = s.stop, s.exact
      if s.durations is not None:
        total, stop, comm, exact = _dynamic_steps(s, d, network, dtype, wire)
      else:
        comm = np.asarray(_network.step_comm_time(network, s.protocol, d, dtype, s.senders,
                                                  message_dtype=wire), np.float64)
        total = s.stop + comm
      rows.append({
          "protocol": s.candidate.protocol, "load": s.candidate.load, "ell": s.candidate.ell,
          "num_backup": s.candidate.num_backup, "message_dtype": wire,
          "mean_step_time": float(np.mean(total)),
          "p95_step_time": float(np.percentile(total, 95)),
          "compute_time": float(np.mean(stop)), "comm_time": float(np.mean(comm)),
          # A set of ℓ: its largest message (the smallest ℓ).
          "bytes_per_worker": _network.message_bytes(s.protocol, d, dtype, wire),
          "exact_fraction": float(np.mean(exact)),
          "precision_eps": _precision.epsilon(wire),
      })
  # A set of ℓ sorts by its smallest ℓ among equal times.
  return sorted(rows, key=lambda r: (r["mean_step_time"], min(_as_tuple(r["ell"])), r["load"],
                                     r["precision_eps"]))


def _as_tuple(ell) -> tuple:
  return ell if isinstance(ell, tuple) else (ell,)


def plan(num_workers: int, num_params, straggler=None, network=None, *,
         protocols=DEFAULT_PROTOCOLS, loads=DEFAULT_LOADS, ells=DEFAULT_ELLS, backups=None,
         trials: int = 1000, seed: int = 0, dtype=jnp.float32,
         timeout: float | None = None,
         message_dtypes=None, ell_sets=()) -> list[dict]:  # pylint: disable=redefined-outer-name
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
    message_dtypes: the messages' precisions to choose from with ``ℓ`` (e.g.
      ``("float32", "bfloat16")``; default float32 only), as in :func:`rank`.
    ell_sets: sets of ``ℓ`` chosen per step (e.g. ``[(1, 2, 4)]``), each ranked as one
      partial_straggler candidate by its causal rule's step times (PROTOCOL.md §14).
  Returns:
    rows (dicts) as in :func:`rank`.
  """
  d = check_num_params(num_params)
  check_message_dtypes(message_dtypes)      # before the simulation, not after it
  network = _network.NoNetwork() if network is None else network
  grid = candidates(num_workers, protocols, loads, ells, backups, ell_sets)
  sims = simulate(num_workers, straggler, grid, trials=trials, seed=seed, timeout=timeout,
                  need_senders=network.depends_on_senders)
  return rank(sims, d, network, dtype, message_dtypes)

"""Loads matched to the workers' speeds (PROTOCOL.md §17): :func:`by_speed`."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxgc.assignments._core import ASSIGNMENTS, Assignment, _check_sizes, cyclic
from jaxgc.errors import ParamError

__all__ = ["by_speed", "speed_loads"]

# -- loads matched to speeds (PROTOCOL.md §17) -----------------------------------

def by_speed(speeds, load: int, load_min: int | None = None,
             max_load: int | None = None) -> Assignment:
  """Unequal loads ``δ_j ∝ speeds[j]`` over ``N = m`` chunks, total work ``N·load``.

  **Loads.** ``δ_j = clip(λ·s_j, 1, N)`` rounded by largest remainder, with ``λ``
  set so that ``Σ_j δ_j = N·load``: proportional up to rounding, monotone in the
  speed, at most ``max_load`` (default and at most ``N``: a worker holds a chunk once)
  and at least 1 (a worker
  given nothing is never observed again, so an adaptive PS could not see it recover).

  **Lists.** Slot ``t`` of worker ``j`` would finish at ``(t+1)/s_j`` at its speed.
  Slots are filled in that time order, each with the least-covered chunk the worker
  does not hold yet (ties: the first one after the worker's previous chunk on the
  ring, starting from its anchor ``⌊N·Σ_{i<j} s_i / Σ s⌋``). At the nominal speeds
  coverage then grows as evenly in time as the fleet allows, which is what the oracle
  bound (§4) assumes; with equal speeds this is exactly :func:`cyclic`. The list
  order is the processing order.

  **Replication.** Afterwards every chunk held by fewer than ``load_min`` workers takes a
  slot from a chunk held by more than ``load_min`` (one always exists while the total
  is ``N·load``), at a worker that holds the second but not the first. The default
  ``load_min = load`` gives every chunk exactly ``load`` holders, as the equal-load
  cyclic code: §17 asks for at least ``max(L)`` holders (every ``ℓ ≤ load`` stays
  decodable) and §16 keeps ``δ`` holders per chunk so the straggler tolerance, any
  ``load − ℓ`` workers lost, is kept. A smaller ``load_min`` keeps more of the
  time-ordered layout and tolerates only ``load_min − ℓ`` lost workers.

  Args:
    speeds: ``[m]`` positive finite relative speeds (chunks per unit of time; only
      ratios matter), e.g. ``1 / mean chunk duration``.
    load: the equal-load code's ``δ``, ``1..m``: total work ``m·load``.
    load_min: least number of holders per chunk, ``1..load`` (default ``load``).
    max_load: cap on every load, ``load..N`` (default ``N``).
  """
  s = _check_speeds(speeds)
  m = n = len(s)
  if not isinstance(load, (int, np.integer)) or isinstance(load, bool) or not 1 <= load <= m:
    raise ParamError(f"by_speed: load must be an integer in 1..num_workers={m} (the equal "
                     f"load whose total work N·load is kept), got {load!r}.", "load")
  load_min = int(load) if load_min is None else load_min
  if (not isinstance(load_min, (int, np.integer)) or isinstance(load_min, bool)
      or not 1 <= load_min <= load):
    raise ParamError(
        f"by_speed: load_min must be an integer in 1..load={load} (a total of N·load "
        f"slots cannot give every chunk more than load holders), got {load_min!r}.", "load_min")
  cap = n if max_load is None else max_load
  if (not isinstance(cap, (int, np.integer)) or isinstance(cap, bool)
      or not load <= cap <= n):
    raise ParamError(f"by_speed: max_load must be an integer in load..N = {load}..{n}, got "
                     f"{max_load!r}.", "max_load")
  loads = speed_loads(s, n * int(load), int(cap))
  order = _time_ordered_lists(s, loads, n)
  order = _raise_replication(order, n, int(load_min))
  kind = "cyclic" if (loads == load).all() and np.array_equal(
      order, cyclic(m, int(load)).order) else "by_speed"
  return Assignment(order, n, kind)


def speed_loads(speeds, total: int, cap: int) -> np.ndarray:
  """Integer loads ``[m]``: ``clip(λ·s_j, 1, cap)`` rounded to sum to ``total``.

  ``λ`` solves ``Σ_j clip(λ·s_j, 1, cap) = total`` (bisection; the sum is monotone in
  ``λ``); the floors are topped up by largest remainder, ties to the faster worker,
  then the lower index, so the loads are monotone in the speed. Needs
  ``m ≤ total ≤ m·cap``.
  """
  s = np.asarray(speeds, np.float64)
  m = len(s)
  if not m <= total <= m * cap:
    raise ValueError(f"speed_loads: total={total} must be in [m, m·cap] = [{m}, {m * cap}].")
  lo, hi = 0.0, cap / s.min()
  for _ in range(200):
    lam = (lo + hi) / 2
    if np.clip(lam * s, 1, cap).sum() < total:
      lo = lam
    else:
      hi = lam
  x = np.clip(hi * s, 1, cap)
  base = np.minimum(np.floor(x + 1e-9), cap).astype(np.int64)
  extra = total - int(base.sum())
  # Largest remainder first; ties to the faster, then the lower-indexed worker.
  rank = np.lexsort((np.arange(m), -s, -(x - base)))
  open_ = rank[base[rank] < cap]
  if extra < 0 or extra > len(open_):
    raise AssertionError(f"speed_loads: rounding left {extra} slots")   # cannot happen
  base[open_[:extra]] += 1
  return base.astype(np.int32)


def _check_speeds(speeds) -> np.ndarray:
  try:
    s = np.asarray(speeds, np.float64)
  except (TypeError, ValueError):
    s = np.asarray([np.nan])
  if s.ndim != 1 or len(s) < 1:
    raise ParamError(f"by_speed: speeds must be a 1-D sequence with one entry per worker, "
                     f"got shape {s.shape}.", "speeds")
  bad = ~np.isfinite(s) | (s <= 0)
  if bad.any():
    j = int(np.argmax(bad))
    raise ParamError(
        f"by_speed: speeds must be positive and finite (relative chunks per unit time), got "
        f"speeds[{j}]={s[j]!r}; give a failed worker a small speed, or drop it.", "speeds")
  return s


def _time_ordered_lists(s: np.ndarray, loads: np.ndarray, n: int) -> np.ndarray:
  """Greedy list scheduling (see :func:`by_speed`): ``order`` int32 ``[m, max(loads)]``."""
  m = len(s)
  width = int(loads.max())
  events = [(t + 1) / s[j] for j in range(m) for t in range(loads[j])]
  owner = np.repeat(np.arange(m), loads)
  # Time order; simultaneous slots go to the lower-indexed worker first (cyclic's tie).
  seq = owner[np.lexsort((owner, np.round(np.asarray(events), 12)))]
  anchor = (np.floor(n * (np.cumsum(s) - s) / s.sum() + 1e-9).astype(np.int64)) % n
  order = np.full((m, width), -1, np.int32)
  cov = np.zeros(n, np.int64)
  held = np.zeros((m, n), bool)
  fill = np.zeros(m, np.int64)
  ring = np.arange(n)
  big = np.iinfo(np.int64).max
  for p in seq:
    key = np.where(held[p], big, cov * n + (ring - anchor[p]) % n)
    c = int(np.argmin(key))
    order[p, fill[p]] = c
    fill[p] += 1
    held[p, c] = True
    cov[c] += 1
    anchor[p] = (c + 1) % n
  return order


def _raise_replication(order: np.ndarray, n: int, load_min: int) -> np.ndarray:
  """Moves slots from chunks above ``load_min`` holders to chunks below it, in place of the
  latest such slot (so the early, time-balanced part of the lists is kept)."""
  order = order.copy()
  while True:
    cov = np.bincount(order[order >= 0], minlength=n)
    low = np.flatnonzero(cov < load_min)
    if not len(low):
      return order
    a = int(low[np.argmin(cov[low])])
    held_a = (order == a).any(axis=1)
    # Donor slots: a chunk above load_min, at a worker without chunk a; latest slot first.
    donor = (order >= 0) & (cov[np.maximum(order, 0)] > load_min) & ~held_a[:, None]
    if not donor.any():
      raise AssertionError("by_speed: no donor slot")   # cannot happen: see by_speed
    w, t = np.nonzero(donor)
    i = np.lexsort((-cov[order[w, t]], -t))[0]
    order[w[i], t[i]] = a


@ASSIGNMENTS.register("by_speed")
def _by_speed_config(num_workers: int, load: int, speeds: Sequence[float] | None = None,
                     load_min: int | None = None) -> Assignment:
  """:func:`by_speed` as a registry entry; ``speeds`` unset: all equal (:func:`cyclic`)."""
  _check_sizes(num_workers, load)
  given = np.ones(num_workers) if speeds is None else speeds
  if len(np.atleast_1d(np.asarray(given, dtype=object))) != num_workers:
    raise ParamError(f"by_speed: speeds must have one entry per worker (num_workers="
                     f"{num_workers}), got {speeds!r}.", "speeds")
  return by_speed(given, load, load_min)

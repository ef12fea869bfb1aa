"""Swap local search for a small ``Q_max`` (large or ``ℓ > 1`` instances)."""
from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from jaxgc.assignments import Assignment
from jaxgc.ordering.qmax import terms as chunk_terms_of
from jaxgc.ordering.qmax import topk_sum

__all__ = ["local_search", "MAX_RESTARTS"]

MAX_RESTARTS = 200   # kicks before the search gives up (besides time and target)


class _Instance(NamedTuple):
  """What a swap's score needs from the assignment, precomputed once."""
  k: int                  # ℓ − 1
  loads: np.ndarray       # [m] δ_j
  holders: np.ndarray     # [N, r] W(i), 0 where padded
  valid: np.ndarray       # [N, r] the holder entry is real
  holder_loads: np.ndarray  # [N, r] δ_j of each holder, 0 where padded
  outside: np.ndarray     # [N] Σ_{j∉W(i)} δ_j
  column: np.ndarray      # [m, N] index of j in chunk i's holder row (−1: not a holder)

  @classmethod
  def build(cls, assignment: Assignment, k: int) -> _Instance:
    loads = assignment.loads.astype(np.int64)
    hw, _ = assignment.holders
    valid = hw >= 0
    hw0 = np.where(valid, hw, 0)
    hload = np.where(valid, loads[hw0], 0)
    column = np.full((assignment.num_workers, assignment.num_chunks), -1, np.int64)
    ci, cc = np.nonzero(valid)
    column[hw[ci, cc], ci] = cc
    return cls(k, loads, hw0, valid, hload, loads.sum() - hload.sum(1), column)


class _State:
  """An ordering, its ``term_i`` and the objective ``(max term, #at max, Σ term²)``.

  The count at the max and the sum of squares break ties, so the search can
  make progress on plateaus of the max.
  """

  def __init__(self, inst: _Instance, order: np.ndarray):
    self.inst = inst
    self.order = np.array(order, np.int64)
    self.reset(self.order)

  def reset(self, order: np.ndarray) -> None:
    """Adopts ``order`` and recomputes everything from it."""
    self.order[:] = order
    self.pos0 = np.full(self.inst.column.shape, -1, np.int64)
    w, t = np.nonzero(self.order >= 0)
    self.pos0[w, self.order[w, t]] = t
    self.recount()

  def recount(self) -> None:
    self.terms = chunk_terms_of(self.pos0, self.inst.loads, self.inst.k)
    self.hist = np.bincount(self.terms, minlength=int(self.inst.loads.sum()) + 1)
    self.sq = int((self.terms ** 2).sum())

  def key(self) -> tuple[int, int, int]:
    top = int(self.terms.max())
    return top, int(self.hist[top]), self.sq

  def swap(self, j: int, x: int, y: int) -> tuple[int, int]:
    """Swaps slots ``x`` and ``y`` of worker ``j`` (terms not updated); returns the chunks."""
    i1, i2 = int(self.order[j, x]), int(self.order[j, y])
    self.order[j, x], self.order[j, y] = i2, i1
    self.pos0[j, i1], self.pos0[j, i2] = y, x
    return i1, i2

  def improve(self, j: int) -> bool:
    """Makes the best swap of two slots of worker ``j`` if it lowers :meth:`key`.

    Only the two chunks swapped change ``term``, so all ``δ_j(δ_j−1)/2`` swaps
    are scored at once: ``tq[a, b]`` is chunk ``a``'s term with ``a`` at slot ``b``.
    """
    inst, terms, hist = self.inst, self.terms, self.hist
    d = int(inst.loads[j])
    cs = self.order[j, :d]
    v = inst.valid[cs][:, None, :]
    pq = np.broadcast_to(self.pos0[inst.holders[cs], cs[:, None]][:, None, :],
                         (d, d, inst.holders.shape[1])).copy()
    pq[np.arange(d)[:, None], np.arange(d)[None, :], inst.column[j, cs][:, None]] = np.arange(d)
    tq = (inst.outside[cs][:, None] + np.where(v, pq, 0).sum(-1)
          + topk_sum(np.where(v, inst.holder_loads[cs][:, None, :] - pq, 0), inst.k, axis=-1))
    a, b = np.triu_indices(d, 1)
    ca, cb = cs[a], cs[b]
    new_a, new_b = tq[a, b], tq[b, a]
    old_a, old_b = terms[ca], terms[cb]
    # The max over the chunks not swapped: one of the three largest terms.
    others = np.full(len(a), -1, np.int64)
    for c in np.argsort(terms)[::-1][:3][::-1]:   # later (larger) entries overwrite
      others = np.where((ca != c) & (cb != c), np.maximum(others, terms[c]), others)
    new_max = np.maximum(others, np.maximum(new_a, new_b))
    new_count = (hist[new_max] - (old_a == new_max) - (old_b == new_max)
                 + (new_a == new_max) + (new_b == new_max))
    new_sq = self.sq - old_a ** 2 - old_b ** 2 + new_a ** 2 + new_b ** 2
    best = int(np.lexsort((new_sq, new_count, new_max))[0])
    if (new_max[best], new_count[best], new_sq[best]) >= self.key():
      return False
    i1, i2 = self.swap(j, int(a[best]), int(b[best]))
    for i, new in ((i1, int(new_a[best])), (i2, int(new_b[best]))):
      hist[terms[i]] -= 1
      hist[new] += 1
      terms[i] = new
    self.sq = int(new_sq[best])
    return True


def _kick(state: _State, movable: np.ndarray, rng) -> None:
  """Moves one to three of the worst chunks to random slots of one of their holders."""
  inst = state.inst
  worst = np.nonzero(state.terms == state.terms.max())[0]
  for _ in range(int(rng.integers(1, 4))):
    i = int(rng.choice(worst))
    hs = ([int(h) for h in inst.holders[i][inst.valid[i]] if inst.loads[h] >= 2]
          or [int(rng.choice(movable))])
    j = int(rng.choice(hs))
    x = int(state.pos0[j, i]) if state.pos0[j, i] >= 0 else int(rng.integers(inst.loads[j]))
    y = int(rng.integers(inst.loads[j] - 1))
    y += y >= x
    state.swap(j, x, y)
  state.recount()


def local_search(assignment: Assignment, k: int, start: np.ndarray, *, target: int,
                 time_limit: float, seed: int, max_restarts: int = MAX_RESTARTS) -> np.ndarray:
  """Best ordering ``[m, max_load]`` found by swaps from ``start``, with kicks; ``k = ℓ − 1``.

  Descends (each worker's best swap, workers in random order) until no swap
  helps, then kicks the best ordering so far and descends again. Stops at
  ``target`` (a lower bound on ``max term``), ``time_limit`` seconds, or
  ``max_restarts`` kicks.
  """
  rng = np.random.default_rng(seed)
  deadline = time.perf_counter() + time_limit
  inst = _Instance.build(assignment, k)
  state = _State(inst, start)
  best_order, best_key = state.order.copy(), state.key()
  movable = np.nonzero(inst.loads >= 2)[0]
  if len(movable) == 0:
    return state.order
  for restart in range(max_restarts + 1):
    improved = True
    while improved and time.perf_counter() < deadline:
      improved = False
      for j in rng.permutation(movable):
        improved |= state.improve(int(j))
    if state.key() < best_key:
      best_order, best_key = state.order.copy(), state.key()
    if best_key[0] <= target or time.perf_counter() >= deadline or restart == max_restarts:
      break
    state.reset(best_order)
    _kick(state, movable, rng)
  return best_order

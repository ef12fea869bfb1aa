"""A deterministic fault schedule: which worker fails at which step.

``fail_at = ((worker, step), ...)`` says that worker ``worker`` fails at step
``step``: it finishes none of its chunks in that step (every chunk duration is
``+inf``) and sends nothing. The SPMD step simulates it; the Ray backend kills
the actor that hosts the worker at the start of that step, so what follows (the
actor's restart, the steps it misses) is real. Random faults come from the
straggler model (:class:`jaxgc.timing.Failures`); a schedule is for tests and
benchmarks that must see the same faults every run.

Shapes: ``mask(schedule, step, m) -> bool [m]``; ``schedule.table [S, m]`` for
the steps ``0..S-1`` that the schedule names.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxgc.errors import ParamError

__all__ = ["FaultSchedule", "fault_schedule", "mask"]


class FaultSchedule(NamedTuple):
  """Validated ``(worker, step)`` pairs, sorted by step then worker, without repeats."""
  pairs: tuple[tuple[int, int], ...] = ()
  num_workers: int = 0

  @property
  def num_steps(self) -> int:
    """One past the last step that has a fault (0 for an empty schedule)."""
    return 1 + max((s for _, s in self.pairs), default=-1)

  @property
  def table(self) -> np.ndarray:
    """``bool [num_steps, m]``: ``table[s, j]`` is True when worker ``j`` fails at step ``s``."""
    t = np.zeros((self.num_steps, self.num_workers), bool)
    for w, s in self.pairs:
      t[s, w] = True
    return t

  def workers_at(self, step: int) -> tuple[int, ...]:
    """The workers that fail at ``step`` (host-side, for the Ray backend's kills)."""
    return tuple(w for w, s in self.pairs if s == step)


def _as_int(x, what: str) -> int:
  if isinstance(x, bool) or not float(x).is_integer():
    raise ParamError(f"fail_at: {what} must be an integer, got {x!r}.", "fail_at")
  return int(x)


def fault_schedule(fail_at: Iterable | FaultSchedule | None, num_workers: int) -> FaultSchedule:
  """Checks ``fail_at`` (``[(worker, step), ...]``) against ``num_workers``.

  Raises:
    ValueError: a pair that is not two integers, a worker outside
      ``0..num_workers-1`` or a negative step, each named with the fix.
  """
  items: Iterable = fail_at.pairs if isinstance(fail_at, FaultSchedule) else (fail_at or ())
  pairs: set[tuple[int, int]] = set()
  for item in items:
    try:
      raw_w, raw_s = item
    except (TypeError, ValueError):
      raise ParamError(f"fail_at: each entry is a (worker, step) pair, got {item!r}; "
                       "write e.g. fail_at=[(3, 10), (7, 12)].", "fail_at") from None
    w, s = _as_int(raw_w, "worker"), _as_int(raw_s, "step")
    if not 0 <= w < num_workers:
      raise ParamError(f"fail_at: worker {w} is not one of the {num_workers} workers "
                       f"(0..{num_workers - 1}).", "fail_at")
    if s < 0:
      raise ParamError(f"fail_at: step {s} is negative; steps count from 0.", "fail_at")
    pairs.add((w, s))
  return FaultSchedule(tuple(sorted(pairs, key=lambda p: (p[1], p[0]))), int(num_workers))


def mask(schedule: FaultSchedule, step, num_workers: int | None = None):
  """``bool [m]``: the workers that fail at ``step`` (a traced step is fine).

  Steps past the schedule's last have no fault.
  """
  m = schedule.num_workers if num_workers is None else num_workers
  if m < schedule.num_workers:
    raise ParamError(f"fail_at: the schedule has {schedule.num_workers} workers, asked for a "
                     f"mask of {m}.", "fail_at")
  if not schedule.pairs:
    return jnp.zeros((m,), bool)
  # Extra columns are phantom workers (padding), which never fail.
  table = jnp.asarray(np.pad(schedule.table, ((0, 0), (0, m - schedule.num_workers))))
  row = jnp.clip(step, 0, table.shape[0] - 1)
  return jnp.where(step < table.shape[0], table[row], False)

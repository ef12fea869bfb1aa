"""Phase 2, the watch: the PS reads the workers' chunk reports as they come, and stops.

It stops as soon as the protocol's stop test (``completion_time`` of the
arrivals so far is finite) passes, at the wall-clock ``limit`` after dispatch,
or once nothing more can arrive. An actor that dies meanwhile makes its workers
dead for the step, and the work they had reported is erased.
"""
from __future__ import annotations

import time

import numpy as np

from jaxgc.backends.ray.liveness import ActorLiveness, actor_state
from jaxgc.backends.ray.pool import WorkerPool
from jaxgc.backends.ray.records import Seen

__all__ = ["watch"]


def watch(pool: WorkerPool, liveness: ActorLiveness, assignment, slots, stop_test, step: int,
          gens: dict, workers_of, t0: float, alive, limit: float) -> Seen:
  """What the PS saw of step ``step``'s reports, from dispatch at ``t0`` until it stopped.

  ``gens``: ``{streaming generator: actor}`` from the dispatch; ``alive`` bool
  ``[num_actors]`` (the workers of the others are dead from the start);
  ``slots[j]``: worker ``j``'s list slots in order; ``stop_test(F [m, max_load])``:
  is the state of arrival times ``F`` (``inf``: not arrived) complete;
  ``limit``: wall seconds after ``t0`` at which the PS stops anyway.
  """
  ray, a = pool.ray, assignment
  seen = Seen(a.num_workers, a.max_load, a.num_chunks)
  for h in np.flatnonzero(~alive):
    seen.dead[workers_of[h]] = True
  live = dict(gens)
  arrived = np.full((a.num_workers, a.max_load), np.inf, np.float32)  # the stop test's view
  complete = bool(stop_test(arrived))
  while live and not complete:
    left = limit - (time.perf_counter() - t0)
    if left <= 0:
      break
    ready, _ = ray.wait(list(live), num_returns=1, timeout=min(left, 0.1))
    if not ready:
      # Ray tells a generator of its actor's death a second or more late; the GCS
      # knows within milliseconds.
      for g in [g for g, h in live.items() if actor_state(
          ray, pool.actors[h])[0] in ("RESTARTING", "DEAD")]:
        _lose(liveness, step, live.pop(g), seen, arrived, workers_of)
    for g in ready:
      h = live[g]
      try:
        j, n, loss, comp, took, at = ray.get(next(g))
      except StopIteration:
        del live[g]
        continue
      except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
        _lose(liveness, step, live.pop(g), seen, arrived, workers_of)
        continue
      if seen.dead[j]:
        continue
      liveness.reported(h, step)
      seen.counts[j] = n + 1
      seen.finish[j, n] = arrived[j, n] = time.perf_counter() - t0
      seen.chunk_s[j, n], seen.compute_s[j, n], seen.worker_t[j, n] = took, comp, at
      chunk = a.order[j, slots[j][n]]
      if np.isnan(seen.losses[chunk]):
        seen.losses[chunk] = loss
    complete = bool(stop_test(arrived))
  seen.stop_wall = time.perf_counter() - t0
  seen.observed = seen.counts.copy()
  return seen


def _lose(liveness: ActorLiveness, step: int, h: int, seen: Seen, arrived, workers_of):
  """Actor ``h`` died in the watch: its workers are dead, counted work is erased."""
  liveness.failed(h, step)
  gone = np.asarray(workers_of[h])
  seen.erased[gone] |= seen.counts[gone] > 0     # counted work never to be sent
  seen.dead[gone] = True
  seen.counts[gone] = 0
  arrived[gone] = np.inf


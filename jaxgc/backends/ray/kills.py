"""Actor kills, the faults the Ray backend injects for real: ``fail_at`` at a step, a kill loop.

``fail_at`` (:func:`jaxgc.faults.fault_schedule`: the schedule, which the SPMD step
simulates) kills the actor hosting a named worker at the start of a step
(:func:`kill_scheduled`); Ray restarts it, and :class:`jaxgc.backends.ray.ActorLiveness`
follows the outage. :class:`KillLoop` is the chaos: a background thread that kills a
random live actor every ``Exp(mtbf)`` seconds, for tests and ``benchmarks/chaos.py``.
"""
from __future__ import annotations

import threading
import time

import numpy as np

from jaxgc.backends.ray.liveness import ActorLiveness, actor_state
from jaxgc.faults import FaultSchedule

__all__ = ["KillLoop", "kill_scheduled"]


def kill_scheduled(liveness: ActorLiveness, schedule: FaultSchedule, step: int) -> int:
  """Kills the actors hosting the workers ``schedule`` names at ``step``; how many.

  Worker ``j`` runs on actor ``j mod num_actors``, so one kill fails all of that
  actor's workers until Ray has restarted it.
  """
  hosts = sorted({j % len(liveness.actors) for j in schedule.workers_at(int(step))})
  return sum(liveness.kill(h, step) for h in hosts)


class KillLoop:
  """Kills a random live actor of ``actors`` every ``Exp(mtbf)`` seconds, in a thread.

  Ray restarts a killed actor (``max_restarts``). Use as a context manager, or
  ``start()`` / ``stop()``; ``kills`` lists ``(seconds since start, actor)``.

  Args:
    ray: the ``ray`` module.
    actors: actor handles (e.g. ``WorkerPool.actors``); a list is read live, so a spare that
      took over a slot is killed there, not the actor it replaced.
    mtbf: mean seconds between kills (exponential gaps).
    seed: of the gaps and the choice of actor.
    min_gap: seconds added to every gap (no two kills closer than this).
  """

  def __init__(self, ray, actors, mtbf: float, *, seed: int = 0, min_gap: float = 0.0):
    if not np.isfinite(mtbf) or mtbf <= 0:
      raise ValueError(f"mtbf must be a positive number of seconds, got {mtbf!r}.")
    self.ray, self.mtbf, self.min_gap = ray, float(mtbf), min_gap
    self.actors = actors if isinstance(actors, list) else list(actors)
    self.rng = np.random.default_rng(seed)
    self.kills: list[tuple[float, int]] = []
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _loop(self) -> None:
    t0 = time.perf_counter()
    while not self._stop.wait(self.min_gap + self.rng.exponential(self.mtbf)):
      actors = list(self.actors)     # a snapshot: the PS may swap a spare in meanwhile
      live = [h for h, a in enumerate(actors) if actor_state(self.ray, a)[0] == "ALIVE"]
      if not live:
        continue
      h = int(self.rng.choice(live))
      try:
        self.ray.kill(actors[h], no_restart=False)
      except Exception:  # pylint: disable=broad-except
        continue
      self.kills.append((time.perf_counter() - t0, h))

  def start(self) -> KillLoop:
    """Starts the killing thread; returns ``self``."""
    self._thread = threading.Thread(target=self._loop, daemon=True, name="jaxgc-kill-loop")
    self._thread.start()
    return self

  def stop(self) -> None:
    """Stops the thread and waits for it (no kill after this returns)."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()

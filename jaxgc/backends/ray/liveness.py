"""Which Ray actors are alive, and each actor outage from its death to its first report again.

The PS of :class:`jaxgc.backends.ray.RayStep` asks Ray's control store (the GCS)
at the start of each step which actors are alive. A worker whose actor is dead
or restarting gets no work and counts in the step's ``dead_workers``; its actor
gets the current parameters again in the first step after it is back. Each
outage is one :class:`Restart`: when the actor went down, when the GCS saw it
alive again, and when its first chunk report reached the PS (the moment it is
useful again), in steps and in seconds. With hot spares
(:mod:`jaxgc.backends.ray.membership`) a spare takes over the dead actor's slot: the
outage ends with the spare's first report (``Restart.spare``).
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

__all__ = ["ActorLiveness", "Restart", "actor_state", "call_each_live"]

# An actor erased for an error but never seen restarting (a transient fault, not a
# death): alive again after this many seconds of the GCS calling it ALIVE.
ERROR_GRACE_S = 5.0


def actor_state(ray, actor) -> tuple[str, int]:
  """``(state, restarts)`` of ``actor`` in the GCS: ``"ALIVE"``, ``"RESTARTING"``, ``"DEAD"``, ...

  ``("UNKNOWN", -1)`` where the GCS cannot be asked (then only errors tell).
  Ray's public state API needs the dashboard, which a local instance here does
  not start; the GCS table answers in about a millisecond without it.
  """
  try:
    from ray._private import state  # pylint: disable=import-outside-toplevel
    info = state.actors(actor_id=actor._actor_id.hex())  # pylint: disable=protected-access
  except Exception:  # pylint: disable=broad-except
    return "UNKNOWN", -1
  if not info:
    return "UNKNOWN", -1
  return str(info.get("State", "UNKNOWN")), int(info.get("NumRestarts", 0))


@dataclasses.dataclass
class Restart:
  """One outage of actor ``actor``: down at ``down_step``, useful again at ``first_report_step``.

  ``cause``: ``"fail_at"`` (killed by the fault schedule), ``"error"`` (a call
  to it failed) or ``"gcs"`` (the GCS called it not alive). ``up_s`` and
  ``first_report_s`` are seconds since ``down_at``; ``None`` until they happen.
  ``spare``: a hot spare took over the slot at ``up_step`` (the first report is the
  spare's). ``actor`` is the slot at the outage (a later shrink may renumber slots).
  """
  actor: int
  cause: str
  down_step: int
  down_at: float
  up_step: int | None = None
  up_s: float | None = None
  first_report_step: int | None = None
  first_report_s: float | None = None
  spare: bool = False

  @property
  def steps_lost(self) -> int | None:
    """Steps from the outage to the first step in which the actor reported a chunk."""
    return None if self.first_report_step is None else self.first_report_step - self.down_step


class ActorLiveness:
  """The PS's view of which actors can work: ``poll`` at each step, ``failed`` on errors.

  ``restarts`` lists every outage (:class:`Restart`), open or closed; ``lost``
  holds actors the GCS calls ``DEAD`` (out of restarts): they never come back.
  """

  def __init__(self, ray, actors):
    self.ray, self.actors = ray, actors
    self.known = [max(actor_state(ray, a)[1], 0) for a in actors]
    self.down: dict[int, Restart] = {}
    self.need: dict[int, int] = {}          # restarts the GCS must show before it is back
    self.restarts: list[Restart] = []
    self.waiting: dict[int, Restart] = {}   # up again, no report yet
    self.lost: set[int] = set()
    self.polled: int | None = None          # the step of the last poll of the GCS

  def _mark_down(self, h: int, step: int, cause: str, now: float) -> None:
    if h in self.down:
      return
    self.waiting.pop(h, None)
    ev = self.down[h] = Restart(h, cause, int(step), now)
    self.need[h] = self.known[h] + 1
    self.restarts.append(ev)

  def kill(self, h: int, step: int) -> bool:
    """Kills actor ``h`` (Ray restarts it); False when it was already down."""
    if h in self.down or h in self.lost:
      return False
    try:
      self.ray.kill(self.actors[h], no_restart=False)
    except Exception:  # pylint: disable=broad-except
      return False
    self._mark_down(h, step, "fail_at", time.perf_counter())
    return True

  def failed(self, h: int, step: int) -> None:
    """A call to actor ``h`` failed (it died, or Ray lost it): down until the GCS says otherwise."""
    self._mark_down(h, step, "error", time.perf_counter())

  def poll(self, step: int, cached: bool = False) -> np.ndarray:
    """``bool [num_actors]``: the actors to give work at ``step``, from the GCS's table.

    ``cached``: the answer of this step's last poll if nothing changed since (the PS
    polls at the step boundary, then again before the dispatch).
    """
    if cached and self.polled == step:
      return self._alive()
    now = time.perf_counter()
    for h, actor in enumerate(self.actors):
      if h in self.lost:
        continue
      state, n = actor_state(self.ray, actor)
      if state == "UNKNOWN":
        continue
      if state == "DEAD":
        self._mark_down(h, step, "gcs", now)
        self.lost.add(h)
      elif state != "ALIVE":
        self._mark_down(h, step, "gcs", now)
      elif h in self.down:
        ev = self.down[h]
        if n >= self.need[h] or (ev.cause == "error" and now - ev.down_at > ERROR_GRACE_S):
          ev.up_step, ev.up_s = int(step), now - ev.down_at
          self.waiting[h] = self.down.pop(h)
          self.known[h] = n
      elif n > self.known[h]:
        # Died and came back between two polls: an outage of unknown length.
        ev = Restart(h, "gcs", int(step), now, int(step), 0.0)
        self.restarts.append(ev)
        self.waiting[h] = ev
        self.known[h] = n
    self.polled = int(step)
    return self._alive()

  def _alive(self) -> np.ndarray:
    return np.array([h not in self.down for h in range(len(self.actors))], bool)

  def replace(self, h: int, step: int) -> None:
    """A spare now fills slot ``h`` (``actors[h]`` already swapped): the slot's outage
    waits for the spare's first report."""
    now = time.perf_counter()
    ev = self.down.pop(h, None)
    if ev is None:
      ev = Restart(h, "gcs", int(step), now)
      self.restarts.append(ev)
    ev.up_step, ev.up_s, ev.spare = int(step), now - ev.down_at, True
    self.need.pop(h, None)
    self.lost.discard(h)
    self.known[h] = max(actor_state(self.ray, self.actors[h])[1], 0)
    self.waiting[h] = ev

  def drop(self, h: int) -> None:
    """Slot ``h`` left (``actors`` already without it): later slots move down by one."""
    move = lambda d: {k - (k > h): v for k, v in d.items() if k != h}
    self.down, self.need, self.waiting = move(self.down), move(self.need), move(self.waiting)
    self.lost = {k - (k > h) for k in self.lost if k != h}
    del self.known[h]

  def add(self) -> None:
    """A new last slot (``actors`` already has it)."""
    self.known.append(max(actor_state(self.ray, self.actors[-1])[1], 0))

  def reported(self, h: int, step: int) -> None:
    """Actor ``h`` delivered a chunk report at ``step``: closes its outage, if one is open."""
    ev = self.waiting.pop(h, None)
    if ev is not None:
      ev.first_report_step, ev.first_report_s = int(step), time.perf_counter() - ev.down_at

  def wait_alive(self, step: int, timeout: float) -> np.ndarray:
    """:meth:`poll`; with no actor alive, polls again for up to ``timeout`` seconds.

    A step with no live actor could only be skipped; a restart takes seconds, so
    the PS waits for one instead of skipping a burst of steps.
    """
    alive = self.poll(step, cached=True)
    until = time.perf_counter() + timeout
    while not alive.any() and len(self.lost) < len(alive) and time.perf_counter() < until:
      time.sleep(0.05)
      alive = self.poll(step)
    return alive


def call_each_live(ray, actors, call, timeout: float) -> None:
  """Waits for ``call(actor)`` (an object ref) on every actor: one that is restarting is
  called again until ``timeout`` seconds have passed (then its error is raised), one
  dead for good is skipped (the steps run without it)."""
  pending, until = list(actors), time.perf_counter() + timeout
  while pending:
    refs = [(h, call(h)) for h in pending]
    pending = []
    for h, ref in refs:
      try:
        ray.get(ref)
      except ray.exceptions.ActorUnavailableError:     # restarting: wait for it
        if time.perf_counter() > until:
          raise
        pending.append(h)
      except ray.exceptions.RayActorError:     # dead for good
        pass
    time.sleep(0.1 if pending else 0)

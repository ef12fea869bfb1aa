"""Hot spares and elastic membership (PROTOCOL.md §16): who hosts workers, changed between steps.

The PS's **members** are ``pool.actors`` (worker ``j`` on member ``j mod len(members)``);
its **spares** are ``pool.spares``: started, JAX imported and this step's programs
compiled, hosting no worker. At each step boundary, before the step's draw,
:meth:`Membership.boundary`:

1. **takes over**: a member that is down (restarting, or dead) hands its slot to a warm
   spare, which gets the step's parameters with its dispatch; the old actor, once Ray
   has restarted it, is warmed in the background and becomes a spare;
2. **shrinks**: a member gone for good (out of restarts, or its node left and it is not
   back within :data:`GONE_AFTER_S`) with no spare to replace it leaves the membership;
3. **grows**: actors started on a node that joined (as many as its CPUs hold), once
   warm, refill the spares up to ``num_spares``; the rest join the membership.

A change of membership re-forms the code (:meth:`Membership.reform`): the same ``N``
chunks over ``m' = round(m₀·A'/A₀)`` workers (``A`` members; ``m₀`` workers on ``A₀``
actors at epoch 0), every chunk with ``load`` holders, loads ``⌊N·load/m'⌋`` or
``⌈N·load/m'⌉`` (:func:`reformed_assignment`), and the epoch advances. Each re-form is a
:class:`Reform`.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from jaxgc.assignments import Assignment
from jaxgc.assignments._speeds import _raise_replication, _time_ordered_lists, speed_loads
from jaxgc.backends.ray.liveness import actor_state

__all__ = ["GONE_AFTER_S", "Membership", "Reform", "reformed_assignment"]

# A member down this long after its node left is gone for good: Ray found no node to
# restart it on (a restart on a live node takes about 2 s).
GONE_AFTER_S = 5.0
# Seconds between two looks at the cluster's nodes (a GCS call) for one that joined.
NODE_POLL_S = 1.0


def reformed_assignment(num_chunks: int, num_workers: int, load: int) -> Assignment:
  """``N`` chunks over ``m'`` workers, every chunk held ``min(load, m')`` times (§16).

  Loads ``⌊N·load/m'⌋`` or ``⌈N·load/m'⌉``; lists as :func:`jaxgc.assignments.by_speed`
  lays them out at equal speeds (the slot that would finish first takes the
  least-covered chunk), so ``m' = N`` gives :func:`jaxgc.assignments.cyclic` itself.
  Needs ``1 ≤ m' ≤ N·load``.
  """
  n, m = int(num_chunks), int(num_workers)
  load = min(int(load), m)
  if not 1 <= m <= n * load:
    raise ValueError(f"reformed_assignment: num_workers={m} must be in 1..N·load={n * load}.")
  s = np.ones(m)
  order = _raise_replication(_time_ordered_lists(s, speed_loads(s, n * load, n), n), n, load)
  return Assignment(order, n, "cyclic" if m == n else "reformed")


@dataclasses.dataclass
class Reform:
  """One re-form at the boundary before ``step``: ``m_before`` workers became ``m_after``.

  ``why``: ``"gone"`` (a member gone for good), ``"joined"`` (a node's actors joined)
  or ``"resume"`` (a checkpoint's membership on another cluster size).
  """
  step: int
  epoch: int
  m_before: int
  m_after: int
  actors_before: int
  actors_after: int
  load: int
  why: str

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def actor_node(ray, actor) -> str | None:
  """The Ray node id of a live ``actor`` (``None`` where it is not alive or the GCS cannot
  say: a restarting actor's address names the node that is placing it, not where it ran)."""
  del ray
  try:
    from ray._private import state  # pylint: disable=import-outside-toplevel
    info = state.actors(actor_id=actor._actor_id.hex())  # pylint: disable=protected-access
  except Exception:  # pylint: disable=broad-except
    return None
  if not info or info.get("State") != "ALIVE":
    return None
  return (info.get("Address") or {}).get("NodeID") or None


class Membership:
  """The members, spares and epoch of one :class:`jaxgc.backends.ray.RayStep`.

  ``warm(actor)`` returns a Ray reference that is ready once ``actor`` compiled the
  step's programs (``None`` before the step has parameters to compile with).
  """

  def __init__(self, step, warm):
    self.step, self.warm_fn = step, warm
    self.ray, self.pool = step.pool.ray, step.pool
    a = step.assignment
    self.base_workers, self.base_actors = a.num_workers, len(self.pool.actors)
    self.num_chunks, self.load = a.num_chunks, int(a.replication.min())
    self.epoch = 0
    self.reforms: list[Reform] = []
    self.warming: dict[str, object] = {}   # actor id -> its warm-up reference, or True
    self.joining: list = []                 # started on a node that joined, not yet warm
    self.nodes = self._alive_nodes()
    self.node_poll = time.perf_counter()

  # -- actors' warmth ------------------------------------------------------------------
  @staticmethod
  def _id(actor) -> str:
    return actor._actor_id.hex()  # pylint: disable=protected-access

  def _is_warm(self, actor) -> bool:
    """Whether ``actor`` compiled this step's programs; starts its warm-up when it can."""
    ray, key = self.ray, self._id(actor)
    ref = self.warming.get(key)
    if ref is True:
      return True
    if ref is None:
      if actor_state(ray, actor)[0] != "ALIVE":
        return False
      ref = self.warm_fn(actor)
      if ref is None:
        return False
      self.warming[key] = ref
    done, _ = ray.wait([ref], timeout=0)
    if not done:
      return False
    try:
      ray.get(done[0])
    except Exception:  # pylint: disable=broad-except
      self.warming.pop(key, None)     # died meanwhile: warmed again once it is back
      return False
    self.warming[key] = True
    return True

  def warm_spares(self, timeout: float) -> None:
    """Warms every live spare and joiner now, waiting up to ``timeout`` seconds (warm-up)."""
    self.warming = {}
    until = time.perf_counter() + timeout
    waiting = list(self.pool.spares) + list(self.joining)
    while waiting and time.perf_counter() < until:
      waiting = [h for h in waiting if not self._is_warm(h)
                 and actor_state(self.ray, h)[0] in ("ALIVE", "UNKNOWN")]
      if waiting:
        time.sleep(0.05)

  def ready_spares(self) -> int:
    """How many spares are warm and alive now (one not yet warm starts its warm-up)."""
    return sum(self._is_warm(h) and actor_state(self.ray, h)[0] == "ALIVE"
               for h in self.pool.spares)

  def _tend_spares(self) -> None:
    """Drops spares that are dead for good; a restarted one starts its warm-up. (A warm
    spare is not asked again here: :meth:`_take_spare` checks it is alive.)"""
    for h in list(self.pool.spares):
      if self.warming.get(self._id(h)) is True:
        continue
      if actor_state(self.ray, h)[0] == "DEAD":
        self.pool.spares.remove(h)
        self.warming.pop(self._id(h), None)
      else:
        self._is_warm(h)

  def _take_spare(self):
    """A warm live spare, removed from the spares; ``None`` if there is none."""
    for h in self.pool.spares:
      if self._is_warm(h) and actor_state(self.ray, h)[0] == "ALIVE":
        self.pool.spares.remove(h)
        return h
    return None

  # -- nodes ---------------------------------------------------------------------------
  def _alive_nodes(self) -> dict[str, float]:
    """``{node id: its CPUs}`` of the cluster's live nodes."""
    try:
      return {n["NodeID"]: float(n.get("Resources", {}).get("CPU", 0.0))
              for n in self.ray.nodes() if n.get("Alive")}
    except Exception:  # pylint: disable=broad-except
      return dict(getattr(self, "nodes", {}))

  def _watch_nodes(self) -> None:
    """Starts actors on a node that joined since the last look (at most every
    :data:`NODE_POLL_S` seconds), as many as its CPUs hold."""
    now = time.perf_counter()
    if now - self.node_poll < NODE_POLL_S:
      return
    self.node_poll = now
    nodes = self._alive_nodes()
    for h in self.pool.actors:      # where each live member runs now (Ray may move one)
      node = actor_node(self.ray, h)
      if node is not None:
        self.pool.node_of[self._id(h)] = node
    per = float(self.pool.options.get("num_cpus", 1)) or 1.0
    for node, cpus in nodes.items():
      if node not in self.nodes:
        self.joining += [self.pool.spawn(node) for _ in range(int(cpus // per))]
    self.nodes = nodes

  def _gone(self, step: int) -> set[int]:
    """Members gone for good: out of restarts, or down past :data:`GONE_AFTER_S` with
    their node gone (killed then, so that a node joining later does not restart them)."""
    live, now = self.step.liveness, time.perf_counter()
    gone = set(live.lost)
    for h, ev in live.down.items():
      if h in gone or now - ev.down_at < GONE_AFTER_S:
        continue
      node = self.pool.node_of.get(self._id(self.pool.actors[h]))   # where it last ran
      if node is not None and node not in self._alive_nodes():
        gone.add(h)
    for h in gone:
      live.lost.add(h)
      self.pool.kill(self.pool.actors[h])
    del step
    return gone

  # -- the boundary --------------------------------------------------------------------
  def boundary(self, step: int) -> bool:
    """Takeovers, then a re-form if the membership changed; True if it re-formed."""
    pool, live = self.pool, self.step.liveness
    self._tend_spares()
    self._watch_nodes()
    alive = live.poll(step)
    joined = [h for h in self.joining if self._is_warm(h)]
    if alive.all() and not joined:
      return False
    gone = self._gone(step) if not alive.all() else set()
    for h in np.flatnonzero(~alive):
      spare = self._take_spare()
      if spare is None:
        break
      old, pool.actors[h] = pool.actors[h], spare
      live.replace(int(h), step)
      if int(h) in gone:
        gone.discard(int(h))
      else:
        pool.spares.append(old)     # warmed once Ray has restarted it
      self.warming.pop(self._id(old), None)
    m0, a0 = self.step.assignment.num_workers, len(pool.actors)
    for slot in sorted(gone, reverse=True):
      if len(pool.actors) == 1:     # the last member stays: it may yet come back
        break
      pool.actors.pop(slot)
      live.drop(slot)
    why = "gone" if len(pool.actors) < a0 else None
    for h in joined:
      self.joining.remove(h)
      if len(pool.spares) < pool.num_spares:
        pool.spares.append(h)
      else:
        pool.actors.append(h)
        live.add()
        why = why or "joined"
    if len(pool.actors) == a0:
      return False
    self.reform(step, why or "joined", m0, a0)
    return True

  def reform(self, step: int, why: str, m_before: int, actors_before: int) -> None:
    """Re-forms the code over the current members (§16) and advances the epoch."""
    a = len(self.pool.actors)
    n = self.num_chunks
    m = int(np.clip(round(self.base_workers * a / self.base_actors), 1, n * self.load))
    assignment = reformed_assignment(n, m, self.load)
    self.step.set_protocol(self.step.reform_protocol(assignment))
    self.warming = {}
    self.epoch += 1
    self.reforms.append(Reform(int(step), self.epoch, int(m_before), m, int(actors_before), a,
                               min(self.load, m), why))

  # -- checkpoints ---------------------------------------------------------------------
  def record(self) -> dict:
    """The membership a checkpoint keeps: epoch, sizes, load, the members' nodes, and the
    epoch-0 sizes ``m₀`` over ``A₀`` that set the workers per actor."""
    return {"epoch": self.epoch, "num_workers": self.step.assignment.num_workers,
            "base_workers": self.base_workers, "base_actors": self.base_actors,
            "num_actors": len(self.pool.actors), "load": min(self.load,
                                                             self.step.assignment.num_workers),
            "nodes": [self.pool.node_of.get(self._id(h)) for h in self.pool.actors]}

  def resume(self, saved: dict, step: int) -> None:
    """Continues a checkpoint's membership: its epoch and workers per actor, and a re-form
    at once if its size differs from this cluster's (why ``"resume"``), as if the cluster
    had grown or shrunk to this one while the run went on."""
    self.epoch = int(saved.get("epoch", 0))
    self.base_workers = int(saved.get("base_workers", self.base_workers))
    self.base_actors = int(saved.get("base_actors", self.base_actors))
    m, actors = int(saved.get("num_workers", 0)), int(saved.get("num_actors", 0))
    if m != self.step.assignment.num_workers or actors != len(self.pool.actors):
      self.reform(step, "resume", m, actors)

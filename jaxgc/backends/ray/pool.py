"""The pool: ``num_actors`` Ray actors hosting jaxgc workers, started once, shared by steps.

Worker ``j`` runs on actor ``j mod num_actors``. A pool also hands out one
``(token, setup)`` per loss function (:meth:`WorkerPool.program`), so steps
sharing a loss share one compile on every actor.
"""
from __future__ import annotations

import contextlib
import os
import uuid

import numpy as np

from jaxgc.backends.ray.actor import ACTOR_XLA_FLAGS, WorkerHost
from jaxgc.backends.ray.connect import connect, import_ray, one_line

__all__ = ["WorkerPool"]


class WorkerPool:
  """``num_actors`` Ray actors that host jaxgc workers; several ``RayStep`` may share one.

  Args:
    num_actors: actors to start (one per CPU, GPU or host).
    address: Ray cluster to join (see :func:`jaxgc.backends.ray.connect`); ``None`` starts a local
      instance, or uses the one this process already joined.
    actor_options: passed to ``ActorClass.options`` (e.g. ``{"num_gpus": 1}``);
      the default asks one logical CPU per actor and restarts dead actors.
    xla_flags: ``XLA_FLAGS`` of the actors' processes (``None`` leaves theirs);
      by default one CPU device and one XLA thread per actor.
    startup_timeout: seconds for the actors to start before giving up.
    connect_timeout: seconds before an unreachable ``address`` is an error.
  """

  def __init__(self, num_actors: int = 4, *, address: str | None = None,
               actor_options: dict | None = None, xla_flags: str | None = ACTOR_XLA_FLAGS,
               startup_timeout: float = 120.0, connect_timeout: float = 5.0):
    if not isinstance(num_actors, (int, np.integer)) or num_actors < 1:
      raise ValueError(f"num_actors must be a positive integer, got {num_actors!r}; set "
                       "--config.ray.num_actors.")
    ray = self.ray = import_ray()
    self.num_actors = int(num_actors)
    self.startup_timeout = float(startup_timeout)
    self._programs: dict[int, tuple] = {}
    self.owns_ray = connect(address, num_cpus=max(self.num_actors, os.cpu_count() or 1),
                            connect_timeout=connect_timeout)
    options = {"num_cpus": 1, "max_restarts": -1, **(actor_options or {})}
    cls = ray.remote(WorkerHost)
    self.actors = [cls.options(**options).remote(xla_flags) for _ in range(self.num_actors)]
    try:
      self.hosts = ray.get([a.ready.remote() for a in self.actors], timeout=startup_timeout)
    except Exception as err:  # pylint: disable=broad-except
      cpus = ray.cluster_resources().get("CPU", 0)
      self.close()
      raise ValueError(
          f"the {num_actors} Ray actors did not start within {startup_timeout:.0f} s "
          f"({one_line(err)}); the cluster has {cpus:g} CPUs for {num_actors} actors asking "
          f"{options.get('num_cpus', 1)} each. Lower --config.ray.num_actors or pass "
          "actor_options.") from None

  def program(self, loss_fn):
    """``(token, setup)`` naming ``loss_fn`` on the actors: steps sharing it share one compile."""
    if id(loss_fn) not in self._programs:     # holds loss_fn, so its id stays unique
      self._programs[id(loss_fn)] = (uuid.uuid4().hex, [self.ray.put(loss_fn)], loss_fn)
    return self._programs[id(loss_fn)][:2]

  def close(self):
    """Kills the actors, and shuts Ray down if this pool started it."""
    for a in getattr(self, "actors", []):
      with contextlib.suppress(Exception):   # already dead: nothing to kill
        self.ray.kill(a, no_restart=True)
    self.actors = []
    if self.owns_ray and self.ray.is_initialized():
      self.ray.shutdown()
    self.owns_ray = False

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

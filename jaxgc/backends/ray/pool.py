"""The pool: ``num_actors`` Ray actors hosting jaxgc workers, started once, shared by steps.

Worker ``j`` runs on actor ``j mod num_actors``. ``num_spares`` more actors start as
hot spares (``spares``): they host no worker until one of ``actors`` dies
(:mod:`jaxgc.backends.ray.membership`). A pool also hands out one
``(token, setup)`` per loss function (:meth:`WorkerPool.program`), so steps
sharing a loss share one compile on every actor.
"""
from __future__ import annotations

import contextlib
import os
import uuid

import jax
import numpy as np

from jaxgc.backends.ray.actor import ACTOR_XLA_FLAGS, WorkerHost, actor_xla_flags
from jaxgc.backends.ray.connect import connect, import_ray, one_line
from jaxgc.errors import ParamError

__all__ = ["WorkerPool"]


class WorkerPool:
  """``num_actors`` Ray actors that host jaxgc workers; several ``RayStep`` may share one.

  Args:
    num_actors: actors to start (one per CPU, GPU or host).
    address: Ray cluster to join (see :func:`jaxgc.backends.ray.connect`); ``None`` starts a local
      instance, or uses the one this process already joined.
    num_spares: hot spares started besides the ``num_actors`` (warm, hosting no worker).
    max_restarts: restarts Ray gives each actor (``None``: no limit); one out of
      restarts is gone for good (the PS re-forms the code without it).
    actor_options: passed to ``ActorClass.options`` (e.g. ``{"num_gpus": 1}``);
      the default asks one logical CPU per actor and restarts dead actors.
    xla_flags: ``XLA_FLAGS`` of the actors' processes (``None`` leaves theirs);
      by default one CPU device and one XLA thread per actor.
    startup_timeout: seconds for the actors to start before giving up.
    connect_timeout: seconds before an unreachable ``address`` is an error.
  """

  def __init__(self, num_actors: int = 4, *, num_spares: int = 0, max_restarts: int | None = None,
               address: str | None = None, actor_options: dict | None = None,
               xla_flags: str | None = ACTOR_XLA_FLAGS, startup_timeout: float = 120.0,
               connect_timeout: float = 5.0):
    if not isinstance(num_actors, (int, np.integer)) or num_actors < 1:
      raise ValueError(f"num_actors must be a positive integer, got {num_actors!r}; set "
                       "--config.ray.num_actors.")
    if not _is_int(num_spares) or num_spares < 0:
      raise ParamError(f"num_spares must be an integer >= 0 (warm actors besides num_actors), "
                       f"got {num_spares!r}; set --config.ray.num_spares.", "num_spares")
    if max_restarts is not None and (not _is_int(max_restarts) or max_restarts < 0):
      raise ParamError(f"max_restarts must be an integer >= 0 (restarts per actor; unset: no "
                       f"limit), got {max_restarts!r}; set --config.ray.max_restarts.",
                       "max_restarts")
    ray = self.ray = import_ray()
    self.num_actors, self.num_spares = int(num_actors), int(num_spares)
    self.startup_timeout = float(startup_timeout)
    self._programs: dict[int, tuple] = {}
    self.actors: list = []
    self.spares: list = []
    self.owns_ray = connect(address, num_cpus=max(self.num_actors + self.num_spares,
                                                  os.cpu_count() or 1),
                            connect_timeout=connect_timeout)
    options = self.options = {"num_cpus": 1, "max_restarts": -1 if max_restarts is None
                              else int(max_restarts), **(actor_options or {})}
    if self.num_spares:
      # Checked now: a spare Ray cannot place would only time out at startup_timeout.
      free, each = ray.available_resources().get("CPU", 0.0), float(options["num_cpus"])
      if free < (self.num_actors + self.num_spares) * each:
        self.close()
        raise ParamError(
            f"num_spares={num_spares}: {num_actors} actors and {num_spares} spares need "
            f"{(self.num_actors + self.num_spares) * each:g} CPUs, the cluster has {free:g} "
            "free; lower --config.ray.num_spares.", "num_spares")
    self._cls, self._xla_flags = ray.remote(WorkerHost), xla_flags
    started = [self._cls.options(**options).remote(xla_flags)
               for _ in range(self.num_actors + self.num_spares)]
    self.actors, self.spares = started[:self.num_actors], started[self.num_actors:]
    try:
      hosts = ray.get([a.ready.remote() for a in started], timeout=startup_timeout)
      self.hosts = hosts[:self.num_actors]
      self.node_of = {_id(a): h[2] for a, h in zip(started, hosts, strict=True)}
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

  def spawn(self, node_id: str):
    """Starts one more actor on node ``node_id`` (a node that joined); not waited for."""
    from ray.util import scheduling_strategies  # pylint: disable=import-outside-toplevel
    on_node = scheduling_strategies.NodeAffinitySchedulingStrategy(node_id, soft=False)
    actor = self._cls.options(**self.options, scheduling_strategy=on_node).remote(self._xla_flags)
    self.node_of[_id(actor)] = node_id
    return actor

  def kill(self, actor) -> None:
    """Kills ``actor`` for good (no restart); nothing if it is already dead."""
    with contextlib.suppress(Exception):   # already dead: nothing to kill
      self.ray.kill(actor, no_restart=True)

  def close(self):
    """Kills the actors and spares, and shuts Ray down if this pool started it."""
    for a in getattr(self, "actors", []) + getattr(self, "spares", []):
      self.kill(a)
    self.actors, self.spares = [], []
    if self.owns_ray and self.ray.is_initialized():
      self.ray.shutdown()
    self.owns_ray = False

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _id(actor) -> str:
  return actor._actor_id.hex()  # pylint: disable=protected-access


def device_options(model: int) -> dict:
  """A pool's options for workers of ``model`` devices: GPUs from Ray where the PS's
  JAX runs on GPU, else ``model`` host devices per CPU actor."""
  if model == 1:
    return {}
  if jax.default_backend() == "gpu":
    return {"actor_options": {"num_gpus": model}, "xla_flags": None}
  return {"xla_flags": actor_xla_flags(model)}


def check_devices(pool: WorkerPool, model: int) -> None:
  """Refuses (naming ``model``) a pool whose actors have fewer than ``model`` devices."""
  if model > 1 and pool.actors:
    have = len(pool.ray.get(pool.actors[0].devices.remote()))
    if have < model:
      raise ParamError(f"model={model}: the pool's actors have {have} device(s) each; build "
                       f"the pool with xla_flags=actor_xla_flags({model}) (CPU) or "
                       f"actor_options={{'num_gpus': {model}}}, or leave pool unset.", "model")

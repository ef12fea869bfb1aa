"""Step backends: one declared interface (:class:`StepBackend`), one registry.

``"spmd"``: :func:`jaxgc.parallel.make_coded_step` (one ``shard_map`` program,
simulated time). ``"ray"``: :class:`jaxgc.ray_backend.RayStep` (Ray actors, real
time). Both are built as ``get_backend(name)(protocol, straggler, loss_fn, tx,
mesh, **options)``; each is imported when built, so using jaxgc without Ray
never imports it.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jaxgc.backends.base import (
  STRAGGLER_INIT,
  StepBackend,
  StepDraw,
  check_step_args,
  draw_step,
  init_straggler_state,
  keep_if,
  optimizer_update,
  straggler_init_key,
)
from jaxgc.backends.capabilities import Capabilities, declare
from jaxgc.registry import Registry

__all__ = [
    "BACKENDS", "get_backend", "StepBackend", "STRAGGLER_INIT", "StepDraw", "check_step_args",
    "draw_step", "init_straggler_state", "keep_if", "optimizer_update", "straggler_init_key",
]

BACKENDS: Registry[StepBackend] = Registry("backend")


@BACKENDS.register("spmd")
@declare(Capabilities(adaptive=True, model_state=True, model_axis=True, network_model=True))
def spmd(protocol, straggler, loss_fn, tx, mesh=None, **options: Any) -> StepBackend:
  """The SPMD step: :func:`jaxgc.parallel.make_coded_step` with ``options``."""
  from jaxgc.parallel import make_coded_step  # pylint: disable=import-outside-toplevel
  return make_coded_step(protocol, straggler, loss_fn, tx, mesh, **options)


@BACKENDS.register("ray")
@declare(Capabilities(requires="ray", install="Ray: pip install 'jaxgc[ray]'"))
def ray(protocol, straggler, loss_fn, tx, mesh=None, **options: Any) -> StepBackend:
  """The Ray step: :class:`jaxgc.ray_backend.RayStep` with ``options`` (``mesh`` unused:
  the workers are actors)."""
  del mesh
  from jaxgc.ray_backend import RayStep  # pylint: disable=import-outside-toplevel
  return RayStep(protocol, straggler, loss_fn, tx, **options)


def get_backend(name: str) -> Callable[..., StepBackend]:
  """The constructor of backend ``name`` (``"spmd"`` or ``"ray"``).

  Raises:
    jaxgc.errors.ParamError: (a ``ValueError``) an unknown name; the message lists
      the registered ones.
  """
  return BACKENDS.get(name)

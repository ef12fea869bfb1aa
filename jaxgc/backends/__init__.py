"""Step backends: one declared interface (:class:`StepBackend`), one registry.

``"spmd"``: :func:`jaxgc.backends.spmd.make_coded_step` (one ``shard_map``
program, simulated time; public path :mod:`jaxgc.parallel`). ``"ray"``:
:class:`jaxgc.backends.ray.RayStep` (Ray actors, real time). Both are built as
``get_backend(name)(protocol, straggler, loss_fn, tx, mesh, **options)``; each is
imported when built, so using jaxgc without Ray never imports it. What both share:
:mod:`jaxgc.backends.base` (the interface, the state, the draw) and
:mod:`jaxgc.backends.core` (the step's rules: work slots, decode, erasures, skip,
metrics, update) and :mod:`jaxgc.precision` (the messages' precision on the wire).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jaxgc.backends.base import (
  STRAGGLER_INIT,
  StepBackend,
  StepDraw,
  TrainState,
  check_step_args,
  check_straggler,
  draw_step,
  init_straggler_state,
  keep_if,
  optimizer_update,
  straggler_init_key,
)
from jaxgc.backends.capabilities import Capabilities, declare
from jaxgc.registry import Registry

__all__ = [
    "BACKENDS", "get_backend", "StepBackend", "TrainState", "STRAGGLER_INIT", "StepDraw",
    "check_step_args", "check_straggler", "draw_step", "init_straggler_state", "keep_if",
    "optimizer_update", "straggler_init_key",
]

BACKENDS: Registry[StepBackend] = Registry("backend")


# Named spmd_step, not spmd: that name is the subpackage jaxgc.backends.spmd.
@BACKENDS.register("spmd")
@declare(Capabilities(adaptive=True, model_state=True, model_axis=True, network_model=True))
def spmd_step(protocol, straggler, loss_fn, tx, mesh=None, **options: Any) -> StepBackend:
  """The SPMD step: :func:`jaxgc.backends.spmd.make_coded_step` with ``options``."""
  from jaxgc.backends.spmd import make_coded_step  # pylint: disable=import-outside-toplevel
  return make_coded_step(protocol, straggler, loss_fn, tx, mesh, **options)


# Named ray_step, not ray: that name is the subpackage jaxgc.backends.ray.
@BACKENDS.register("ray")
@declare(Capabilities(adaptive=True, model_state=True, model_axis=True, requires="ray",
                      install="Ray: pip install 'jaxgc[ray]'"))
def ray_step(protocol, straggler, loss_fn, tx, mesh=None, **options: Any) -> StepBackend:
  """The Ray step: :class:`jaxgc.backends.ray.RayStep` with ``options``. The workers are
  actors; of ``mesh`` only its ``model`` axis counts: each worker is a group of that many
  devices of its actor (``model=``)."""
  model = dict(getattr(mesh, "shape", {})).get("model", 1)
  if model > 1:
    options.setdefault("model", model)
  from jaxgc.backends.ray import RayStep  # pylint: disable=import-outside-toplevel
  return RayStep(protocol, straggler, loss_fn, tx, **options)


def get_backend(name: str) -> Callable[..., StepBackend]:
  """The constructor of backend ``name`` (``"spmd"`` or ``"ray"``).

  Raises:
    jaxgc.errors.ParamError: (a ``ValueError``) an unknown name; the message lists
      the registered ones.
  """
  return BACKENDS.get(name)

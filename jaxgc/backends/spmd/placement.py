"""Where a step's state lives on its mesh: parameters and optimizer state placed by the
step's rule (sharded over ``model`` on a ``workers × model`` mesh, PROTOCOL.md §13),
everything else replicated.

The functions take a :class:`PlacementSpec` (the mesh, its workers axis and the rule),
which the coded and the plain step each build once; placements are cached per spec.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgc.backends.spmd.sharding import Placement, place_params
from jaxgc.memo import per_object

__all__ = ["PlacementSpec", "check_mesh", "placement", "state_sharding", "keep_placed"]


# eq=False: hashed by identity (a param_sharding pytree is not hashable), so per_object
# can key the cached placements on the spec.
@dataclasses.dataclass(frozen=True, eq=False)
class PlacementSpec:
  """Where a step puts its parameters.

  Attributes:
    mesh: the step's mesh (``workers`` and optionally ``model``).
    axis_name: its workers axis.
    param_sharding: ``None`` (the FSDP rule), a rule function or a ``PartitionSpec``
      pytree (:func:`~jaxgc.backends.spmd.sharding.place_params`).
  """
  mesh: Mesh
  axis_name: str
  param_sharding: Any = None


def check_mesh(mesh: Mesh, axis_name: str) -> None:
  """Refuses a mesh with more than the ``workers`` and ``model`` axes."""
  if len(mesh.axis_names) > 2:
    raise ValueError(f"mesh axes {tuple(mesh.axis_names)}: expected ({axis_name!r},) or "
                     f"({axis_name!r}, 'model'); build it with "
                     "jaxgc.parallel.make_mesh(n, model=k).")


def placement(spec: PlacementSpec, params) -> Placement:
  """``place_params`` of the spec's mesh and rule, cached per parameter structure."""
  leaves, treedef = jax.tree.flatten(params)
  key = (treedef, tuple((tuple(np.shape(x)), str(x.dtype)) for x in leaves))
  return per_object(spec, ("placement", key), lambda: place_params(
      params, spec.mesh, spec.param_sharding, workers_axis=spec.axis_name))


def state_sharding(spec: PlacementSpec, state, tx):
  """The :class:`~jaxgc.backends.base.TrainState` of ``NamedSharding``s: parameters and
  optimizer state (of ``tx``) as :func:`placement` puts them, everything else replicated."""
  rep = NamedSharding(spec.mesh, P())
  place = placement(spec, state.params)
  out = jax.tree.map(lambda _: rep, state)
  return out.replace(params=place.shardings, opt_state=place.opt_shardings(tx, state.opt_state))


def keep_placed(spec: PlacementSpec, state, tx):
  """The state's parameters and optimizer state constrained to their placement (a no-op on a
  1-D mesh): XLA would otherwise be free to lay out the updated state as it likes."""
  place = placement(spec, state.params)
  if not place.sharded:
    return state
  shard = state_sharding(spec, state, tx)
  put = lambda tree, sh: jax.tree.map(
      lambda x, s: (jax.lax.with_sharding_constraint(x, s) if isinstance(x, jax.core.Tracer)
                    else jax.device_put(x, s)), tree, sh)
  return state.replace(params=put(state.params, shard.params),
                       opt_state=put(state.opt_state, shard.opt_state))

"""Where a step's state lives on its mesh: parameters and optimizer state placed by the
step's rule (sharded over ``model`` on a ``workers × model`` mesh, PROTOCOL.md §13),
everything else replicated.

The functions take the step (:class:`~jaxgc.backends.spmd.step.CodedStep` or
:class:`~jaxgc.backends.spmd.plain.PlainStep`): its ``mesh``, ``axis_name``,
``param_sharding`` and ``tx``.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgc.backends.spmd.sharding import Placement, place_params
from jaxgc.memo import per_object

__all__ = ["check_mesh", "placement", "state_sharding", "keep_placed"]


def check_mesh(mesh: Mesh, axis_name: str) -> None:
  """Refuses a mesh with more than the ``workers`` and ``model`` axes."""
  if len(mesh.axis_names) > 2:
    raise ValueError(f"mesh axes {tuple(mesh.axis_names)}: expected ({axis_name!r},) or "
                     f"({axis_name!r}, 'model'); build it with "
                     "jaxgc.parallel.make_mesh(n, model=k).")


def placement(step, params) -> Placement:
  """``place_params`` of the step's mesh and rule, cached per parameter structure."""
  leaves, treedef = jax.tree.flatten(params)
  key = (treedef, tuple((tuple(np.shape(x)), str(x.dtype)) for x in leaves))
  return per_object(step, ("placement", key), lambda: place_params(
      params, step.mesh, step.param_sharding, workers_axis=step.axis_name))


def state_sharding(step, state):
  """The :class:`~jaxgc.backends.base.TrainState` of ``NamedSharding``s: parameters and
  optimizer state as :func:`placement` puts them, everything else replicated."""
  rep = NamedSharding(step.mesh, P())
  place = placement(step, state.params)
  out = jax.tree.map(lambda _: rep, state)
  return out.replace(params=place.shardings,
                     opt_state=place.opt_shardings(step.tx, state.opt_state))


def keep_placed(step, state):
  """The state's parameters and optimizer state constrained to their placement (a no-op on a
  1-D mesh): XLA would otherwise be free to lay out the updated state as it likes."""
  place = placement(step, state.params)
  if not place.sharded:
    return state
  shard = state_sharding(step, state)
  put = lambda tree, sh: jax.tree.map(
      lambda x, s: (jax.lax.with_sharding_constraint(x, s) if isinstance(x, jax.core.Tracer)
                    else jax.device_put(x, s)), tree, sh)
  return state.replace(params=put(state.params, shard.params),
                       opt_state=put(state.opt_state, shard.opt_state))

"""The PS's computations, none of them Ray's: the draw, work slots, solve, stop test, update.

Each is jitted once (per protocol object, or module-level with static settings),
so that every step sharing them shares one compile, and warmed up outside any
step's clock by :meth:`jaxgc.backends.ray.RayStep.warmup`.
"""
from __future__ import annotations

import functools
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxgc import protocols as _protocols
from jaxgc.backends import base as _backend
from jaxgc.memo import per_object

__all__ = ["apply_update", "decode", "draw", "ps_functions", "unravel", "work_slots"]


def _solve(protocol, counts):
  """``(enc [m, max_load, ℓ], dec [ℓ, m], condition [])`` at ``counts``: the one solve."""
  c = protocol.solve(counts)
  return c.enc, c.dec, c.condition


def work_slots(protocol) -> list[np.ndarray]:
  """Per worker, the list slots it processes, in order; ``k_j`` counts them.

  The uncoded protocols count designated chunks only (each chunk computed once),
  so their workers skip the rest of their lists. Every other protocol counts
  along the list, up to its last slot that can ever carry a coefficient (probed
  at the all-finished state, as the SPMD step does).
  """
  a = protocol.assignment
  if isinstance(protocol, _protocols.Uncoded):
    return [np.flatnonzero(row).astype(np.int32) for row in protocol.designated]
  used = protocol.slots_in_use()
  out = []
  for j in range(a.num_workers):
    last = np.flatnonzero(used[j])
    out.append(np.arange(last[-1] + 1 if last.size else 0, dtype=np.int32))
  return out


# The PS's decode: ĝ [d] from the messages [m, ⌈d/ℓ⌉] and dec [ℓ, m] (d static).
decode = jax.jit(_protocols.decode, static_argnums=2)


def ps_functions(protocol):
  """The PS's jitted ``is_decodable``, solve, ``coverage`` and stop test, once per protocol object.

  The stop test takes the arrival times ``F [m, max_load]`` so far (``inf`` for
  chunks not arrived) and asks the simulator's own rule: is ``completion_time``
  of those durations already finite?
  """
  ref = weakref.ref(protocol)     # a strong one in the value would keep the protocol alive

  def live():
    p = ref()
    assert p is not None            # the entry goes with its owner, so p outlives its uses
    return p

  def complete(f):
    tau = jnp.diff(f, axis=1, prepend=0.0)
    return jnp.isfinite(live().completion_time(jnp.where(jnp.isfinite(f), tau, jnp.inf)))
  return per_object(protocol, "ps_functions", lambda: (
      jax.jit(lambda c: live().is_decodable(c)), jax.jit(lambda c: _solve(live(), c)),
      jax.jit(lambda c: live().coverage(c)), jax.jit(complete)))


@functools.partial(jax.jit, static_argnums=tuple(range(7)))
def draw(protocol, straggler, mode, deadline, timeout, loss_prob, nan_prob, key, step,
         straggler_state):
  """One step's injected durations, faults and simulated stop, from ``fold_in(key, step)``.

  The SPMD step's draw (:func:`jaxgc.backends.base.draw_step`), so both backends
  inject the same durations and faults. Module-level with static settings: steps
  with equal settings share one compile.
  """
  durations, lost, corrupt, straggler_state = _backend.draw_step(
      straggler, protocol.assignment, jax.random.fold_in(key, step), straggler_state,
      loss_prob, nan_prob)
  sim_stop = _protocols.stop_time(protocol, durations, mode=mode, deadline=deadline,
                                    timeout=timeout)
  return durations, lost, corrupt, sim_stop, straggler_state


@functools.partial(jax.jit, static_argnums=0)
def apply_update(tx, params, opt_state, g):
  """``optax`` update from the flat gradient ``g [d]``, and whether it is finite
  (:func:`jaxgc.backends.base.optimizer_update`, as the SPMD step)."""
  return _backend.optimizer_update(tx, ravel_pytree(params)[1](g), opt_state, params)


def unravel(like, flat):
  """``flat [d]`` as a pytree like ``like`` (NumPy: nothing for JAX to compile on the PS)."""
  leaves, treedef = jax.tree.flatten(like)
  sizes = np.cumsum([np.size(x) for x in leaves])[:-1]
  parts = np.split(np.asarray(flat), sizes)
  return jax.tree.unflatten(treedef, [p.reshape(np.shape(x)).astype(np.asarray(x).dtype)
                                      for p, x in zip(parts, leaves, strict=True)])

"""The PS's computations, none of them Ray's: the draw, solve, stop test, decode, update.

Each is jitted once (per protocol object, or module-level with static settings),
so that every step sharing them shares one compile, and warmed up outside any
step's clock by :meth:`jaxgc.backends.ray.RayStep.warmup`. The rules inside them
(the decode, the skip rule and the metrics, the state's update) are the SPMD
step's, from :mod:`jaxgc.backends.core`.
"""
from __future__ import annotations

import functools
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxgc import adaptive as _adaptive
from jaxgc import protocols as _protocols
from jaxgc.backends import base as _backend
from jaxgc.backends import core
from jaxgc.backends.chunk_rule import chunk_keys
from jaxgc.memo import per_object

__all__ = ["actor_work", "apply_update", "chunk_key_data", "draw", "ps_functions", "unravel"]


def _solve(protocol, counts):
  """``(enc [m, max_load, ℓ], dec [ℓ, m], condition [])`` at ``counts``: the one solve."""
  c = protocol.solve(counts)
  return c.enc, c.dec, c.condition


def _finish(protocol, msgs, dec, counts, senders, condition, erasures, failed_again, d: int,
            report_condition: bool):
  """``(ĝ [d], metrics)``: the decode and :func:`jaxgc.backends.core.step_outcome` of the
  final round (messages ``[m, ⌈d/ℓ⌉]``, ``dec [ℓ, m]``, state ``counts [m]``)."""
  g = core.decode(msgs, dec).reshape(-1)[:d]
  return g, core.step_outcome(core.coverage(protocol, counts), senders, condition, g, erasures,
                              failed_again=failed_again, report_condition=report_condition)


def ps_functions(protocol):
  """The PS's jitted solve, stop test and finish (decode and metrics), once per protocol
  object.

  The stop test takes the arrival times ``F [m, max_load]`` so far (``inf`` for
  chunks not arrived) and asks the simulator's own rule: is ``completion_time``
  of those durations already finite? The finish takes ``d`` and
  ``report_condition`` as static arguments.
  """
  ref = weakref.ref(protocol)     # a strong one in the value would keep the protocol alive

  def live():
    p = ref()
    assert p is not None            # the entry goes with its owner, so p outlives its uses
    return p

  def complete(f):
    tau = jnp.diff(f, axis=1, prepend=0.0)
    return jnp.isfinite(live().completion_time(jnp.where(jnp.isfinite(f), tau, jnp.inf)))
  finish = lambda *args: _finish(live(), *args)
  return per_object(protocol, "ps_functions", lambda: (
      jax.jit(lambda c: _solve(live(), c)), jax.jit(complete),
      jax.jit(finish, static_argnums=(7, 8))))


@functools.partial(jax.jit, static_argnums=tuple(range(7)))
def draw(protocol, straggler, mode, deadline, timeout, loss_prob, nan_prob, step_key,
         straggler_state, perm=None):
  """One step's injected durations, faults and simulated stop, from the step's key
  (``fold_in(key, step)`` in training).

  The SPMD step's draw (:func:`jaxgc.backends.base.draw_step`), so both backends
  inject the same durations and faults. With an adaptive PS's placement ``perm``
  ``[m]`` the durations are the logical workers' (:func:`jaxgc.adaptive.apply_placement`),
  as in the SPMD step. Module-level with static settings: steps with equal settings
  share one compile.
  """
  durations, lost, corrupt, straggler_state = _backend.draw_step(
      straggler, protocol.assignment, step_key, straggler_state, loss_prob, nan_prob)
  if perm is not None:
    durations = _adaptive.apply_placement(durations, perm, protocol.assignment)
  sim_stop = _protocols.stop_time(protocol, durations, mode=mode, deadline=deadline,
                                    timeout=timeout)
  return durations, lost, corrupt, sim_stop, straggler_state


@functools.partial(jax.jit, static_argnums=0)
def apply_update(tx, state, g, outcome, fields=None):
  """``(new_state, outcome)``: :func:`jaxgc.backends.core.apply_step` with the flat
  gradient ``g [d]`` (``outcome``: ``skipped``, ``exact``, ``erasures``,
  ``step_sim_time``); ``fields``: other state fields to replace (``model_state``,
  kept when the step is skipped; ``adaptive_state``)."""
  return core.apply_step(state, ravel_pytree(state.params)[1](g), outcome, tx, **(fields or {}))


@functools.partial(jax.jit, static_argnums=1)
def _chunk_keys(step_key, num_chunks: int):
  return chunk_keys(step_key, num_chunks)


def chunk_key_data(step_key, num_chunks: int):
  """``(key data [N, ...], impl)``: the chunks' keys (:func:`jaxgc.chunk_keys`, the SPMD
  step's) as NumPy for the actors; ``impl`` is ``None`` for raw ``uint32`` keys, else
  the name :func:`jax.random.wrap_key_data` takes back."""
  keys = _chunk_keys(step_key, int(num_chunks))
  if jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
    return np.asarray(jax.random.key_data(keys)), str(jax.random.key_impl(keys))
  return np.asarray(keys), None


def unravel(like, flat):
  """``flat [d]`` as a pytree like ``like`` (NumPy: nothing for JAX to compile on the PS)."""
  leaves, treedef = jax.tree.flatten(like)
  sizes = np.cumsum([np.size(x) for x in leaves])[:-1]
  parts = np.split(np.asarray(flat), sizes)
  return jax.tree.unflatten(treedef, [p.reshape(np.shape(x)).astype(np.asarray(x).dtype)
                                      for p, x in zip(parts, leaves, strict=True)])


def actor_work(assignment, slots, sleeps, num_actors: int, perm=None):
  """Phase 1's split of the work: ``(workers_of, [(ids, work)] per actor)``.

  ``workers_of[h]`` lists actor ``h``'s workers: worker ``j`` on actor ``j mod
  num_actors``, or with an adaptive placement ``perm``, logical worker ``j`` on the
  actor of physical worker ``perm[j]``. ``ids``: the chunks actor ``h`` needs, sorted;
  ``work``: per worker ``(j, rows of its chunks in ids, its slots, its sleeps)``, from
  ``sleeps`` ``[m, max_load]`` (wall seconds) and ``slots`` (:func:`core.work_slots`).
  """
  m = assignment.num_workers
  chunk_of = [assignment.order[j, slots[j]] for j in range(m)]
  phys = np.arange(m) if perm is None else np.asarray(perm)
  workers_of = [[j for j in range(m) if phys[j] % num_actors == h] for h in range(num_actors)]
  shares = []
  for mine in workers_of:
    ids = np.unique(np.concatenate([chunk_of[j] for j in mine] + [np.zeros(0, np.int32)]))
    row = {int(i): r for r, i in enumerate(ids)}
    shares.append((ids, [(j, np.array([row[int(i)] for i in chunk_of[j]], np.int32), slots[j],
                          sleeps[j, :len(slots[j])]) for j in mine]))
  return workers_of, shares

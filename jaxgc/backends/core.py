"""The step's rules, once for both backends (PROTOCOL.md §2, §6), in ``jnp``.

The SPMD step calls these inside its ``shard_map`` body, the Ray PS inside its
jitted functions (:mod:`jaxgc.backends.ray.compute`); neither restates them:

- :func:`work_slots` / :func:`slot_width`: the list slots a worker processes;
- :func:`decode`: ``ĝ^(r) = Σ_j dec[r,j] z_j``, silent workers masked (linear in
  the workers: the SPMD step decodes each device's workers, shard by shard, and
  ``psum``s);
- :func:`erase`: the erase-and-re-solve rule: an erased message (lost,
  non-finite, or its worker dead) sets ``k_j = 0`` and the PS solves once more
  at that state; round 2 is the last (:data:`ROUNDS`);
- :func:`is_skipped` / :func:`step_outcome`: the skip rule and the metrics of the
  final round (skipped, exact, coverage, senders, condition number);
- :func:`apply_step`: the :class:`~jaxgc.backends.base.TrainState` tail, where a
  skipped or non-finite update never touches the parameters.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgc import protocols as _protocols
from jaxgc.backends.base import keep_if, optimizer_update

__all__ = [
    "work_slots", "slot_width", "decode", "ROUNDS", "erase", "Coverage", "coverage",
    "is_skipped", "step_outcome", "apply_step",
]

ROUNDS = 2
"""Message rounds per step: the first, and one redo after erasures. An erasure in the
redo fails the step (it is skipped)."""


# -- which slots a worker processes --------------------------------------------------

def work_slots(protocol) -> list[np.ndarray]:
  """Per worker, the list slots it processes, in order; ``k_j`` counts them.

  The uncoded protocols count designated chunks only (each chunk computed once),
  so their workers skip the rest of their lists. Every other protocol counts
  along the list, up to its last slot that can ever carry a coefficient (probed
  at the all-finished state, :meth:`jaxgc.protocols.Protocol.slots_in_use`).
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


def slot_width(protocol) -> int:
  """Leading slots per worker that hold all of :func:`work_slots` (``max_load`` if none)."""
  width = max((int(s[-1]) + 1 for s in work_slots(protocol) if s.size), default=0)
  return width or protocol.assignment.max_load


# -- the PS's decode and the erasure rule ----------------------------------------------

decode = _protocols.base.decode_blocks
"""The PS's decode, ``[w, ...]`` messages and ``dec [ℓ, w]`` -> ``[ℓ, ...]``: one definition,
:func:`jaxgc.protocols.base.decode_blocks`, here under the name both backends call."""


def erase(counts, erased):
  """The state the PS re-solves at after erasures: ``k_j = 0`` for the ``erased`` (bool
  ``[m]``) workers, the rest of ``counts [m]`` as it was (PROTOCOL.md §2)."""
  return jnp.where(erased, 0, counts)


# -- what a step's final round says ------------------------------------------------------

class Coverage(NamedTuple):
  """The state ``k`` as the metrics see it.

  Attributes:
    decodable: bool ``[]``, the state allows exact recovery.
    min_coverage: int32 ``[]``, ``min_i c_i(k)``.
    chunks_below_ell: int32 ``[]``, chunks with ``c_i(k) < ℓ``.
  """
  decodable: jax.Array
  min_coverage: jax.Array
  chunks_below_ell: jax.Array


def coverage(protocol, counts) -> Coverage:
  """:class:`Coverage` of ``counts [m]`` under ``protocol``."""
  cov = protocol.coverage(counts)
  return Coverage(jnp.asarray(protocol.is_decodable(counts), bool),
                  jnp.min(cov).astype(jnp.int32), jnp.sum(cov < protocol.ell, dtype=jnp.int32))


def is_skipped(senders, decoded, failed_again=None):
  """bool ``[]``: the step cannot be applied: no worker sends in the final round, the
  redo lost a message too (``failed_again``; ``None``: not tracked), or ``ĝ`` is
  non-finite.

  ``decoded``: ``ĝ`` or its blocks (any pytree). One sum instead of an elementwise
  test: any NaN/Inf makes it non-finite.
  """
  finite = jnp.isfinite(sum(jnp.sum(x) for x in jax.tree.leaves(decoded)))
  skipped = ~jnp.any(senders) | ~finite
  return skipped if failed_again is None else skipped | failed_again


def step_outcome(cov: Coverage, senders, condition, decoded, erasures, *, failed_again=None,
                 report_condition: bool = True) -> dict:
  """The metrics both backends report of a step's final round.

  Args:
    cov: :func:`coverage` of the final state.
    senders: bool ``[m]`` (or padded), the final round's senders.
    condition: ``[]`` the final solve's worst condition number.
    decoded: ``ĝ`` or its blocks (:func:`is_skipped`).
    erasures: int ``[]``, messages erased in the first round.
  Returns:
    ``skipped``, ``exact`` (decodable and not skipped), ``decodable``,
    ``min_coverage``, ``chunks_below_ell``, ``senders`` (int32), ``erasures``, and
    ``condition_number`` with ``report_condition``.
  """
  skipped = is_skipped(senders, decoded, failed_again)
  metrics = {
      "erasures": erasures, "skipped": skipped, "exact": cov.decodable & ~skipped,
      "decodable": cov.decodable, "min_coverage": cov.min_coverage,
      "chunks_below_ell": cov.chunks_below_ell,
      "senders": jnp.sum(senders, dtype=jnp.int32),
  }
  if report_condition:
    metrics["condition_number"] = condition
  return metrics


# -- the update ----------------------------------------------------------------------------

def apply_step(state, grads, outcome: dict, tx: optax.GradientTransformation,
               **fields: Any):
  """``(new_state, outcome)``: one ``optax`` step of ``state`` (a
  :class:`~jaxgc.backends.base.TrainState`) with ``grads``, unless it is skipped.

  ``outcome`` needs ``skipped``, ``exact``, ``erasures`` and ``step_sim_time``; it
  comes back with ``skipped`` (also when the update is non-finite), ``exact`` (and
  not skipped) and the clock ``sim_time``. ``fields``: other state fields the step
  replaces (next plan, straggler and adaptive states); a ``model_state`` among
  them, like the new parameters, only when the step is not skipped.
  """
  params, opt_state, finite = optimizer_update(tx, grads, state.opt_state, state.params)
  skip = outcome["skipped"] | ~finite
  # One keep_if (one lax.cond) for everything a skipped step leaves as it was.
  old: dict[str, Any] = {"params": state.params, "opt_state": state.opt_state}
  new: dict[str, Any] = {"params": params, "opt_state": opt_state}
  if "model_state" in fields:
    old["model_state"], new["model_state"] = state.model_state, fields.pop("model_state")
  fields.update(keep_if(skip, old, new))
  sim_time = state.sim_time + outcome["step_sim_time"]
  new_state = state.replace(
      step=state.step + 1, sim_time=sim_time,
      num_skipped=state.num_skipped + skip.astype(jnp.int32),
      num_erasures=state.num_erasures + outcome["erasures"], **fields)
  return new_state, dict(outcome, skipped=skip, exact=outcome["exact"] & ~skip,
                         sim_time=sim_time)

"""Phase 3 on the wire: each sender gets its coefficient row, the PS gathers the messages.

The actors encode (:func:`jaxgc.protocols.encode`) what they kept of the step;
a message that is lost, non-finite, or whose actor dies or does not answer
within the timeout is an erasure (PROTOCOL.md §2), for the PS to re-solve
without it.
"""
from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np

from jaxgc import precision
from jaxgc.backends import core
from jaxgc.backends.ray.liveness import ActorLiveness, actor_state
from jaxgc.backends.ray.pool import WorkerPool
from jaxgc.backends.ray.records import Rounds
from jaxgc.protocols.base import num_blocks

__all__ = ["collect", "rounds"]


def collect(pool: WorkerPool, liveness: ActorLiveness, key: str, step: int, enc, senders,
            workers_of, dead, lost, corrupt, *, stop: bool, out: Rounds, timeout: float,
            message_dtype: str = "float32"):
  """Sends each sender its coefficients and gathers ``{j: z_j}`` and the erased ``[m]``.

  ``enc [m, max_load, ℓ]``: the coefficients; ``senders``, ``dead`` bool ``[m]``;
  ``lost`` and ``corrupt`` bool ``[m]`` inject faults (``None``: none);
  ``stop`` also stops every actor's run of ``(key, step)``. The actors send in
  ``message_dtype`` and ``z_j`` comes back in float32
  (:func:`jaxgc.precision.from_wire`). Writes each message's size on the
  wire (int8's scales included) and transfer time (its actor's send to its receipt here,
  ``time.time()`` on both sides) into ``out.nbytes`` and ``out.transfer_s``.
  Waits at most ``timeout`` seconds; what has not come by then is erased.
  """
  ray, m = pool.ray, len(senders)
  refs, asked = {}, {}
  for h, actor in enumerate(pool.actors):
    rows = {}
    for j in workers_of[h]:
      if senders[j]:
        fault = ("lost" if lost is not None and lost[j] else
                 "nan" if corrupt is not None and corrupt[j] else None)
        rows[j] = (enc[j], fault)
    if rows or (stop and not dead[workers_of[h]].all()):
      ref = actor.encode.remote(key, step, rows, stop, message_dtype)
      if rows:
        refs[ref], asked[ref] = h, list(rows)
  bad = np.zeros(m, bool)
  got = {}
  pending, until = list(refs), time.perf_counter() + timeout
  while pending:
    ready, pending = ray.wait(pending, num_returns=1,
                              timeout=min(max(until - time.perf_counter(), 0.0), 0.05))
    if not ready:
      # Ray holds a call to a restarting actor until it is back (seconds): its
      # messages are erasures now, not a stall of the step.
      down = [r for r in pending if actor_state(ray, pool.actors[refs[r]])[0]
              not in ("ALIVE", "UNKNOWN")]
      for r in down:
        bad[asked[r]] = True
        liveness.failed(refs[r], step)
      pending = [r for r in pending if r not in down]
      if time.perf_counter() >= until:
        break
      continue
    ref = ready[0]
    try:
      msgs, sent = ray.get(ref)
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
      bad[asked[ref]] = True
      liveness.failed(refs[ref], step)
      continue
    received = time.time()
    for j, wire in msgs.items():
      z = None
      if wire is not None:
        out.nbytes[j], out.transfer_s[j] = precision.wire_nbytes(wire), received - sent
        z = np.asarray(precision.from_wire(wire), np.float32)
      if z is None or not np.all(np.isfinite(z)):
        bad[j] = True
      else:
        got[j] = z
  for ref in pending:
    bad[asked[ref]] = True
  return got, bad



def rounds(pool: WorkerPool, liveness: ActorLiveness, key: str, step: int, coefficients, seen,
           workers_of, lost, corrupt, d: int, ell: int, *, timeout: float,
           message_dtype: str = "float32") -> Rounds:
  """Phases 3-4: solve for the observed state, collect the messages, erase and redo once
  (:func:`jaxgc.backends.core.erase`, :data:`jaxgc.backends.core.ROUNDS`).

  ``coefficients``: ``counts -> (enc, dec, condition)``, the PS's jitted solve; ``seen``:
  the watch phase's :class:`~jaxgc.backends.ray.records.Seen` (its ``erased`` grows
  with each erasure); ``lost``, ``corrupt``: the first round's injected faults.
  """
  m = len(seen.counts)
  out = Rounds(counts=seen.counts.copy(), nbytes=np.zeros(m, np.int64),
               transfer_s=np.full(m, np.nan), msgs=np.zeros((m, num_blocks(d, ell)), np.float32))
  for attempt in range(core.ROUNDS):
    s0 = time.perf_counter()
    enc, out.dec, condition = (np.asarray(x) for x in coefficients(jnp.asarray(out.counts)))
    out.condition = float(condition)
    out.senders = np.any(enc != 0, axis=(1, 2)) & ~seen.dead
    out.solve_s += time.perf_counter() - s0
    r0 = time.perf_counter()
    got, bad = collect(pool, liveness, key, step, enc, out.senders, workers_of, seen.dead,
                       lost if attempt == 0 else None, corrupt if attempt == 0 else None,
                       stop=attempt == 0, out=out, timeout=timeout, message_dtype=message_dtype)
    out.round_s += time.perf_counter() - r0
    for j, z in got.items():
      out.msgs[j] = z
    if not bad.any():
      break
    if attempt == core.ROUNDS - 1:
      out.failed_again = True
      break
    seen.erased |= bad
    out.counts = np.array(core.erase(out.counts, bad))
    out.msgs[:] = 0
  return out

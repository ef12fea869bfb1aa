"""Phase 3 on the wire: each sender gets its coefficient row, the PS gathers the messages.

The actors encode (:func:`jaxgc.protocols.encode`) what they kept of the step;
a message that is lost, non-finite, or whose actor dies or does not answer
within the timeout is an erasure (PROTOCOL.md §2), for the PS to re-solve
without it.
"""
from __future__ import annotations

import time

import numpy as np

from jaxgc import precision
from jaxgc.backends.ray.liveness import ActorLiveness, actor_state
from jaxgc.backends.ray.pool import WorkerPool
from jaxgc.backends.ray.records import Rounds

__all__ = ["collect"]


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


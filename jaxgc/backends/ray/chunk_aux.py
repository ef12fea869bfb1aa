"""A loss's ``aux`` on Ray (a model's new state, batch norm): one copy per chunk, to the PS.

Each actor keeps the ``aux`` of every chunk its workers computed in the step
(:meth:`jaxgc.backends.ray.actor.WorkerHost.aux`). After the watch the PS asks,
for each chunk that arrived, the actor of one worker that reported it: every copy
of a chunk computed the same ``aux`` (the same parameters, chunk, key and extra
arguments, :mod:`jaxgc.backends.chunk_rule`), so which copy does not matter.
"""
from __future__ import annotations

import jax
import numpy as np

from jaxgc.backends.ray.pool import WorkerPool
from jaxgc.backends.ray.records import Seen

__all__ = ["gather_aux"]


def gather_aux(pool: WorkerPool, key: str, step: int, assignment, slots, seen: Seen,
               workers_of, timeout: float):
  """``(aux, have)``: ``aux`` leaves ``[N, ...]`` (zeros for a chunk with none) and
  ``have`` bool ``[N]``, the chunks whose ``aux`` came back; ``(None, have)`` if none did.

  ``slots[j]``: worker ``j``'s list slots in order; ``seen``: the watch's view (its
  ``counts``: the chunks each live worker reported, in order); ``workers_of[h]``:
  actor ``h``'s workers.
  """
  ray, a = pool.ray, assignment
  host = {j: h for h, mine in enumerate(workers_of) for j in mine}
  holder: dict[int, tuple[int, int]] = {}
  for j in range(a.num_workers):
    if seen.dead[j]:
      continue
    for n in range(int(seen.counts[j])):
      holder.setdefault(int(a.order[j, slots[j][n]]), (j, n))
  asked: dict[int, list[int]] = {}
  for chunk, (j, _) in holder.items():
    asked.setdefault(host[j], []).append(chunk)
  refs = {pool.actors[h].aux.remote(key, step, [holder[i] for i in chunks]): chunks
          for h, chunks in asked.items()}
  got: dict[int, object] = {}
  for ref, chunks in refs.items():
    try:
      rows = ray.get(ref, timeout=timeout)
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
            ray.exceptions.GetTimeoutError):
      continue            # its actor died since: those chunks have no aux this step
    got.update({i: x for i, x in zip(chunks, rows, strict=True) if x is not None})
  have = np.zeros(a.num_chunks, bool)
  if not got:
    return None, have
  like = next(iter(got.values()))
  aux = jax.tree.map(lambda x: np.zeros((a.num_chunks,) + np.shape(x), np.asarray(x).dtype),
                     like)
  for i, x in got.items():
    have[i] = True
    jax.tree.map(lambda buf, v, i=i: buf.__setitem__(i, v), aux, x)
  return aux, have

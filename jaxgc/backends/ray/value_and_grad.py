"""``coded_value_and_grad`` on Ray: your own loop, with real actors as the workers.

``jaxgc.coded_value_and_grad(loss_fn, protocol, straggler, backend="ray", **ray_options)``
returns :class:`RayGradFn`: the SPMD ``grad_fn``'s signature and outputs
(``(value, grads, info)``), run by a :class:`jaxgc.backends.ray.RayStep` in real
time. It is a host function: it cannot be jitted (the PS waits on actors).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from jaxgc.backends import base as _backend
from jaxgc.backends.chunk_rule import check_key
from jaxgc.backends.ray.compute import unravel
from jaxgc.backends.ray.ps import RayStep

__all__ = ["RayGradFn", "ray_value_and_grad"]


def ray_value_and_grad(loss_fn: Callable, protocol, straggler, *, has_aux: bool = False,
                       **options) -> RayGradFn:
  """``grad_fn(params, chunks, key, *args) -> (value, grads, info)`` on Ray actors.

  ``options``: :class:`jaxgc.backends.ray.RayStep`'s (``mode``, ``deadline``,
  ``num_actors``, ``time_scale``, ``pool``, ...). Close it (or use ``with``) to
  stop the actors it started.
  """
  return RayGradFn(RayStep(protocol, straggler, loss_fn, None, has_aux=has_aux, **options))


class RayGradFn:
  """What :func:`ray_value_and_grad` returns; ``.step`` is its :class:`RayStep`.

  Called like the SPMD ``grad_fn`` (:func:`jaxgc.coded_value_and_grad`): the step
  draws from ``key`` itself (durations, faults) and chunk ``i``'s ``rng`` is
  ``chunk_keys(key, N)[i]``, as there. ``value`` is ``Σ_i loss_i`` over the chunks
  that arrived, scaled by ``N / arrived`` (all of them in an exact step); with
  ``has_aux`` its ``aux`` has leaves ``[N, ...]``, zeros for a chunk that did not
  arrive (``info["aux_chunks"]`` marks those that did).
  """

  def __init__(self, step: RayStep):
    self.step = step

  def __call__(self, params, chunks, key, *args):
    check_key(key)
    m = self.step.assignment.num_workers
    s0 = _backend.init_straggler_state(self.step.straggler, key, m)
    g, info, _ = self.step._gradient(params, chunks, key, 0, s0, args)  # pylint: disable=W0212
    grads = unravel(params, g)
    loss = info.pop("loss")
    value = (loss, info.pop("aux")) if self.step.has_aux else loss
    coverage = np.asarray(self.step.protocol.coverage(info["counts"]), np.int32)
    info["coverage"] = coverage
    info["finished"] = coverage > 0
    return value, grads, info

  def close(self) -> None:
    """Stops the actors the step started (not a ``pool`` passed in)."""
    self.step.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

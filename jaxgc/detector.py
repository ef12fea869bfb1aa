"""Online detection of slow-but-alive workers (in the spirit of FALCON, arXiv 2410.12588).

Each step the PS sees, per worker ``j``, how many chunks it finished (``k_j``) and for
how long it was busy (``e_j``: the stop time, or its last finish if it ran out of
work). The observation is the log mean chunk time

    ``x_j = log(e_j / (k_j + ½·b_j))``,    ``b_j = 1`` if ``j`` was still busy at the stop,

(the unfinished chunk counts half: a worker with ``k_j = 0`` still gives a finite,
censored ``x_j``), minus the fleet's median ``med_j x_j`` so that a step that is slow
for everyone (a slow iteration of a trace, a later stop) moves no one.

Per worker, a two-sided CUSUM (Page 1954) tests the current segment's level ``μ_j``
(the running mean of ``x_j`` since the last change point) against a shift in
either direction, in units of the noise ``σ`` of one step's ``x``:

    ``z = (x − μ_j) / σ``,   ``g⁺ ← max(0, g⁺ + z − κ)``,   ``g⁻ ← max(0, g⁻ − z − κ)``.

A change point is declared when ``g⁺ > h`` or ``g⁻ > h``; the segment restarts at
that observation (``μ_j ← x``), so after a slowdown the level is the new one at
once rather than after an EWMA's ``1/decay`` steps. For a mean shift ``Δ`` the
delay is about ``(h + 1.17) / (Δ/σ − κ)`` steps, and without a change a one-sided
false alarm comes every ``(e^{2κ(h+1.17)} − 1 − 2κ(h+1.17)) / (2κ²)`` steps
(Siegmund's approximation for Gaussian ``z``): at the defaults ``κ = 0.5, h = 4``,
``σ = 0.4`` a 5× slowdown (``Δ = log 5 = 1.6``) is flagged in 1–2 steps, and a
stationary worker false-alarms about once in 300 steps per side.

A worker is **slow** while its level exceeds the fleet's median level by
``log(slow_factor)``: that catches a worker that was slow from the start (no change
point of its own) as well as one that slowed down. The state also keeps the flags'
one-step-ahead **precision** (the share of flagged workers still slow at the next
step, an EWMA over steps): near 1 for persistent slowness, near the slow share for
stragglers drawn afresh each step, where moving work is pointless. Everything is a
pure jittable function of a NamedTuple state.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxgc.errors import ParamError

__all__ = ["Detector", "DetectorState", "observation", "MAX_SEGMENT"]

MAX_SEGMENT = 20
"""The level averages at most this many steps: past it, an EWMA of weight ``1/20``."""


class DetectorState(NamedTuple):
  """Per-worker detector state, every field ``[m]``.

  Attributes:
    level: ``μ_j``: mean of ``x_j`` over the current segment (relative log chunk time).
    length: int32: observations in the current segment (``0`` = none yet).
    g_up: CUSUM statistic for an increase (a slowdown).
    g_down: CUSUM statistic for a decrease (a recovery).
    changes: int32: change points declared so far.
    flagged: bool: the slow flags after the previous update.
    precision: ``[]``: EWMA (weight ``1/MAX_SEGMENT``) over steps of the share of the
      flagged workers whose next observation was slow again (``x > log slow_factor``):
      how well a flag predicts the next step. Slowness that does not persist (fresh
      stragglers each step) keeps it low, so a PS should not re-place work for it.
  """
  level: jax.Array
  length: jax.Array
  g_up: jax.Array
  g_down: jax.Array
  changes: jax.Array
  flagged: jax.Array
  precision: jax.Array


def observation(counts, busy_time, busy, valid=None):
  """``x_j = log(e_j / (k_j + ½ b_j)) − med x``, ``[m]``, and where it is defined, ``[m]`` bool.

  ``counts`` ``k``, ``busy_time`` ``e``, ``busy`` ``b`` (still working at the stop) are
  ``[m]``; ``valid`` (default all) masks workers that were not observed. A worker that
  finished nothing and was idle (empty list, or failed: ``e = 0``) gives no observation.
  """
  k = jnp.asarray(counts, jnp.float32)
  e = jnp.asarray(busy_time, jnp.float32)
  n = k + 0.5 * jnp.asarray(busy, jnp.float32)
  ok = jnp.isfinite(e) & (e > 0) & (n > 0)
  if valid is not None:
    ok = ok & jnp.asarray(valid)
  x = jnp.log(jnp.where(ok, e, 1.0) / jnp.where(ok, n, 1.0))
  med = jnp.nanmedian(jnp.where(ok, x, jnp.nan))
  x = jnp.where(ok, x - jnp.where(jnp.isfinite(med), med, 0.0), 0.0)
  return x, ok


class Detector(NamedTuple):
  """Two-sided CUSUM per worker on the relative log chunk time (see the module docstring).

  ``drift`` ``κ`` and ``threshold`` ``h`` are in units of ``scale`` ``σ`` (the noise of
  one step's ``x``); ``slow_factor``: how many times slower than the median a worker's
  level must be to count as slow.
  """
  drift: float = 0.5
  threshold: float = 4.0
  scale: float = 0.4
  slow_factor: float = 2.0
  jump: float = float("inf")

  def check(self) -> Detector:
    for name in ("drift", "threshold", "scale", "jump"):
      v = getattr(self, name)
      if not v > 0:
        raise ParamError(f"Detector {name} must be > 0, got {v!r}.", name)
    if not self.slow_factor > 1:
      raise ParamError(f"Detector slow_factor must be > 1 (times slower than the median), "
                       f"got {self.slow_factor!r}.", "slow_factor")
    return self

  def init(self, num_workers: int) -> DetectorState:
    """No observation yet: every worker at the fleet's level."""
    self.check()
    z = jnp.zeros((num_workers,), jnp.float32)
    c = jnp.zeros((num_workers,), jnp.int32)
    return DetectorState(level=z, length=c, g_up=z, g_down=z, changes=c,
                         flagged=jnp.zeros((num_workers,), bool),
                         precision=jnp.zeros((), jnp.float32))

  def update(self, state: DetectorState, x, valid) -> tuple[DetectorState, jax.Array]:
    """Folds in one step's ``x`` ``[m]`` (where ``valid``); returns the new state and the
    change points declared at this step, bool ``[m]``."""
    x = jnp.asarray(x, jnp.float32)
    valid = jnp.asarray(valid)
    z = (x - state.level) / self.scale
    up = jnp.maximum(0.0, state.g_up + z - self.drift)
    down = jnp.maximum(0.0, state.g_down - z - self.drift)
    jump = jnp.abs(z) > self.jump
    alarm = valid & (state.length > 0) & ((up > self.threshold) | (down > self.threshold) | jump)
    fresh = valid & ((state.length == 0) | alarm)
    # Did last step's flags come true? (Only over flagged workers observed now.)
    cut = jnp.log(jnp.float32(self.slow_factor))
    judged = state.flagged & valid
    hit = jnp.sum(judged & (x > cut)) / jnp.maximum(jnp.sum(judged), 1)
    precision = jnp.where(jnp.any(judged),
                          state.precision + (hit - state.precision) / MAX_SEGMENT,
                          state.precision)
    n = jnp.minimum(state.length + 1, MAX_SEGMENT).astype(jnp.float32)
    level = jnp.where(fresh, x, state.level + (x - state.level) / n)
    new = DetectorState(
        level=jnp.where(valid, level, state.level),
        length=jnp.where(fresh, 1, jnp.where(valid, state.length + 1, state.length)),
        g_up=jnp.where(fresh, 0.0, jnp.where(valid, up, state.g_up)),
        g_down=jnp.where(fresh, 0.0, jnp.where(valid, down, state.g_down)),
        changes=state.changes + alarm.astype(jnp.int32), flagged=state.flagged,
        precision=precision)
    return new._replace(flagged=self.slow(new)), alarm

  def slow(self, state: DetectorState):
    """bool ``[m]``: level above the median level of the observed workers by
    ``log(slow_factor)``."""
    seen = state.length > 0
    med = jnp.nanmedian(jnp.where(seen, state.level, jnp.nan))
    med = jnp.where(jnp.isfinite(med), med, 0.0)
    return seen & (state.level - med > jnp.log(jnp.float32(self.slow_factor)))

  def speeds(self, state: DetectorState):
    """Relative speeds ``exp(−μ_j)`` ``[m]`` (1 = the fleet's median; unseen workers 1)."""
    return jnp.exp(-jnp.where(state.length > 0, state.level, 0.0))

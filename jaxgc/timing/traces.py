"""Durations from data: per-worker iteration times of a real cluster, or recorded chunk times.

:class:`TraceReplay` replays a per-worker trace step by step (the shipped Alibaba
PAI 2020 traces, or a CSV in their format, :func:`load_trace`).
:class:`RecordedDurations` replays explicit chunk durations ``τ[m, max_load]``.
"""
from __future__ import annotations

import csv
import importlib.resources
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxgc.assignments import Assignment
from jaxgc.errors import ParamError
from jaxgc.timing.base import STRAGGLER_MODELS, check_base, finalize
from jaxgc.timing.completion import check_durations
from jaxgc.timing.iid import ShiftedExponential

__all__ = ["TRACES", "MAPPINGS", "load_trace", "TraceReplay", "RecordedDurations"]

_TRACE_DIR = "traces"
TRACES = {f"alibaba_pai_job{i}": f"job_{i}_norm.csv" for i in range(1, 5)}
_TRACE_COLUMNS = ("worker", "time", "batch_time_norm")
MAPPINGS = ("wrap", "permutation", "none")


def load_trace(trace: str) -> np.ndarray:
  """Per-worker iteration times ``T[r, w]`` ``[R, W]`` (float64), normalised to median 1.

  ``trace``: a shipped trace (:data:`TRACES`: the Alibaba PAI 2020 mini-batch
  times, CC BY 4.0, see ``jaxgc/traces/README.md``) or the path of a CSV in the
  same format: columns ``worker``, ``time`` (the iteration) and
  ``batch_time_norm``, one row per worker and iteration. Iterations in which
  some worker has no row are dropped; only ratios within a trace matter.
  """
  if trace in TRACES:
    ref = importlib.resources.files("jaxgc").joinpath(_TRACE_DIR, TRACES[trace])
    with importlib.resources.as_file(ref) as path:
      return _read_trace(str(path), trace)
  if not os.path.isfile(str(trace)):
    raise ParamError(f"unknown trace {trace!r}: use one of {sorted(TRACES)} or the path "
                     "of a CSV with columns worker,time,batch_time_norm.", "trace")
  return _read_trace(str(trace), str(trace))


def _read_trace(path: str, name: str) -> np.ndarray:
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    header = reader.fieldnames or []
    for col in _TRACE_COLUMNS:
      if col not in header:
        raise ParamError(f"trace {name}: no column {col!r} (header {header}); a trace CSV "
                         f"needs the columns {', '.join(_TRACE_COLUMNS)}.", "trace")
    try:
      rows = [(float(r["worker"]), float(r["time"]), float(r["batch_time_norm"]))
              for r in reader]
    except (TypeError, ValueError) as e:
      raise ParamError(f"trace {name}: a non-numeric worker, time or batch_time_norm "
                       f"({e}); every row needs three numbers.", "trace") from None
  if not rows:
    raise ParamError(f"trace {name} has no rows; it needs one row per worker and iteration.",
                     "trace")
  worker, it, value = np.asarray(rows).T
  bad = ~(np.isfinite(value) & (value > 0))
  if bad.any():
    i = int(np.argmax(bad))
    raise ParamError(f"trace {name}: batch_time_norm must be positive and finite, row {i} "
                     f"has {value[i]}; remove or fix that row.", "trace")
  workers, w_idx = np.unique(worker, return_inverse=True)
  iters, r_idx = np.unique(it, return_inverse=True)
  table = np.full((len(iters), len(workers)), np.nan)
  table[r_idx, w_idx] = value
  table = table[~np.isnan(table).any(axis=1)]
  if not len(table):
    raise ParamError(f"trace {name}: no iteration has a time for every worker.", "trace")
  return table / np.median(table)


class TraceReplay:
  """Replays a per-worker trace step by step (PROTOCOL.md §10).

  Step ``t`` uses iteration ``r = t mod R`` of ``T[r, w]`` (normalised to median 1,
  see :func:`load_trace`). Simulated worker ``j`` plays traced worker ``w(j)``:

  * ``mapping="wrap"`` (default): ``w(j) = j mod W``, for any ``m``;
  * ``mapping="permutation"``: ``w = `` the first ``m`` entries of a permutation of
    the ``W`` traced workers drawn with ``seed``; needs ``m ≤ W``;
  * ``mapping="none"``: ``w(j) = j``; needs ``m ≤ W``.

  A traced time is a whole mini-batch, i.e. a worker's whole load: each of worker
  ``j``'s chunks takes ``T[r, w(j)] / δ_j``, times i.i.d. mean-one noise
  ``τ / E[τ]`` from ``noise`` (a straggler model, e.g. :class:`ShiftedExponential`)
  when given. The state is the step index (int32 ``[]``); :meth:`sample`
  (stateless) draws the iteration uniformly.
  """

  stateful = True

  def __init__(self, trace="alibaba_pai_job4", mapping: str = "wrap", seed: int = 0,
               noise=None):
    if mapping not in MAPPINGS:
      raise ParamError(f"unknown trace mapping {mapping!r}; choose one of {MAPPINGS}.",
                       "mapping")
    if noise is not None:
      check_base(noise, "noise")
      _mean(noise)                      # fail now if the noise has no mean
    if isinstance(trace, str):
      self.name, times = trace, load_trace(trace)
    else:
      self.name, times = "array", np.asarray(trace, np.float64)
      if times.ndim != 2 or not np.all(np.isfinite(times) & (times > 0)):
        raise ParamError("a trace array must be [iterations, workers] of positive finite "
                         "times.", "trace")
      times = times / np.median(times)
    self.times = times
    self.mapping = mapping
    self.seed = int(seed)
    self.noise = noise

  @property
  def num_iterations(self) -> int:
    return int(self.times.shape[0])

  @property
  def num_traced_workers(self) -> int:
    return int(self.times.shape[1])

  def worker_map(self, num_workers: int) -> np.ndarray:
    """``w(j)`` for ``j < m``, int ``[m]``."""
    w = self.num_traced_workers
    if self.mapping == "wrap":
      return np.arange(num_workers) % w
    if num_workers > w:
      raise ParamError(
          f"trace {self.name} has {w} workers but {num_workers} are simulated, and "
          f"mapping={self.mapping!r} uses each traced worker once; use mapping='wrap' "
          "(worker j plays traced worker j mod W) or at most W workers.", "mapping")
    if self.mapping == "none":
      return np.arange(num_workers)
    return np.random.default_rng(self.seed).permutation(w)[:num_workers]

  def durations(self, key, iteration, assignment: Assignment, shape=()):
    """Chunk durations ``[*shape, m, max_load]`` of iteration(s) ``iteration`` ``[*shape]``."""
    times = jnp.asarray(self.times, jnp.float32)[:, self.worker_map(assignment.num_workers)]
    per_worker = times[iteration] / jnp.asarray(np.maximum(assignment.loads, 1), jnp.float32)
    tau = jnp.broadcast_to(per_worker[..., None], (*shape, *assignment.order.shape))
    if self.noise is not None:
      tau = tau * self.noise.sample(key, assignment, shape) / _mean(self.noise)
    return finalize(tau, assignment)

  def init_state(self, key, num_workers: int):
    del key
    self.worker_map(num_workers)        # fail at set-up, not in the first step
    return jnp.zeros((), jnp.int32)

  def sample_step(self, key, state, assignment: Assignment):
    r = jnp.mod(state, self.num_iterations)
    return self.durations(key, r, assignment), state + 1

  def sample(self, key, assignment: Assignment, shape=()):
    kr, kn = jax.random.split(key)
    r = jax.random.randint(kr, shape, 0, self.num_iterations)
    return self.durations(kn, r, assignment, shape)

  def __repr__(self):
    return (f"TraceReplay({self.name!r}, iterations={self.num_iterations}, "
            f"workers={self.num_traced_workers}, mapping={self.mapping!r})")


def _mean(model) -> float:
  mean = getattr(model, "mean", None)
  if mean is None:
    raise ParamError(f"trace noise must be a model with a mean (ShiftedExponential or Pareto "
                     f"with alpha > 1), got {model!r}.", "noise")
  return float(mean)


@STRAGGLER_MODELS.register("trace")
def _trace(trace: str = "alibaba_pai_job4", mapping: str = "wrap", noise: bool = False,
           shift: float = 1.0, rate: float = 1.0, seed: int = 0) -> TraceReplay:
  """:class:`TraceReplay` of ``trace``; ``noise``: per-chunk mean-one noise from a
  :class:`ShiftedExponential` ``(shift, rate)``."""
  return TraceReplay(trace, mapping, seed,
                     noise=ShiftedExponential(shift, rate) if noise else None)


class RecordedDurations:
  """Replays explicit durations ``τ[..., m, max_load]``, e.g. measured ones, as they are.

  Unlike :class:`TraceReplay` (per-worker iteration times of a real cluster, scaled
  to any assignment), these are the chunk durations themselves: the shape must be
  the assignment's ``[num_workers, max_load]``. ``key`` is ignored. Formerly
  ``Trace`` (still importable, deprecated).
  """

  def __init__(self, durations):
    self.durations = check_durations(durations)

  def sample(self, key, assignment: Assignment, shape=()):
    del key
    d = jnp.asarray(self.durations, jnp.float32)
    want = (assignment.num_workers, assignment.max_load)
    if d.shape[-2:] != want:
      raise ValueError(
          f"trace durations have trailing shape {d.shape[-2:]}, but the assignment "
          f"needs [..., num_workers, max_load] = [..., {want[0]}, {want[1]}].")
    return finalize(jnp.broadcast_to(d, (*shape, *want)) if shape else d, assignment)

  def __repr__(self):
    return f"RecordedDurations(shape={tuple(np.shape(self.durations))})"

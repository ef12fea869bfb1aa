"""Straggler timing: duration models, state at a time, oracle bound (PROTOCOL.md §4).

Durations are arrays ``τ[..., m, max_load]``: ``τ[..., j, t]`` is how long worker
``j`` takes for the ``t``-th chunk *it processes*. Empty slots and failed workers
have ``τ = inf``. ``F = cumsum(τ, -1)`` are the finish times.

Every model samples through ``jax.random``, so it runs under ``jit``/``vmap`` and
draws a batch of trials with ``shape=(trials,)``.
"""
from __future__ import annotations

import csv
import heapq
import importlib.resources
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgc.assignments import Assignment

__all__ = [
    "ShiftedExponential", "Pareto", "Slowdown", "Failures", "Trace",
    "FixedSlowdown", "GilbertElliott", "TraceReplay", "TRACES", "load_trace",
    "get_straggler_model", "get_model", "MODEL_PARAMS", "check_model",
    "finish_times", "progress", "worker_finish_times", "oracle_time",
    "kth_smallest", "check_durations", "event_loop_completion_time",
    "init_state", "sample_step", "sample_steps",
]


def _finalize(tau, assignment: Assignment):
  return jnp.where(jnp.asarray(assignment.slot_mask), tau, jnp.inf).astype(jnp.float32)


class ShiftedExponential(NamedTuple):
  """``τ = shift + Exp(rate)`` per chunk, i.i.d."""
  shift: float = 1.0
  rate: float = 1.0

  def sample(self, key, assignment: Assignment, shape=()):
    full = (*shape, assignment.num_workers, assignment.max_load)
    return _finalize(self.shift + jax.random.exponential(key, full) / self.rate, assignment)


class Pareto(NamedTuple):
  """``τ = scale · U^{-1/alpha}`` per chunk: heavy-tailed, minimum ``scale``."""
  scale: float = 1.0
  alpha: float = 2.0

  def sample(self, key, assignment: Assignment, shape=()):
    full = (*shape, assignment.num_workers, assignment.max_load)
    return _finalize(self.scale * jax.random.pareto(key, self.alpha, full), assignment)


class Slowdown(NamedTuple):
  """``base`` durations; a random ``fraction`` of the workers is ``factor`` times slower.

  Exactly ``round(fraction · m)`` workers are slow in each trial.
  """
  base: Any = ShiftedExponential()
  fraction: float = 0.2
  factor: float = 5.0

  def sample(self, key, assignment: Assignment, shape=()):
    kb, ks = jax.random.split(key)
    tau = self.base.sample(kb, assignment, shape)
    m = assignment.num_workers
    u = jax.random.uniform(ks, (*shape, m))
    rank = jnp.argsort(jnp.argsort(u, axis=-1), axis=-1)
    slow = rank < jnp.round(self.fraction * m)
    return jnp.where(slow[..., None], tau * self.factor, tau)


class FixedSlowdown(NamedTuple):
  """``base`` durations; the workers in ``workers`` are ``factor`` times slower at every step.

  The extreme of persistence (a fail-slow GPU, a throttled host), e.g. the
  adjacent workers ``(0, 1, 2, 3)`` that defeat a cyclic assignment.
  """
  base: Any = ShiftedExponential()
  workers: tuple = (0, 1, 2, 3)
  factor: float = 5.0

  def sample(self, key, assignment: Assignment, shape=()):
    tau = self.base.sample(key, assignment, shape)
    slow = np.zeros(assignment.num_workers, bool)
    slow[np.asarray(self.workers, int)] = True
    return jnp.where(jnp.asarray(slow)[:, None], tau * self.factor, tau)


class Failures(NamedTuple):
  """``base`` durations; each worker independently fails with probability ``p`` (``τ = inf``)."""
  base: Any = ShiftedExponential()
  p: float = 0.1

  def sample(self, key, assignment: Assignment, shape=()):
    kb, kf = jax.random.split(key)
    tau = self.base.sample(kb, assignment, shape)
    return self._fail(kf, tau, assignment, shape)

  def _fail(self, key, tau, assignment, shape=()):
    failed = jax.random.bernoulli(key, self.p, (*shape, assignment.num_workers))
    return jnp.where(failed[..., None], jnp.inf, tau)

  # A base with memory keeps it: failures are drawn fresh each step on top.
  @property
  def stateful(self) -> bool:
    return getattr(self.base, "stateful", False)

  def init_state(self, key, num_workers: int):
    return init_state(self.base, key, num_workers)

  def sample_step(self, key, state, assignment: Assignment):
    kb, kf = jax.random.split(key)
    tau, state = sample_step(self.base, kb, state, assignment)
    return self._fail(kf, tau, assignment), state


class Trace:
  """Replays explicit durations ``[..., m, max_load]`` (e.g. measured ones)."""

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
    return _finalize(jnp.broadcast_to(d, (*shape, *want)) if shape else d, assignment)


class GilbertElliott(NamedTuple):
  """Persistent stragglers (PROTOCOL.md §10): a fast/slow Markov chain per worker.

  ``s_j(t+1)``: fast → slow with probability ``p_slow``, slow → fast with
  ``p_recover``, independently per worker. Step ``t``'s durations are ``base``'s,
  times ``factor`` where ``s_j(t)`` is slow. The state is bool ``[m]`` (slow);
  it starts from the stationary law ``P(slow) = p_slow / (p_slow + p_recover)``,
  and a slow spell lasts ``1 / p_recover`` steps on average.

  :meth:`sample` draws each trial from the stationary law (no memory), so the
  stateless callers work; :func:`sample_steps` simulates the chain.
  """
  base: Any = ShiftedExponential()
  p_slow: float = 0.02
  p_recover: float = 0.1
  factor: float = 5.0

  stateful = True

  @property
  def slow_fraction(self) -> float:
    """The stationary ``P(slow)``."""
    return self.p_slow / (self.p_slow + self.p_recover)

  def init_state(self, key, num_workers: int):
    return jax.random.bernoulli(key, self.slow_fraction, (num_workers,))

  def durations(self, key, slow, assignment: Assignment, shape=()):
    """``base`` durations ``[*shape, m, max_load]``, times ``factor`` where ``slow`` ``[*shape, m]``."""
    tau = self.base.sample(key, assignment, shape)
    return jnp.where(slow[..., None], tau * self.factor, tau)

  def advance(self, key, slow):
    """One step of the chain: ``slow`` ``[..., m]`` -> next ``slow``."""
    u = jax.random.uniform(key, slow.shape)
    return jnp.where(slow, u >= self.p_recover, u < self.p_slow)

  def sample_step(self, key, state, assignment: Assignment):
    kd, kt = jax.random.split(key)
    return self.durations(kd, state, assignment), self.advance(kt, state)

  def sample(self, key, assignment: Assignment, shape=()):
    ks, kd = jax.random.split(key)
    slow = jax.random.bernoulli(ks, self.slow_fraction, (*shape, assignment.num_workers))
    return self.durations(kd, slow, assignment, shape)


# -- trace replay ------------------------------------------------------------------

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
    raise ValueError(f"unknown trace {trace!r}: use one of {sorted(TRACES)} or the path "
                     "of a CSV with columns worker,time,batch_time_norm.")
  return _read_trace(str(trace), str(trace))


def _read_trace(path: str, name: str) -> np.ndarray:
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    header = reader.fieldnames or []
    for col in _TRACE_COLUMNS:
      if col not in header:
        raise ValueError(f"trace {name}: no column {col!r} (header {header}); a trace CSV "
                         f"needs the columns {', '.join(_TRACE_COLUMNS)}.")
    try:
      rows = [(float(r["worker"]), float(r["time"]), float(r["batch_time_norm"]))
              for r in reader]
    except (TypeError, ValueError) as e:
      raise ValueError(f"trace {name}: a non-numeric worker, time or batch_time_norm "
                       f"({e}); every row needs three numbers.") from None
  if not rows:
    raise ValueError(f"trace {name} has no rows; it needs one row per worker and iteration.")
  worker, it, value = np.asarray(rows).T
  bad = ~(np.isfinite(value) & (value > 0))
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(f"trace {name}: batch_time_norm must be positive and finite, row {i} "
                     f"has {value[i]}; remove or fix that row.")
  workers, w_idx = np.unique(worker, return_inverse=True)
  iters, r_idx = np.unique(it, return_inverse=True)
  table = np.full((len(iters), len(workers)), np.nan)
  table[r_idx, w_idx] = value
  table = table[~np.isnan(table).any(axis=1)]
  if not len(table):
    raise ValueError(f"trace {name}: no iteration has a time for every worker.")
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
      raise ValueError(f"unknown trace mapping {mapping!r}; choose one of {MAPPINGS}.")
    if isinstance(trace, str):
      self.name, times = trace, load_trace(trace)
    else:
      self.name, times = "array", np.asarray(trace, np.float64)
      if times.ndim != 2 or not np.all(np.isfinite(times) & (times > 0)):
        raise ValueError("a trace array must be [iterations, workers] of positive finite "
                         "times.")
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
      raise ValueError(
          f"trace {self.name} has {w} workers but {num_workers} are simulated, and "
          f"mapping={self.mapping!r} uses each traced worker once; use mapping='wrap' "
          "(worker j plays traced worker j mod W) or at most W workers.")
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
    return _finalize(tau, assignment)

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
  if isinstance(model, ShiftedExponential):
    return model.shift + 1.0 / model.rate
  if isinstance(model, Pareto):
    if model.alpha <= 1:
      raise ValueError(f"Pareto noise needs alpha > 1 to have a mean, got {model.alpha}.")
    return model.scale * model.alpha / (model.alpha - 1)
  raise ValueError(f"trace noise must be a ShiftedExponential or Pareto, got {model!r}.")


# -- registry -----------------------------------------------------------------------

MODEL_PARAMS = {
    "shifted_exponential": ("shift", "rate"),
    "pareto": ("scale", "alpha"),
    "slowdown": ("shift", "rate", "fraction", "factor"),
    "gilbert_elliott": ("shift", "rate", "p_slow", "p_recover", "factor"),
    "trace": ("trace", "mapping", "noise", "shift", "rate"),
}
"""Config parameters each registered straggler model takes (``--config.straggler.<param>``)."""


def _range_error(name, value, want, fix):
  return ValueError(f"straggler parameter {name}={value!r} {want}; {fix}.")


def check_model(model):
  """Raises ``ValueError`` for an out-of-range parameter, naming it and the fix.

  Recurses into ``base``. Returns ``model``.
  """
  p = model._asdict() if hasattr(model, "_asdict") else {}
  for k, v in p.items():
    if isinstance(v, (int, float)) and not np.isfinite(v):
      raise _range_error(k, v, "must be finite", "give a finite number")
  if isinstance(model, ShiftedExponential):
    if model.shift < 0:
      raise _range_error("shift", model.shift, "is negative", "use shift >= 0 (the minimum "
                         "chunk time)")
    if model.rate <= 0:
      raise _range_error("rate", model.rate, "must be > 0", "the exponential part has mean "
                         "1/rate; use a positive rate")
  if isinstance(model, Pareto):
    for k in ("scale", "alpha"):
      if p[k] <= 0:
        raise _range_error(k, p[k], "must be > 0", f"use a positive {k}")
  if isinstance(model, (Slowdown, GilbertElliott, FixedSlowdown)) and model.factor < 1:
    raise _range_error("factor", model.factor, "is below 1 (slow workers would be faster)",
                       "use factor >= 1")
  if isinstance(model, Slowdown) and not 0 <= model.fraction <= 1:
    raise _range_error("fraction", model.fraction, "is outside [0, 1]",
                       "give the share of slow workers, e.g. 0.2")
  if isinstance(model, Failures) and not 0 <= model.p <= 1:
    raise _range_error("failure_prob", model.p, "is outside [0, 1]",
                       "give a probability, e.g. 0.1")
  if isinstance(model, GilbertElliott):
    for k in ("p_slow", "p_recover"):
      if not 0 <= p[k] <= 1:
        raise _range_error(k, p[k], "is outside [0, 1]", "give a per-step probability")
    if model.p_slow + model.p_recover == 0:
      raise _range_error("p_slow + p_recover", 0, "is 0 (no stationary law)",
                         "make at least one of them positive")
  if isinstance(model, TraceReplay) and model.noise is not None:
    check_model(model.noise)
  if "base" in p:
    check_model(p["base"])
  return model


def get_straggler_model(name: str, failure_prob: float = 0.0, **params):
  """Builds a straggler model from its config name; ``failure_prob > 0`` wraps it in :class:`Failures`.

  Parameters per name: :data:`MODEL_PARAMS`. ``slowdown`` and ``gilbert_elliott``
  take the shifted-exponential ``shift``/``rate`` of their base; ``trace`` takes
  ``trace`` (a name in :data:`TRACES` or a CSV path), ``mapping``, and ``noise``
  (bool: per-chunk mean-one shifted-exponential noise from ``shift``/``rate``).
  Out-of-range parameters raise ``ValueError`` naming the parameter and the fix.
  """
  if name not in MODEL_PARAMS:
    raise ValueError(f"unknown straggler model {name!r}; choose one of {sorted(MODEL_PARAMS)}.")
  unknown = sorted(set(params) - set(MODEL_PARAMS[name]))
  if unknown:
    raise ValueError(f"straggler model {name!r} takes no parameter(s) {unknown}; it takes "
                     f"{list(MODEL_PARAMS[name])}.")
  if name in ("slowdown", "gilbert_elliott", "trace"):
    base_params = {k: params.pop(k) for k in ("shift", "rate") if k in params}
  if name == "slowdown":
    model = Slowdown(ShiftedExponential(**base_params), **params)
  elif name == "gilbert_elliott":
    model = GilbertElliott(ShiftedExponential(**base_params), **params)
  elif name == "trace":
    noise = ShiftedExponential(**base_params) if params.pop("noise", False) else None
    model = TraceReplay(noise=noise, **params)
  else:
    model = {"shifted_exponential": ShiftedExponential, "pareto": Pareto}[name](**params)
  check_model(model)
  if not 0.0 <= failure_prob <= 1.0:
    raise ValueError(f"failure_prob must be in [0, 1], got {failure_prob}.")
  return Failures(model, failure_prob) if failure_prob > 0 else model


get_model = get_straggler_model   # the historical name; jaxgc.models.get_model builds networks


# -- models with memory across steps ---------------------------------------------

def init_state(model, key, num_workers: int):
  """The model's state before step 0: ``()`` for i.i.d. models.

  A model that remembers across steps (persistent stragglers) declares
  ``stateful = True`` and implements ``init_state(key, num_workers)`` and
  ``sample_step(key, state, assignment) -> (durations, state)``. The state is a
  pytree of arrays, so it lives in the training state and in checkpoints.
  """
  return model.init_state(key, num_workers) if getattr(model, "stateful", False) else ()


def sample_step(model, key, state, assignment: Assignment):
  """One step's durations ``[m, max_load]`` and the model's next state."""
  if getattr(model, "stateful", False):
    return model.sample_step(key, state, assignment)
  return model.sample(key, assignment), state


def sample_steps(model, key, assignment: Assignment, num_steps: int, state=None):
  """Durations of ``num_steps`` consecutive steps, ``[T, m, max_load]`` (``lax.scan``).

  Step ``t`` draws from ``fold_in(key, t)``; the chain starts at ``state``, or at
  :func:`init_state` (from a split of ``key``) when ``None``. For an i.i.d. model this is
  ``T`` independent draws.
  """
  if state is None:
    k0, key = jax.random.split(key)
    state = init_state(model, k0, assignment.num_workers)

  def body(state, t):
    tau, state = sample_step(model, jax.random.fold_in(key, t), state, assignment)
    return state, tau

  return jax.lax.scan(body, state, jnp.arange(num_steps))[1]


# -- state from durations ------------------------------------------------------

def check_durations(durations):
  """Rejects NaN or negative durations when they are concrete (a no-op under ``jit``)."""
  if isinstance(durations, jax.core.Tracer):
    return durations
  d = np.asarray(durations)
  if d.ndim < 2:
    raise ValueError(f"durations must be [..., num_workers, max_load], got shape {d.shape}.")
  if np.isnan(d).any():
    idx = tuple(int(i) for i in np.argwhere(np.isnan(d))[0])
    raise ValueError(
        f"durations contain NaN (first at index {idx}). Use inf for a failed worker "
        "or an empty slot; NaN has no meaning as a time.")
  if (d < 0).any():
    raise ValueError("durations must be non-negative.")
  return durations


def finish_times(durations):
  """``F[..., j, t] = Σ_{u≤t} τ[..., j, u]``."""
  return jnp.cumsum(jnp.asarray(check_durations(durations)), axis=-1)


def progress(durations, t):
  """State at time ``t``: ``k_j = #{t' : F[j, t'] ≤ t}``, int32 ``[..., m]``.

  ``t`` broadcasts against the batch shape ``[...]``. Failed or empty slots never finish.
  """
  f = finish_times(durations)
  t = jnp.asarray(t, f.dtype)[..., None, None]
  return jnp.sum((f <= t) & jnp.isfinite(f), axis=-1, dtype=jnp.int32)


def worker_finish_times(durations, assignment: Assignment):
  """Time at which each worker finishes its whole list, ``F[j, δ_j]``, ``[..., m]``."""
  f = finish_times(durations)
  last = jnp.asarray(np.maximum(assignment.loads - 1, 0))
  out = jnp.take_along_axis(f, jnp.broadcast_to(last[:, None], f.shape[:-1] + (1,)), axis=-1)
  return out[..., 0]


def kth_smallest(x, k: int, axis: int = -1):
  """The ``k``-th smallest (1-based) along ``axis``; ``inf`` if ``k`` exceeds the size."""
  x = jnp.moveaxis(jnp.asarray(x), axis, -1)
  if k > x.shape[-1]:
    return jnp.full(x.shape[:-1], jnp.inf, x.dtype)
  # top_k of -x is a partial sort: cheaper than a full sort when k is small.
  return -jax.lax.top_k(-x, k)[0][..., k - 1]


def oracle_time(durations, assignment: Assignment, ell: int):
  """Lower bound on any protocol: first time the fleet has done ``N·ℓ`` chunk computations.

  Pretends any worker may process any chunk, so the ``(N·ℓ)``-th smallest finish
  time over all slots; ``[...]``.
  """
  f = finish_times(durations)
  f = jnp.where(jnp.asarray(assignment.slot_mask), f, jnp.inf)
  return kth_smallest(f.reshape(*f.shape[:-2], -1), assignment.num_chunks * ell)


def event_loop_completion_time(durations, is_decodable: Callable[[np.ndarray], bool]) -> float:
  """Reference simulator: a Python event loop over chunk completions.

  Pops chunk-finish events in time order, updates the state ``k`` and returns the
  first time ``is_decodable(k)`` holds (``inf`` if never). Slow; for tests and for
  benchmarking the vectorised ``completion_time`` against.
  """
  tau = np.asarray(check_durations(durations), np.float64)
  m, _ = tau.shape
  k = np.zeros(m, np.int64)
  if is_decodable(k):
    return 0.0
  heap = [(tau[j, 0], j) for j in range(m) if np.isfinite(tau[j, 0])]
  heapq.heapify(heap)
  while heap:
    t, j = heapq.heappop(heap)
    k[j] += 1
    if is_decodable(k):
      return float(t)
    if k[j] < tau.shape[1] and np.isfinite(tau[j, k[j]]):
      heapq.heappush(heap, (t + tau[j, k[j]], j))
  return float("inf")

"""The coded step on real asynchronous workers: Ray actors and a PS that never waits for stragglers.

The SPMD step (:mod:`jaxgc.parallel`) simulates time: every device waits for every
other one, so a real straggler slows all protocols alike. Here the ``m`` jaxgc
workers run on ``num_actors`` Ray actors (worker ``j`` on actor ``j mod num_actors``)
and the driver plays the PS, in real time:

1. **Dispatch.** The step's injected durations ``τ [m, max_load]`` come from the
   straggler model and the step's key (``fold_in(key, step)``, as in
   :class:`jaxgc.parallel.CodedStep`). Each worker processes its chunks in its
   assigned order: real JAX compute (one jitted ``value_and_grad`` per actor), then
   an injected sleep of ``τ · time_scale`` seconds; ``τ = inf`` (a failed worker)
   stops it. It keeps each finished chunk gradient and reports the chunk to the PS.
   Only actors that Ray's control store calls alive get work
   (:class:`jaxgc.ray_faults.ActorLiveness`): the workers of a dead or restarting
   actor are the step's ``dead_workers``, and a restarted actor gets the current
   parameters with its next dispatch. ``fail_at`` kills the actor hosting a
   worker at the start of a step (:mod:`jaxgc.faults`).
2. **Watch.** The PS reads the reports as they come (``ray.wait`` on streaming
   generators, never a blocking get on one worker) and stops as soon as the
   protocol's ``completion_time`` of the arrivals so far is finite, i.e. at the
   moment the simulator would stop on these arrival times (for the coded
   protocols: every chunk has ``ℓ`` finishers; for backup workers: ``m − b``
   workers reported), in exact mode; or at the deadline
   ``T · time_scale`` wall seconds after dispatch (deadline mode; ``T`` is in
   simulated seconds as everywhere in jaxgc, so one config runs on both backends).
   An exact-mode step that can never decode (dead workers) stops once nothing
   more can arrive, or at ``timeout · time_scale`` plus ``message_timeout`` wall
   seconds for the real compute.
3. **Round.** The PS solves the coefficients of the observed state with the
   protocol's own solve, sends each worker its row, and collects the ``⌈d/ℓ⌉``
   messages (:func:`jaxgc.protocols.encode` on the worker). That call also stops
   every worker: work no longer needed is dropped between chunks and mid-sleep.
4. **Erasures** (PROTOCOL.md §2). A worker whose actor died, whose message is
   lost or non-finite, gets ``k_j = 0``; the PS re-solves once and collects again
   from the rest. Exact if coverage still allows, else the deadline-mode estimate
   (``exact`` is False). A failure in that second round, or no sender at all,
   skips the step; a skipped or non-finite update never touches the parameters.
5. **Decode and update** on the PS (:func:`jaxgc.protocols.decode`, ``optax``).
   The metrics add the final solve's ``condition_number``, each message's size
   (``message_bytes``) and its measured transfer time (``message_transfer_s``).

Times: ``step_sim_time`` is the simulator's stop time for the injected durations
(the same number the SPMD backend reports for the same key), ``wall_time`` the
real seconds of the step. Each step's measured chunk finish times are kept in
:attr:`RayStep.last_record`; :func:`measured_durations` turns one into durations
for :class:`jaxgc.timing.Trace`, so a real run replays in the simulator.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import os
import socket
import time
import uuid
import weakref
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from jaxgc import faults as _faults
from jaxgc import protocols as _protocols
from jaxgc import ray_faults
from jaxgc.backends import base as _backend
from jaxgc.parallel import TrainState

__all__ = ["RayStep", "WorkerPool", "connect", "measured_durations", "work_slots"]

INSTALL_HINT = "pip install 'jaxgc[ray]'"
# Each actor is one CPU-sized worker: one XLA thread, one CPU device.
ACTOR_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false --xla_force_host_platform_device_count=1"


def _import_ray():
  try:
    import ray  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ValueError(f"the Ray backend needs Ray: {INSTALL_HINT}") from None
  return ray


def _one_line(err: BaseException) -> str:
  text = str(err).strip().splitlines()
  return text[0] if text else type(err).__name__


# -- the protocol interface, in one place ------------------------------------------

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


_PS_FUNCTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_decode = jax.jit(_protocols.decode, static_argnums=2)


def _ps_functions(protocol):
  """The PS's jitted ``is_decodable``, solve, ``coverage`` and stop test, once per protocol object.

  The stop test takes the arrival times ``F [m, max_load]`` so far (``inf`` for
  chunks not arrived) and asks the simulator's own rule: is ``completion_time``
  of those durations already finite?
  """
  if protocol not in _PS_FUNCTIONS:
    ref = weakref.ref(protocol)     # a strong one in the values would keep every key alive

    def live():
      p = ref()
      assert p is not None            # the entry goes with its key, so p outlives its uses
      return p

    def complete(f):
      tau = jnp.diff(f, axis=1, prepend=0.0)
      return jnp.isfinite(live().completion_time(jnp.where(jnp.isfinite(f), tau, jnp.inf)))
    _PS_FUNCTIONS[protocol] = (jax.jit(lambda c: live().is_decodable(c)),
                               jax.jit(lambda c: _solve(live(), c)),
                               jax.jit(lambda c: live().coverage(c)),
                               jax.jit(complete))
  return _PS_FUNCTIONS[protocol]


# -- Ray: connecting ---------------------------------------------------------------

def _check_reachable(address: str, timeout: float) -> None:
  """Fails in ``timeout`` seconds, not Ray's minute, when nothing listens at ``address``."""
  if address in ("auto", "local"):
    return
  hostport = address.split("://", 1)[-1]
  host, sep, port = hostport.rpartition(":")
  if not sep or not port.isdigit():
    raise ValueError(f"Ray address {address!r} is not host:port (or ray://host:port, or 'auto'); "
                     "fix --config.ray.address, or leave it unset to start a local Ray instance.")
  try:
    socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
  except OSError as err:
    raise ValueError(f"cannot reach the Ray cluster at {address!r} ({_one_line(err)}); fix "
                     "the address, or leave it unset to start a local Ray instance.") from None


def connect(address: str | None = None, *, num_cpus: int | None = None,
            connect_timeout: float = 5.0) -> bool:
  """Joins the Ray cluster at ``address``, or starts a local one; returns whether it started one.

  Args:
    address: ``None`` uses the Ray instance this process already joined, else
      starts a local one; ``"host:port"``, ``"ray://host:port"`` or ``"auto"``
      joins an existing cluster.
    num_cpus: logical CPUs of a local instance.
    connect_timeout: seconds before an unreachable address is an error.
  Raises:
    ValueError: Ray missing, or the address is malformed or unreachable (one line each).
  """
  ray = _import_ray()
  if address is None:
    if ray.is_initialized():
      return False
    ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    return True
  _check_reachable(address, connect_timeout)
  if ray.is_initialized():
    raise ValueError(f"this process already joined a Ray instance, so it cannot join {address!r}; "
                     "leave the address unset to use the current one.")
  try:
    ray.init(address=address, configure_logging=False, log_to_driver=False)
  except Exception as err:  # pylint: disable=broad-except
    raise ValueError(f"cannot join the Ray cluster at {address!r}: {_one_line(err)}") from None
  return False


# -- the actor -----------------------------------------------------------------------

class _Program:
  """What an actor compiles once per step object: the chunk gradient and the encode."""

  def __init__(self, loss_fn):
    def chunk_grad(params, chunk):
      loss, g = jax.value_and_grad(loss_fn)(params, chunk)
      return loss, ravel_pytree(g)[0]
    self.grad = jax.jit(chunk_grad)
    self.encode = jax.jit(_protocols.encode)


class _Run:
  """An actor's state for one step: its workers' chunk gradients and the stop signal."""

  def __init__(self, step: int, program: _Program):
    self.step, self.program = step, program
    self.stop = asyncio.Event()
    self.grads: dict[int, np.ndarray] = {}


class _WorkerHost:
  """One Ray actor hosting several jaxgc workers; they overlap their injected sleeps."""

  def __init__(self, xla_flags: str | None):
    if xla_flags is not None:      # before this process's JAX starts its backend
      os.environ["XLA_FLAGS"] = xla_flags
    self.programs: dict[str, _Program] = {}
    self.runs: dict[str, _Run] = {}

  def ready(self):
    """``(hostname, pid, Ray node id)`` of this actor."""
    import ray  # pylint: disable=import-outside-toplevel
    return socket.gethostname(), os.getpid(), ray.get_runtime_context().get_node_id()

  async def _program(self, token, setup) -> _Program:
    if token not in self.programs:
      # ``setup`` is a one-element list so that Ray hands over the reference,
      # which is fetched only on first use (and again after a restart).
      self.programs[token] = _Program(await setup[0])
    return self.programs[token]

  async def warmup(self, token, setup, params, chunk, max_load: int, ell: int):
    """Compiles the gradient and the encode, so that no step's clock pays for it."""
    prog = await self._program(token, setup)
    _, g = prog.grad(params, chunk)
    prog.encode(np.zeros((max_load, g.shape[0]), np.float32), np.zeros((max_load, ell), np.float32))
    return True

  async def run(self, token, setup, key: str, step: int, params, chunks, work, max_load: int):
    """Step ``step`` of run ``key``'s workers: yields ``(j, n, loss, compute_s, chunk_s, t)``.

    ``work``: ``[(j, rows, slots, sleeps)]``: worker ``j`` computes ``chunks[rows[n]]``
    into list slot ``slots[n]``, then sleeps ``sleeps[n]`` seconds (``inf``: it fails).
    ``t`` is the finish time since this call started.
    """
    prog = await self._program(token, setup)
    old = self.runs.get(key)
    if old is not None:
      old.stop.set()
    run = self.runs[key] = _Run(step, prog)
    params = jax.device_put(params)
    d = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    queue: asyncio.Queue = asyncio.Queue()
    start = time.perf_counter()

    async def worker(j, rows, slots, sleeps):
      grads = run.grads[j] = np.zeros((max_load, d), np.float32)
      for n, (row, slot, pause) in enumerate(zip(rows, slots, sleeps, strict=True)):
        if run.stop.is_set() or not np.isfinite(pause):
          break
        c0 = time.perf_counter()
        loss, g = prog.grad(params, jax.tree.map(lambda a, r=row: a[r], chunks))
        g = np.asarray(g)
        compute = time.perf_counter() - c0
        if pause > 0:
          # An interruptible sleep: the PS may stop the step meanwhile.
          with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(run.stop.wait(), pause)
        if run.stop.is_set():
          break
        grads[slot] = g        # kept before the report, so a counted chunk can be encoded
        now = time.perf_counter()
        queue.put_nowait((j, n, float(loss), compute, now - c0, now - start))
        await asyncio.sleep(0)   # let the report go out before the next compute
      queue.put_nowait(None)

    tasks = [asyncio.ensure_future(worker(*w)) for w in work]
    left = len(tasks)
    while left:
      item = await queue.get()
      if item is None:
        left -= 1
      else:
        yield item
    await asyncio.gather(*tasks)

  async def encode(self, key: str, step: int, rows, stop: bool = True):
    """``({j: z_j}, sent)``: messages for ``rows = {j: (enc [max_load, ℓ], fault)}``; stops.

    ``sent`` is ``time.time()`` as the messages leave, for the PS's transfer time.

    ``fault`` injects what the network or the worker might do: ``"lost"`` (no
    message arrives) or ``"nan"`` (a corrupted one). ``None`` for a worker that
    holds no gradients for this step (e.g. restarted since): the PS erases it.
    """
    run = self.runs.get(key)
    if run is None or run.step != step:
      return {j: None for j in rows}, time.time()
    if stop:
      run.stop.set()
    prog = run.program
    out: dict[int, np.ndarray | None] = {}
    for j, (enc, fault) in rows.items():
      if fault == "lost" or j not in run.grads:
        out[j] = None
        continue
      z = np.asarray(prog.encode(run.grads[j], enc))
      out[j] = np.full_like(z, np.nan) if fault == "nan" else z
    return out, time.time()


class WorkerPool:
  """``num_actors`` Ray actors that host jaxgc workers; several :class:`RayStep` may share one.

  Args:
    num_actors: actors to start (one per CPU, GPU or host).
    address: Ray cluster to join (see :func:`connect`); ``None`` starts a local
      instance, or uses the one this process already joined.
    actor_options: passed to ``ActorClass.options`` (e.g. ``{"num_gpus": 1}``);
      the default asks one logical CPU per actor and restarts dead actors.
    xla_flags: ``XLA_FLAGS`` of the actors' processes (``None`` leaves theirs);
      by default one CPU device and one XLA thread per actor.
    startup_timeout: seconds for the actors to start before giving up.
    connect_timeout: seconds before an unreachable ``address`` is an error.
  """

  def __init__(self, num_actors: int = 4, *, address: str | None = None,
               actor_options: dict | None = None, xla_flags: str | None = ACTOR_XLA_FLAGS,
               startup_timeout: float = 120.0, connect_timeout: float = 5.0):
    if not isinstance(num_actors, (int, np.integer)) or num_actors < 1:
      raise ValueError(f"num_actors must be a positive integer, got {num_actors!r}; set "
                       "--config.ray.num_actors.")
    ray = self.ray = _import_ray()
    self.num_actors = int(num_actors)
    self.startup_timeout = float(startup_timeout)
    self._programs: dict[int, tuple] = {}
    self.owns_ray = connect(address, num_cpus=max(self.num_actors, os.cpu_count() or 1),
                            connect_timeout=connect_timeout)
    options = {"num_cpus": 1, "max_restarts": -1, **(actor_options or {})}
    cls = ray.remote(_WorkerHost)
    self.actors = [cls.options(**options).remote(xla_flags) for _ in range(self.num_actors)]
    try:
      self.hosts = ray.get([a.ready.remote() for a in self.actors], timeout=startup_timeout)
    except Exception as err:  # pylint: disable=broad-except
      cpus = ray.cluster_resources().get("CPU", 0)
      self.close()
      raise ValueError(
          f"the {num_actors} Ray actors did not start within {startup_timeout:.0f} s "
          f"({_one_line(err)}); the cluster has {cpus:g} CPUs for {num_actors} actors asking "
          f"{options.get('num_cpus', 1)} each. Lower --config.ray.num_actors or pass "
          "actor_options.") from None

  def program(self, loss_fn):
    """``(token, setup)`` naming ``loss_fn`` on the actors: steps sharing it share one compile."""
    if id(loss_fn) not in self._programs:     # holds loss_fn, so its id stays unique
      self._programs[id(loss_fn)] = (uuid.uuid4().hex, [self.ray.put(loss_fn)], loss_fn)
    return self._programs[id(loss_fn)][:2]

  def close(self):
    """Kills the actors, and shuts Ray down if this pool started it."""
    for a in getattr(self, "actors", []):
      with contextlib.suppress(Exception):   # already dead: nothing to kill
        self.ray.kill(a, no_restart=True)
    self.actors = []
    if self.owns_ray and self.ray.is_initialized():
      self.ray.shutdown()
    self.owns_ray = False

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# -- the PS ---------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=tuple(range(7)))
def _draw(protocol, straggler, mode, deadline, timeout, loss_prob, nan_prob, key, step,
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
def _apply_update(tx, params, opt_state, g):
  """``optax`` update from the flat gradient ``g [d]``, and whether it is finite
  (:func:`jaxgc.backends.base.optimizer_update`, as the SPMD step)."""
  return _backend.optimizer_update(tx, ravel_pytree(params)[1](g), opt_state, params)


def _unravel(like, flat):
  """``flat [d]`` as a pytree like ``like`` (NumPy: nothing for JAX to compile on the PS)."""
  leaves, treedef = jax.tree.flatten(like)
  sizes = np.cumsum([np.size(x) for x in leaves])[:-1]
  parts = np.split(np.asarray(flat), sizes)
  return jax.tree.unflatten(treedef, [p.reshape(np.shape(x)).astype(np.asarray(x).dtype)
                                      for p, x in zip(parts, leaves, strict=True)])


def measured_durations(record) -> np.ndarray:
  """Durations ``[m, max_load]`` in simulated seconds, as the PS observed them in one step.

  From the arrival times of the chunk reports (:attr:`RayStep.last_record`),
  divided by ``time_scale``; chunks that did not arrive are ``inf``. Replay with
  ``jaxgc.timing.Trace(measured_durations(record))``: its completion time is when
  the PS saw the state become decodable.
  """
  f = np.asarray(record["finish_wall"], np.float64) / record["time_scale"]
  prev = np.concatenate([np.zeros_like(f[:, :1]), f[:, :-1]], axis=1)
  tau = f - prev
  return np.where(np.isfinite(tau), tau, np.inf)


class _Seen:
  """What the PS saw in the watch phase, per worker and list slot (``[m, max_load]``)."""

  def __init__(self, m: int, width: int, num_chunks: int):
    self.counts = np.zeros(m, np.int32)
    self.finish = np.full((m, width), np.nan)      # arrival at the PS, s since dispatch
    self.chunk_s = np.full((m, width), np.nan)     # worker-measured chunk time (compute + sleep)
    self.compute_s = np.full((m, width), np.nan)   # of which real compute
    self.worker_t = np.full((m, width), np.nan)    # finish as the worker saw it, s since its start
    self.losses = np.full(num_chunks, np.nan)
    self.dead, self.erased = np.zeros(m, bool), np.zeros(m, bool)
    self.stop_wall = 0.0
    self.observed = self.counts


@dataclasses.dataclass
class _Rounds:
  """The message rounds' outcome: final ``counts [m]``, messages, coefficients, sizes, timings."""
  counts: np.ndarray
  nbytes: np.ndarray           # [m] bytes of each worker's message as sent (0: none)
  transfer_s: np.ndarray       # [m] its actor's send to the PS's receipt (nan: none)
  msgs: np.ndarray
  dec: np.ndarray | None = None
  condition: float = 1.0
  senders: np.ndarray | None = None
  failed_again: bool = False
  solve_s: float = 0.0
  round_s: float = 0.0


class RayStep:
  """A coded gradient step whose workers are Ray actors and whose PS is this process.

  The step interface of :class:`jaxgc.parallel.CodedStep` (``init_state``,
  ``update``, ``jit``), run on the host in real time; see the module docstring.

  Args:
    protocol: a :mod:`jaxgc.protocols` protocol.
    straggler: a :mod:`jaxgc.timing` model; its durations become injected sleeps.
    loss_fn: ``loss(params, chunk) -> scalar`` (:func:`jaxgc.models.chunk_loss_fn`).
    tx: an ``optax.GradientTransformation``.
    mode: ``"exact"`` or ``"deadline"``.
    deadline: ``T`` in simulated seconds (deadline mode): the PS stops at
      ``T · time_scale`` wall seconds after dispatch.
    timeout: exact mode, simulated seconds after which a step that cannot decode
      stops anyway (default: once nothing more can arrive).
    num_actors: Ray actors (ignored when ``pool`` is given).
    time_scale: wall seconds per simulated second of injected delay.
    address: Ray cluster to join; ``None`` starts a local instance.
    message_loss_prob: probability that a message is lost (injected, round 1).
    nan_message_prob: probability that a message arrives as NaN (injected, round 1).
    pool: a :class:`WorkerPool` to run on (shared, not closed by :meth:`close`).
    message_timeout: wall seconds to wait for messages; later ones are erased.
    keep_records: how many recent steps :attr:`records` keeps.
    fail_at: ``[(worker, step), ...]`` (:func:`jaxgc.faults.fault_schedule`): at the
      start of ``step`` the actor hosting ``worker`` is killed for real (so all of
      that actor's workers fail, until Ray has restarted it).
    report_condition: add ``condition_number`` (the final solve's) to the metrics
      where the protocol reports one, as the SPMD step does.

  Attributes:
    liveness: the PS's :class:`jaxgc.ray_faults.ActorLiveness`; its ``restarts``
      lists each actor outage and how many steps and seconds it cost.
  """

  # A jaxgc.backends.StepBackend that runs on the host: no trace, host chunks, host params.
  traced = False
  layout = None

  def __init__(self, protocol, straggler, loss_fn: Callable, tx: optax.GradientTransformation, *,
               mode: str = "exact", deadline: float | None = None, timeout: float | None = None,
               num_actors: int = 4, time_scale: float = 0.01, address: str | None = None,
               message_loss_prob: float = 0.0, nan_message_prob: float = 0.0,
               pool: WorkerPool | None = None, message_timeout: float = 60.0,
               keep_records: int = 1000, fail_at=None, report_condition: bool = True):
    _backend.check_step_args(protocol, mode, deadline, timeout, message_loss_prob,
                             nan_message_prob)
    if not np.isfinite(time_scale) or time_scale <= 0:
      raise ValueError(f"time_scale must be positive (wall seconds per simulated second), got "
                       f"{time_scale!r}; set --config.ray.time_scale.")
    self.protocol, self.assignment = protocol, protocol.assignment
    self.straggler, self.loss_fn, self.tx = straggler, loss_fn, tx
    self.mode = mode
    self.deadline = None if deadline is None else float(deadline)
    self.timeout = None if timeout is None else float(timeout)
    self.time_scale = float(time_scale)
    self.message_loss_prob = float(message_loss_prob)
    self.nan_message_prob = float(nan_message_prob)
    self.message_timeout = float(message_timeout)
    self.slots = work_slots(protocol)
    self.faults = _faults.fault_schedule(fail_at, protocol.assignment.num_workers)
    self.report_condition = bool(report_condition) and protocol.reports_condition
    self.closed = False
    self.owns_pool = pool is None
    self.pool = WorkerPool(num_actors, address=address) if pool is None else pool
    self.ray = self.pool.ray
    self.token, self.setup = self.pool.program(loss_fn)
    self.key = uuid.uuid4().hex
    self.records: collections.deque = collections.deque(maxlen=keep_records)
    self.last_record: dict | None = None
    self._warm = False
    self._straggler_state = None
    self._decodable, self._coefficients, self._coverage, self._complete = _ps_functions(protocol)
    self.liveness = ray_faults.ActorLiveness(self.ray, self.pool.actors)

  def _check_open(self):
    if self.closed:
      raise ValueError("this RayStep is closed (its actors are gone); make a new one.")

  # -- state ------------------------------------------------------------------------
  def init_state(self, params, key) -> TrainState:
    """A fresh :class:`jaxgc.parallel.TrainState` (``plan`` unused: the PS plans in real time)."""
    state = TrainState.create(params, self.tx)
    s0 = _backend.init_straggler_state(self.straggler, key, self.assignment.num_workers)
    if hasattr(state, "straggler_state"):
      state = state.replace(straggler_state=s0)
    else:      # a TrainState without the field: the model's memory lives here
      self._straggler_state = s0
    return state

  def warmup(self, params, chunks, straggler_state=None):
    """Compiles every actor's programs and the PS's, outside any step's clock.

    The first :meth:`update` or :meth:`gradient` calls it; call it earlier to
    keep compilation out of a measurement. Waits for restarting actors.
    """
    self._check_open()
    host = jax.device_get(params)
    self._warmup(self.ray.put(host), jax.tree.map(np.asarray, jax.device_get(chunks)))
    _draw(self.protocol, self.straggler, self.mode, self.deadline, self.timeout,
          self.message_loss_prob, self.nan_message_prob, jax.random.key(0), 0,
          () if straggler_state is None else straggler_state)
    _apply_update(self.tx, params, self.tx.init(params),
                  np.zeros(sum(int(np.size(x)) for x in jax.tree.leaves(host)), np.float32))

  def _warmup(self, params_ref, chunks):
    ray, a = self.ray, self.assignment
    one = jax.tree.map(lambda x: np.asarray(x[0]), chunks)
    pending, until = list(self.pool.actors), time.perf_counter() + self.pool.startup_timeout
    while pending:
      refs = [(h, h.warmup.remote(self.token, self.setup, params_ref, one, a.max_load,
                                  self.protocol.ell)) for h in pending]
      pending = []
      for h, ref in refs:
        try:
          ray.get(ref)
        except ray.exceptions.ActorUnavailableError:     # restarting: wait for it
          if time.perf_counter() > until:
            raise
          pending.append(h)
        except ray.exceptions.RayActorError:     # dead for good: the steps run without it
          pass
      time.sleep(0.1 if pending else 0)
    counts = jnp.asarray(a.loads, jnp.int32)
    never = np.full((a.num_workers, a.max_load), np.inf, np.float32)
    jax.block_until_ready((self._decodable(counts), self._coefficients(counts),
                           self._complete(never)))
    self._warm = True

  def gradient(self, params, chunks, key, step: int = 0, straggler_state=None):
    """Runs the workers and the PS for one step: ``(ĝ as a pytree, metrics)``.

    ``ĝ`` may be NaN only when ``metrics['skipped']``. The step's record goes to
    :attr:`last_record` and :attr:`records`.
    """
    g, metrics, _ = self._gradient(params, chunks, key, step, straggler_state)
    return _unravel(params, g), metrics

  def _gradient(self, params, chunks, key, step, straggler_state):
    """One step in the phases of the module docstring: ``(g [d], metrics, straggler_state)``."""
    self._check_open()
    wall0 = time.perf_counter()
    tau, lost, corrupt, sim_stop, straggler_state = _draw(
        self.protocol, self.straggler, self.mode, self.deadline, self.timeout,
        self.message_loss_prob, self.nan_message_prob, key, step,
        () if straggler_state is None else straggler_state)
    tau, lost, corrupt = np.asarray(tau, np.float64), np.asarray(lost), np.asarray(corrupt)
    host_params = jax.device_get(params)
    d = sum(int(np.size(x)) for x in jax.tree.leaves(host_params))
    chunks = jax.tree.map(np.asarray, jax.device_get(chunks))
    params_ref = self.ray.put(host_params)
    if not self._warm:
      self._warmup(params_ref, chunks)
      wall0 = time.perf_counter()
    injected = self._inject_faults(step)
    a0 = time.perf_counter()
    alive = self._alive(step)
    alive_wait = time.perf_counter() - a0
    t0, gens, workers_of = self._dispatch(step, tau, chunks, params_ref, alive)
    seen = self._watch(step, gens, workers_of, t0, alive)
    rounds = self._round(step, seen, workers_of, lost, corrupt, d)
    g, metrics = self._decode(seen, rounds, d)
    metrics.update(step_sim_time=float(sim_stop), faults_injected=injected,
                   alive_wait_s=alive_wait)
    self.last_record = {
        "step": int(step), "time_scale": self.time_scale, "durations": tau,
        "lost": lost, "corrupt": corrupt,
        "finish_wall": seen.finish, "chunk_wall": seen.chunk_s, "compute_wall": seen.compute_s,
        "worker_wall": seen.worker_t, "counts_observed": seen.observed, "counts": rounds.counts,
        "stop_wall": seen.stop_wall, "sim_stop": float(sim_stop), "erased": seen.erased,
        "dead": seen.dead, "dispatch_s": t0 - wall0, "message_bytes": rounds.nbytes,
        "transfer_s": rounds.transfer_s,
    }
    self.records.append(self.last_record)
    return g, metrics, straggler_state

  def _inject_faults(self, step) -> int:
    """Kills the actors hosting the workers that ``fail_at`` names at ``step``; how many."""
    hosts = sorted({j % len(self.pool.actors) for j in self.faults.workers_at(int(step))})
    return sum(self.liveness.kill(h, step) for h in hosts)

  def _alive(self, step) -> np.ndarray:
    """``bool [num_actors]``: actors to dispatch to; with none, waits for one to come back.

    A step with no live actor could only be skipped; a restart takes seconds, so
    the PS waits up to ``message_timeout`` for one instead of skipping a burst of steps.
    """
    alive = self.liveness.poll(step)
    until = time.perf_counter() + self.message_timeout
    while not alive.any() and len(self.liveness.lost) < len(alive) and time.perf_counter() < until:
      time.sleep(0.05)
      alive = self.liveness.poll(step)
    return alive

  def _dispatch(self, step, tau, chunks, params_ref, alive):
    """Phase 1: each live actor gets its workers' lists, sleeps, chunks and the parameters.

    Returns ``(t0, {generator: actor}, workers_of)``; ``workers_of[h]`` lists actor
    ``h``'s workers (worker ``j`` on actor ``j mod num_actors``).
    """
    a, m, num_actors = self.assignment, self.assignment.num_workers, len(self.pool.actors)
    chunk_of = [a.order[j, self.slots[j]] for j in range(m)]
    workers_of = [list(range(h, m, num_actors)) for h in range(num_actors)]
    gens = {}
    t0 = time.perf_counter()
    for h, actor in enumerate(self.pool.actors):
      if not alive[h]:
        continue
      mine = workers_of[h]
      ids = np.unique(np.concatenate([chunk_of[j] for j in mine] + [np.zeros(0, np.int32)]))
      row = {int(i): r for r, i in enumerate(ids)}
      work = [(j, np.array([row[int(i)] for i in chunk_of[j]], np.int32), self.slots[j],
               tau[j, :len(self.slots[j])] * self.time_scale) for j in mine]
      sub = jax.tree.map(lambda x, ids=ids: x[ids], chunks)
      gen = actor.run.options(num_returns="streaming").remote(
          self.token, self.setup, self.key, step, params_ref, sub, work, a.max_load)
      gens[gen] = h
    return t0, gens, workers_of

  def _watch(self, step, gens, workers_of, t0, alive) -> _Seen:
    """Phase 2: reports as they come; stop at completion, the deadline or nothing left."""
    ray, a = self.ray, self.assignment
    seen = _Seen(a.num_workers, a.max_load, a.num_chunks)
    for h in np.flatnonzero(~alive):
      seen.dead[workers_of[h]] = True
    if self.mode == "deadline":
      assert self.deadline is not None     # __init__ requires one in deadline mode
      limit = self.deadline * self.time_scale
    else:
      # The timeout is simulated seconds of injected delay; the workers' real compute
      # comes on top (it dominates at a small time_scale), so the PS waits
      # message_timeout more wall seconds before giving up on a step.
      limit = np.inf if self.timeout is None else (self.timeout * self.time_scale
                                                   + self.message_timeout)
    live = dict(gens)
    arrived = np.full((a.num_workers, a.max_load), np.inf, np.float32)  # the stop test's view
    complete = bool(self._complete(arrived))
    while live and not complete:
      left = limit - (time.perf_counter() - t0)
      if left <= 0:
        break
      ready, _ = ray.wait(list(live), num_returns=1, timeout=min(left, 0.1))
      if not ready:
        # Ray tells a generator of its actor's death a second or more late; the GCS
        # knows within milliseconds.
        for g in [g for g, h in live.items() if ray_faults.actor_state(
            ray, self.pool.actors[h])[0] in ("RESTARTING", "DEAD")]:
          self._lose(step, live.pop(g), seen, arrived, workers_of)
      for g in ready:
        h = live[g]
        try:
          j, n, loss, comp, took, at = ray.get(next(g))
        except StopIteration:
          del live[g]
          continue
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
          self._lose(step, live.pop(g), seen, arrived, workers_of)
          continue
        if seen.dead[j]:
          continue
        self.liveness.reported(h, step)
        seen.counts[j] = n + 1
        seen.finish[j, n] = arrived[j, n] = time.perf_counter() - t0
        seen.chunk_s[j, n], seen.compute_s[j, n], seen.worker_t[j, n] = took, comp, at
        chunk = a.order[j, self.slots[j][n]]
        if np.isnan(seen.losses[chunk]):
          seen.losses[chunk] = loss
      complete = bool(self._complete(arrived))
    seen.stop_wall = time.perf_counter() - t0
    seen.observed = seen.counts.copy()
    return seen

  def _lose(self, step, h, seen, arrived, workers_of):
    """Actor ``h`` died in the watch: its workers are dead, counted work is erased."""
    self.liveness.failed(h, step)
    gone = np.asarray(workers_of[h])
    seen.erased[gone] |= seen.counts[gone] > 0     # counted work never to be sent
    seen.dead[gone] = True
    seen.counts[gone] = 0
    arrived[gone] = np.inf

  def _round(self, step, seen, workers_of, lost, corrupt, d) -> _Rounds:
    """Phases 3-4: solve for the observed state, collect messages, erase and redo once."""
    m, ell = self.assignment.num_workers, self.protocol.ell
    out = _Rounds(counts=seen.counts.copy(), nbytes=np.zeros(m, np.int64),
                  transfer_s=np.full(m, np.nan),
                  msgs=np.zeros((m, _protocols.base.num_blocks(d, ell)), np.float32))
    for attempt in range(2):
      s0 = time.perf_counter()
      enc, out.dec, condition = (np.asarray(x) for x in
                                 self._coefficients(jnp.asarray(out.counts)))
      out.condition = float(condition)
      out.senders = np.any(enc != 0, axis=(1, 2)) & ~seen.dead
      out.solve_s += time.perf_counter() - s0
      r0 = time.perf_counter()
      got, bad = self._collect(step, enc, out.senders, workers_of, seen.dead,
                               lost if attempt == 0 else None, corrupt if attempt == 0 else None,
                               stop=attempt == 0, out=out)
      out.round_s += time.perf_counter() - r0
      for j, z in got.items():
        out.msgs[j] = z
      if not bad.any():
        break
      if attempt == 1:
        out.failed_again = True
        break
      seen.erased |= bad
      out.counts = np.where(bad, 0, out.counts)
      out.msgs[:] = 0
    return out

  def _decode(self, seen, rounds, d):
    """Phase 5 (the update is :meth:`update`'s): ``(g [d], metrics)`` from the messages."""
    a, ell = self.assignment, self.protocol.ell
    g = np.asarray(_decode(rounds.msgs, rounds.dec, d))
    skipped = bool(rounds.failed_again or not rounds.senders.any() or not np.isfinite(g).all())
    exact = bool(self._decodable(rounds.counts)) and not skipped
    known = np.isfinite(seen.losses)
    loss = (float(np.sum(seen.losses[known]) * a.num_chunks / known.sum()) if known.any()
            else np.nan)
    coverage = np.asarray(self._coverage(rounds.counts))
    sent = rounds.nbytes > 0
    metrics = {
        "loss": loss, "skipped": skipped, "exact": exact,
        "erasures": int(seen.erased.sum()), "dead_workers": int(seen.dead.sum()),
        "senders": int(rounds.senders.sum()), "min_coverage": int(coverage.min()),
        "chunks_below_ell": int(np.sum(coverage < ell)),
        "stop_wall": seen.stop_wall, "solve_s": rounds.solve_s, "round_s": rounds.round_s,
        "compute_s": float(np.nansum(seen.compute_s)),
        "message_bytes": int(rounds.nbytes.max(initial=0)),
        "message_transfer_s": float(np.median(rounds.transfer_s[sent])) if sent.any() else 0.0,
        "message_transfer_max_s": float(rounds.transfer_s[sent].max(initial=0.0)),
    }
    if self.report_condition:
      metrics["condition_number"] = float(rounds.condition)
    return g, metrics

  def _collect(self, step, enc, senders, workers_of, dead, lost, corrupt, stop, out):
    """Sends each sender its coefficients and gathers ``{j: z_j}`` and the erased ``[m]``.

    Writes each message's size and transfer time (its actor's send to its receipt
    here, ``time.time()`` on both sides) into ``out.nbytes`` and ``out.transfer_s``.
    """
    ray, m = self.ray, self.assignment.num_workers
    refs, asked = {}, {}
    for h, actor in enumerate(self.pool.actors):
      rows = {}
      for j in workers_of[h]:
        if senders[j]:
          fault = ("lost" if lost is not None and lost[j] else
                   "nan" if corrupt is not None and corrupt[j] else None)
          rows[j] = (enc[j], fault)
      if rows or (stop and not dead[workers_of[h]].all()):
        ref = actor.encode.remote(self.key, step, rows, stop)
        if rows:
          refs[ref], asked[ref] = h, list(rows)
    bad = np.zeros(m, bool)
    got = {}
    pending, until = list(refs), time.perf_counter() + self.message_timeout
    while pending:
      ready, pending = ray.wait(pending, num_returns=1,
                                timeout=min(max(until - time.perf_counter(), 0.0), 0.05))
      if not ready:
        # Ray holds a call to a restarting actor until it is back (seconds): its
        # messages are erasures now, not a stall of the step.
        down = [r for r in pending if ray_faults.actor_state(ray, self.pool.actors[refs[r]])[0]
                not in ("ALIVE", "UNKNOWN")]
        for r in down:
          bad[asked[r]] = True
          self.liveness.failed(refs[r], step)
        pending = [r for r in pending if r not in down]
        if time.perf_counter() >= until:
          break
        continue
      ref = ready[0]
      try:
        msgs, sent = ray.get(ref)
      except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
        bad[asked[ref]] = True
        self.liveness.failed(refs[ref], step)
        continue
      received = time.time()
      for j, z in msgs.items():
        if z is not None:
          out.nbytes[j], out.transfer_s[j] = z.nbytes, received - sent
        if z is None or not np.all(np.isfinite(z)):
          bad[j] = True
        else:
          got[j] = z
    for ref in pending:
      bad[asked[ref]] = True
    return got, bad

  def update(self, state: TrainState, chunks, key):
    """One optimizer step: ``(new_state, metrics)``; never writes NaN into the parameters.

    Args:
      state: from :meth:`init_state`.
      chunks: pytree with leaves ``[N, chunk_batch, ...]`` (host or JAX arrays).
      key: the *base* key; step ``s`` draws from ``fold_in(key, s)``, so a run is a
        function of ``(key, data)`` and resumes exactly from a checkpoint.
    """
    if not self._warm:
      self.warmup(state.params, chunks, getattr(state, "straggler_state", self._straggler_state))
    wall0 = time.perf_counter()
    step = int(state.step)
    s_state = getattr(state, "straggler_state", self._straggler_state)
    g, metrics, s_state = self._gradient(state.params, chunks, key, step, s_state)
    params, opt_state, finite = _apply_update(self.tx, state.params, state.opt_state, g)
    skip = bool(metrics["skipped"] or not bool(finite))
    params, opt_state = _backend.keep_if(skip, (state.params, state.opt_state),
                                         (params, opt_state))
    sim_time = state.sim_time + jnp.float32(metrics["step_sim_time"])
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                        sim_time=sim_time, num_skipped=state.num_skipped + int(skip),
                        num_erasures=state.num_erasures + metrics["erasures"])
    if hasattr(state, "straggler_state"):
      new = new.replace(straggler_state=s_state)
    else:
      self._straggler_state = s_state
    metrics = dict(metrics, skipped=skip, exact=metrics["exact"] and not skip,
                   sim_time=float(sim_time), wall_time=time.perf_counter() - wall0)
    return new, metrics

  def jit(self, donate: bool = False):
    """``update`` itself: the PS runs on the host in real time, there is nothing to trace."""
    del donate
    return self.update

  def placement(self, params) -> None:
    """``None``: the parameters live on the PS host (each actor gets a copy per step)."""
    del params

  def state_sharding(self, state) -> None:
    """``None``: the state is the PS's, on the host; the caller places it as it likes."""
    del state

  @property
  def restarts(self) -> list:
    """Every actor outage seen so far (:class:`jaxgc.ray_faults.Restart`)."""
    return self.liveness.restarts

  def close(self):
    """Stops the actors (unless the pool was passed in) and a Ray instance this step started.

    The step cannot run afterwards; :attr:`pool` stays, closed if this step owned it.
    """
    if self.owns_pool and not self.closed:
      self.pool.close()
    self.closed = True

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

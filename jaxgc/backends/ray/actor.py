"""The Ray actor: one process hosting several jaxgc workers, and what it keeps per step.

:class:`WorkerHost` is the actor class (:class:`jaxgc.backends.ray.WorkerPool`
makes it remote). Its ``run`` streams each worker's chunk reports to the PS as
they finish (real compute, then the injected sleep); ``encode`` turns the kept
chunk gradients into the workers' messages with the PS's coefficients, and stops
the step. Ray pickles this class by its module path, so the actors import
``jaxgc.backends.ray.actor`` from the same installed package as the driver.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from typing import Any

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxgc import precision
from jaxgc import protocols as _protocols
from jaxgc.backends.chunk_rule import ChunkLoss

__all__ = ["ACTOR_XLA_FLAGS", "WorkerHost", "actor_xla_flags"]

# Each actor is one CPU-sized worker: one XLA thread, one CPU device.
ACTOR_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false --xla_force_host_platform_device_count=1"


def actor_xla_flags(devices: int = 1) -> str:
  """:data:`ACTOR_XLA_FLAGS` with ``devices`` host devices: a CPU actor whose workers are
  groups of ``devices`` devices (``model=devices``)."""
  return ACTOR_XLA_FLAGS.replace("device_count=1", f"device_count={int(devices)}")


class _Program:
  """What an actor compiles once per loss: the chunk gradient and the encode.

  The chunk's loss is :class:`jaxgc.backends.chunk_rule.ChunkLoss`, the SPMD step's
  own: the same ``rng`` (the chunk's key), extra arguments and ``aux``, so both
  backends compute the same chunk gradient by construction.
  """

  def __init__(self, loss_fn, has_aux: bool, model: int = 1):
    self.chunk_loss = ChunkLoss(loss_fn, has_aux)
    self.model = int(model)
    self.mesh: Any = None           # the local mesh and placement, with model > 1
    self.placement: Any = None
    if self.model > 1:
      # A worker is a group of the actor's ``model`` devices: a local 1 × model mesh, the
      # parameters placed by the SPMD step's FSDP rule, the rest partitioned by XLA.
      from jaxgc.backends.spmd.devices import (  # pylint: disable=import-outside-toplevel
          make_mesh,
      )
      if jax.device_count() < self.model:
        raise ValueError(f"model={self.model}: this actor has {jax.device_count()} device(s); "
                         f"start its pool with {self.model} per actor (num_gpus, or "
                         f"xla_flags=actor_xla_flags({self.model}) on CPU).")
      self.mesh = make_mesh(self.model, model=self.model)

    def chunk_grad(params, chunk, key, args):
      (loss, aux), g = jax.value_and_grad(lambda p: self.chunk_loss(p, chunk, key, args),
                                          has_aux=True)(params)
      return loss, aux, ravel_pytree(g)[0]
    self.grad = jax.jit(chunk_grad)
    self.encode = jax.jit(_protocols.encode)
    # The cast to the wire precision (PROTOCOL.md §15), after the float32 encode.
    self.to_wire = jax.jit(precision.to_wire, static_argnums=1)

  def place(self, params):
    """``params`` on this actor's devices: by the FSDP rule over its group, else device 0."""
    if self.mesh is None:
      return jax.device_put(params)
    if self.placement is None:     # once: every step's parameters have one structure
      from jaxgc.backends.spmd.sharding import (  # pylint: disable=import-outside-toplevel
          place_params,
      )
      self.placement = place_params(params, self.mesh)
    return self.placement.place(params)

  def key(self, keys, row: int):
    """Chunk ``row``'s key from ``keys = (key data [n, ...], impl)`` (``None``: no ``rng``)."""
    if keys is None or not self.chunk_loss.uses_rng:
      return None
    data, impl = keys
    return data[row] if impl is None else jax.random.wrap_key_data(data[row], impl=impl)


class _Run:
  """An actor's state for one step: its workers' chunk gradients and the stop signal."""

  def __init__(self, step: int, program: _Program):
    self.step, self.program = step, program
    self.stop = asyncio.Event()
    self.grads: dict[int, np.ndarray] = {}
    self.aux: dict[tuple[int, int], object] = {}    # (worker, list position) -> its aux


class WorkerHost:
  """One Ray actor hosting several jaxgc workers; they overlap their injected sleeps."""

  def __init__(self, xla_flags: str | None):
    if xla_flags is not None:      # before this process's JAX starts its backend
      os.environ["XLA_FLAGS"] = xla_flags
    self.programs: dict[tuple, _Program] = {}
    self.runs: dict[str, _Run] = {}

  def ready(self):
    """``(hostname, pid, Ray node id)`` of this actor."""
    import ray  # pylint: disable=import-outside-toplevel
    return socket.gethostname(), os.getpid(), ray.get_runtime_context().get_node_id()

  async def _program(self, token, setup, has_aux: bool, model: int = 1) -> _Program:
    if (token, has_aux, model) not in self.programs:
      # ``setup`` is a one-element list so that Ray hands over the reference,
      # which is fetched only on first use (and again after a restart).
      self.programs[token, has_aux, model] = _Program(await setup[0], has_aux, model)
    return self.programs[token, has_aux, model]

  def devices(self) -> list[str]:
    """This actor's JAX devices (a worker is a group of ``model`` of them)."""
    return [str(d) for d in jax.devices()]

  async def warmup(self, token, setup, params, chunk, max_load: int, ell: int,
                   message_dtype: str = "float32", has_aux: bool = False, keys=None,
                   args=(), model: int = 1):
    """Compiles the gradient, the encode and the cast, so that no step's clock pays for it."""
    prog = await self._program(token, setup, has_aux, model)
    _, _, g = prog.grad(prog.place(params), chunk, prog.key(keys, 0), args)
    z = prog.encode(np.zeros((max_load, g.shape[0]), np.float32),
                    np.zeros((max_load, ell), np.float32))
    jax.block_until_ready(prog.to_wire(z, message_dtype))
    return True

  async def run(self, token, setup, key: str, step: int, params, chunks, work, max_load: int,
                has_aux: bool = False, keys=None, args=(), model: int = 1):
    """Step ``step`` of run ``key``'s workers: yields ``(j, n, loss, compute_s, chunk_s, t)``.

    ``work``: ``[(j, rows, slots, sleeps)]``: worker ``j`` computes ``chunks[rows[n]]``
    into list slot ``slots[n]``, then sleeps ``sleeps[n]`` seconds (``inf``: it fails).
    ``t`` is the finish time since this call started. ``keys``: the rows' chunk keys
    (:func:`jaxgc.chunk_keys`, as ``(key data, impl)``) for a loss that takes ``rng``;
    ``args``: the loss's extra arguments; with ``has_aux`` each chunk's ``aux`` is kept
    for :meth:`aux`. ``model``: each worker runs on a group of that many of the actor's
    devices (:class:`_Program`).
    """
    prog = await self._program(token, setup, has_aux, model)
    old = self.runs.get(key)
    if old is not None:
      old.stop.set()
    run = self.runs[key] = _Run(step, prog)
    params = prog.place(params)
    d = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    queue: asyncio.Queue = asyncio.Queue()
    start = time.perf_counter()

    async def worker(j, rows, slots, sleeps):
      grads = run.grads[j] = np.zeros((max_load, d), np.float32)
      for n, (row, slot, pause) in enumerate(zip(rows, slots, sleeps, strict=True)):
        if run.stop.is_set() or not np.isfinite(pause):
          break
        c0 = time.perf_counter()
        loss, aux, g = prog.grad(params, jax.tree.map(lambda a, r=row: a[r], chunks),
                                 prog.key(keys, row), args)
        g = np.asarray(g)
        compute = time.perf_counter() - c0
        if pause > 0:
          # An interruptible sleep: the PS may stop the step meanwhile.
          with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(run.stop.wait(), pause)
        if run.stop.is_set():
          break
        grads[slot] = g        # kept before the report, so a counted chunk can be encoded
        if has_aux:
          run.aux[j, n] = jax.tree.map(np.asarray, aux)
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

  async def aux(self, key: str, step: int, wanted):
    """``[aux or None]``: the kept ``aux`` of each ``(worker, list position)`` in ``wanted``
    (``None``: not computed here in step ``step``, e.g. restarted since)."""
    run = self.runs.get(key)
    if run is None or run.step != step:
      return [None] * len(wanted)
    return [run.aux.get((int(j), int(n))) for j, n in wanted]

  async def encode(self, key: str, step: int, rows, stop: bool = True,
                   message_dtype: str = "float32"):
    """``({j: z_j}, sent)``: messages for ``rows = {j: (enc [max_load, ℓ], fault)}``; stops.

    Each ``z_j`` is encoded in float32 and sent in ``message_dtype``
    (:func:`jaxgc.precision.to_wire`: an array, or int8's ``(q, scales)``).

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
    out: dict[int, object] = {}
    for j, (enc, fault) in rows.items():
      if fault == "lost" or j not in run.grads:
        out[j] = None
        continue
      z = prog.encode(run.grads[j], enc)
      if fault == "nan":       # corrupted before the cast, as a faulty worker would send it
        z = np.full(z.shape, np.nan, np.float32)
      out[j] = jax.tree.map(np.asarray, prog.to_wire(z, message_dtype))
    return out, time.time()

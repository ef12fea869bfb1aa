"""A step's input: keys, the epoch's order, and the chunks each device needs.

The batch of step ``s`` is a function of ``(seed, s)`` only, so a resumed run
reproduces the uninterrupted one and every protocol sees the same chunks; the
grain iterator's state (:meth:`StepInput.get_state`) goes into each checkpoint,
and a resume checks it against its own pipeline. The training set stays on the host:
:class:`StepInput` gathers a step's chunks there and each process places only its own
devices' part (:meth:`jaxgc.parallel.WorkerLayout.from_process_chunks`).
"""
from __future__ import annotations

import functools

import jax
import numpy as np

from jaxgc import data
from jaxgc.backends import spmd
from jaxgc.backends.base import TrainState
from jaxgc.experiment.config import ConfigError

__all__ = ["keys", "global_array", "epoch_permutation", "epoch_permutations", "step_chunks",
           "train_step", "StepInput"]


def keys(seed: int):
  """``(init, data, step)`` keys of a run. Built inside ``jit`` from the static seed,
  so no key array has to be placed on a multi-process mesh."""
  return jax.random.split(jax.random.key(seed), 3)


def global_array(x, sharding):
  """A host array as a global ``jax.Array`` with ``sharding`` (works across processes)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def epoch_permutation(seed: int, epoch, num_train: int):
  """Epoch ``epoch``'s example order (the ``perm`` of :func:`train_step`)."""
  return data.epoch_permutation(keys(seed)[1], epoch, num_train)


def epoch_permutations(seed: int, num_train: int, batch_size: int, sharding):
  """``step -> perm`` for :func:`train_step`: jitted, and drawn once per epoch.

  Drawing a permutation sorts ``num_train`` keys, which on a CPU mesh costs more
  than a small model's whole step, so the current epoch's is kept.
  """
  per_epoch = data.steps_per_epoch(num_train, batch_size)
  draw = jax.jit(functools.partial(epoch_permutation, seed, num_train=num_train),
                 out_shardings=sharding)
  held: dict[int, jax.Array] = {}

  def perm_for(step: int):
    epoch = step // per_epoch
    if epoch not in held:
      held.clear()
      held[epoch] = draw(epoch)
    return held[epoch]
  return perm_for


def step_chunks(train_data, step, perm, *, seed: int, batch_size: int, num_chunks: int):
  """The ``num_chunks`` chunks of step ``step``'s batch (leaves ``[N, batch/N, ...]``)."""
  return data.step_chunks(train_data, keys(seed)[1], step, batch_size, num_chunks, perm=perm)


def train_step(state: TrainState, train_data, perm, *, coded_step, batch_size: int,
               seed: int):
  """One coded step on the batch of step ``state.step`` (jit this), drawn in the graph.

  ``train_data`` is the whole training set on the mesh (replicated) and ``perm``
  the current epoch's example order (:func:`epoch_permutations`). The same
  chunks as :class:`StepInput`'s, which :func:`train` uses instead so that a
  device receives only its workers' chunks.
  """
  chunks = step_chunks(train_data, state.step, perm, seed=seed, batch_size=batch_size,
                       num_chunks=coded_step.assignment.num_chunks)
  return coded_step.update(state, chunks, keys(seed)[2])


class StepInput:
  """The input of step ``s``, built on the host by the grain pipeline of :func:`step_chunks`.

  The training set stays a host (NumPy) pytree, the source of a
  :class:`jaxgc.data.StepChunks` keyed by the run's data key: step ``s``'s chunk
  indices come from the epoch's permutation (:func:`epoch_permutation`, drawn on
  the host CPU once per epoch, the same values as on the mesh) and
  :func:`jaxgc.data.batch_indices`, so the chunks are bit for bit those of
  :func:`train_step`. Each process gathers only the chunks its devices hold
  (``layout.process_chunk_ids()``) and places them with
  ``layout.from_process_chunks``; no host holds the replicated global batch.

  Args:
    train_data: host pytree of arrays ``[n_train, ...]``.
    seed: as in :func:`step_chunks`.
    batch_size: as in :func:`step_chunks`.
    num_chunks: as in :func:`step_chunks`.
    layout: the step's :class:`jaxgc.parallel.WorkerLayout`; ``None``: the step
      takes host chunks ``[N, ...]`` (the Ray step).
  """

  def __init__(self, train_data, *, seed: int, batch_size: int, num_chunks: int,
               layout: spmd.WorkerLayout | None = None):
    data.check_chunking(batch_size, num_chunks)
    source = data.ArraySource(train_data)
    self.train_data, self.num_train = source.arrays, len(source)
    self.batch_size, self.num_chunks, self.layout = batch_size, num_chunks, layout
    self.chunks = data.StepChunks(source, seed=keys(seed)[1], batch_size=batch_size,
                                  num_chunks=num_chunks)
    if layout is not None:
      # Phantom slots (-1) repeat chunk 0, as shard_chunks does; they are never computed.
      self._ids = np.maximum(layout.process_chunk_ids(), 0)

  def chunk_indices(self, step: int) -> np.ndarray:
    """int ``[N, batch_size / N]``: the examples of step ``step``'s chunks."""
    return self.chunks.chunk_indices(step)

  def host_chunks(self, step: int):
    """Step ``step``'s chunks on the host, leaves ``[N, batch_size / N, ...]``."""
    return self.chunks[step]

  def __call__(self, step: int):
    """What the step consumes: :class:`jaxgc.parallel.WorkerChunks` (this process's
    devices' chunks, placed), or host chunks ``[N, ...]`` without a layout."""
    if self.layout is None:
      return self.host_chunks(step)
    idx = self.chunk_indices(step)[self._ids]                  # [rows, slots, batch / N]
    return self.layout.from_process_chunks(self.chunks.gather(idx))

  def get_state(self, step: int) -> dict:
    """The grain iterator's state before step ``step`` (JSON, for the checkpoint's meta)."""
    return {"step": int(step), **self.chunks.signature}   # ChunkIterator's, at ``step``

  def set_state(self, state: dict, step: int, workdir: str) -> None:
    """Checks a checkpoint's iterator ``state`` against this pipeline at the restored
    ``step``: the same examples, batch, chunks and key, so the resume reads on as the
    uninterrupted run would."""
    it = data.ChunkIterator(self.chunks)
    try:
      it.set_state(state)
    except ValueError as e:
      raise ConfigError(f"--workdir={workdir}", f"its checkpoint was read from other training "
                        f"data: {e} Add --restart to start over, or use a new "
                        "--workdir.") from None
    if it.step != step:
      raise ConfigError(f"--workdir={workdir}", f"its checkpoint of step {step} holds the "
                        f"input state of step {it.step}; add --restart to start over.")

  def global_batch_bytes(self) -> int:
    """Bytes of one step's whole batch (all ``N`` chunks)."""
    return sum(self.batch_size * a[0].nbytes for a in jax.tree.leaves(self.train_data))

"""grain input pipelines: sources, a step's chunks as a ``grain.MapDataset``, a
checkpointable iterator, and a user's own ``MODULE:FUNCTION`` dataset."""
from __future__ import annotations

import functools
import hashlib
import importlib
import os
import sys
from collections.abc import Mapping
from typing import Any

import grain
import jax
import numpy as np

from jaxgc.data._datasets import (
  DATASETS,
  Dataset,
  batch_indices,
  check_chunking,
  epoch_permutation,
  steps_per_epoch,
)
from jaxgc.errors import ParamError

__all__ = ["import_source", "load_custom", "ArraySource", "examples", "StepChunks",
           "ChunkIterator", "chunked", "data_key"]


# -- grain pipelines -----------------------------------------------------------------------

def data_key(seed: int):
  """The data key of a run with ``--config.seed=seed`` (``jaxgc.experiment.keys(seed)[1]``),
  so :func:`chunked` with an int seed reads ``train.py``'s batches."""
  return jax.random.split(jax.random.key(seed), 3)[1]


class ArraySource:
  """A grain random-access source over a pytree of arrays ``[n, ...]`` held in memory.

  Example ``i`` is the pytree of rows ``i``; :meth:`gather` takes many at once by
  fancy indexing (what :class:`StepChunks` uses instead of ``n`` single reads).
  """

  def __init__(self, arrays):
    self.arrays = jax.tree.map(np.asarray, arrays)
    leaves = jax.tree.leaves(self.arrays)
    sizes = sorted({a.shape[0] if a.ndim else -1 for a in leaves})
    if not leaves or len(sizes) != 1 or sizes[0] < 1:
      raise ParamError(f"arrays must be a pytree of arrays [n, ...] with one n >= 1, got "
                       f"leading sizes {sizes}.", "arrays")
    self._n = int(sizes[0])

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index):
    return jax.tree.map(lambda a: a[index], self.arrays)

  def gather(self, idx):
    """Examples ``idx`` (int, any shape): the pytree with leaves ``[*idx.shape, ...]``."""
    return jax.tree.map(lambda a: a[idx], self.arrays)

  @functools.cached_property
  def fingerprint(self) -> str:
    """sha256 of the arrays (shapes, dtypes, bytes): which data a checkpoint was read from."""
    h = hashlib.sha256()
    for a in jax.tree.leaves(self.arrays):
      h.update(f"{a.shape}{a.dtype}".encode())
      h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()

  def __repr__(self) -> str:
    return f"ArraySource({self._n} examples)"


def examples(dataset, param: str = "dataset") -> grain.MapDataset:
  """``dataset`` as a ``grain.MapDataset`` of examples.

  Takes a ``grain.MapDataset`` (as it is), a :class:`Dataset` (its training split,
  examples ``(x, y)``), a tuple/dict/array pytree of arrays ``[n, ...]``
  (:class:`ArraySource`), or any random-access source (``len`` and ``[i]``: a
  list of examples, a ``grain.sources`` source).
  """
  source = _as_source(dataset, param)
  return source if isinstance(source, grain.MapDataset) else grain.MapDataset.source(source)


def _as_source(dataset, param: str):
  """A ``grain.MapDataset``, an :class:`ArraySource`, or another random-access source."""
  if isinstance(dataset, (grain.MapDataset, ArraySource)):
    return dataset
  if isinstance(dataset, Dataset):
    dataset = (dataset.x_train, dataset.y_train)
  leaves = jax.tree.leaves(dataset)
  if isinstance(dataset, (np.ndarray, jax.Array, tuple, dict)) and leaves and all(
      isinstance(a, (np.ndarray, jax.Array)) for a in leaves):
    return ArraySource(dataset)
  if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
    raise ParamError(f"{param} must be a grain.MapDataset, a random-access source (len and "
                     f"[i]) or a pytree of arrays [n, ...], got {type(dataset).__name__}.",
                     param)
  return dataset


class StepChunks(grain.MapDataset):
  """A ``grain.MapDataset`` over steps: element ``s`` is step ``s``'s batch in ``N`` chunks.

  The pipeline source -> shuffle -> batch -> chunk: epoch ``e = s // steps_per_epoch``
  orders the examples by :func:`epoch_permutation` ``(data_key, e)``, step ``s`` takes
  that order's next ``batch_size`` (:func:`batch_indices`; the tail
  ``n % batch_size`` is dropped) and splits them into ``num_chunks`` chunks of
  consecutive examples. So element ``s`` is bit for bit :func:`step_chunks`
  ``(data, data_key, s, ...)``, a function of ``(data_key, s)`` alone, with leaves
  ``[N, batch_size / N, ...]`` (host NumPy). Unbounded: the epochs go on.

  Args:
    source: the examples (anything :func:`examples` takes); every example the
      same pytree of arrays of the same shapes.
    seed: an int (the data key of ``train.py``'s ``--config.seed``, :func:`data_key`)
      or a PRNG key (the data key itself).
    batch_size: examples per step, a multiple of ``num_chunks``.
    num_chunks: ``N``.
  """

  def __init__(self, source, *, seed, batch_size: int, num_chunks: int):
    source = _as_source(source, "dataset")
    parent = source if isinstance(source, grain.MapDataset) else grain.MapDataset.source(source)
    super().__init__(parent)
    check_chunking(batch_size, num_chunks)
    n = len(parent)
    if not 1 <= batch_size <= n:
      raise ParamError(f"batch_size={batch_size} must be in 1..{n}, the number of examples.",
                       "batch_size")
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
      key = data_key(int(seed))
    elif isinstance(seed, jax.Array) and jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key):
      key = seed
    else:
      raise ParamError(f"seed must be an int or a PRNG key (jax.random.key), got "
                       f"{type(seed).__name__}.", "seed")
    # Arrays in memory: a step's examples by one fancy index, not one read each.
    self._arrays = source if isinstance(source, ArraySource) else None
    self.num_examples, self.batch_size, self.num_chunks = n, batch_size, num_chunks
    # The order is drawn on the host CPU, once per epoch (it sorts n keys).
    self._key = jax.device_put(key, jax.local_devices(backend="cpu")[0])
    self._draw = jax.jit(functools.partial(epoch_permutation, num_train=n))
    self._slice = jax.jit(functools.partial(batch_indices, None, num_train=n,
                                            batch_size=batch_size))
    self._per_epoch = steps_per_epoch(n, batch_size)
    self._held: dict[int, jax.Array] = {}

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self.gather(self.chunk_indices(index))

  def chunk_indices(self, step: int) -> np.ndarray:
    """int ``[N, batch_size / N]``: the examples of step ``step``'s chunks."""
    step = int(step)
    if step < 0:
      raise ParamError(f"step must be >= 0, got {step}.", "step")
    epoch = step // self._per_epoch
    if epoch not in self._held:
      self._held.clear()
      self._held[epoch] = self._draw(self._key, epoch)
    idx = self._slice(step, perm=self._held[epoch])
    return np.asarray(idx).reshape(self.num_chunks, -1)

  def gather(self, idx):
    """Examples ``idx`` (int, any shape), stacked: leaves ``[*idx.shape, ...]``."""
    idx = np.asarray(idx)
    if self._arrays is not None:
      return self._arrays.gather(idx)
    flat = idx.reshape(-1)
    rows = [self._parent[int(i)] for i in flat]
    first = str(jax.tree.structure(rows[0]))
    for i, row in zip(flat, rows, strict=True):
      if str(jax.tree.structure(row)) != first:
        raise ParamError(f"example {i} is {jax.tree.structure(row)}, example {flat[0]} is "
                         f"{first}; every example must have one structure.", "dataset")
    try:
      return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]).reshape(
          idx.shape + np.shape(xs[0])), *rows)
    except ValueError as e:
      raise ParamError(f"examples {flat.tolist()[:8]}... do not stack into a batch ({e}); "
                       "every example's arrays must have one shape.", "dataset") from None

  @functools.cached_property
  def signature(self) -> dict[str, Any]:
    """What identifies the pipeline in an iterator state (JSON): sizes, key, data."""
    out: dict[str, Any] = {
        "num_examples": self.num_examples, "batch_size": self.batch_size,
        "num_chunks": self.num_chunks,
        "data_key": [int(v) for v in np.asarray(jax.random.key_data(self._key)).ravel()]}
    if self._arrays is not None:
      out["data_sha256"] = self._arrays.fingerprint
    return out


class ChunkIterator(grain.DatasetIterator):
  """Reads a :class:`StepChunks` step after step; its state is the next step.

  ``get_state()`` is JSON (``{"step": s, ...}`` with the pipeline's
  :attr:`StepChunks.signature`), and ``set_state`` on an iterator over the same
  pipeline resumes at ``s``: the same chunks as without the stop, on any device
  count (the chunks are logical, ``[N, ...]``).
  """

  def __init__(self, chunks: StepChunks, step: int = 0):
    super().__init__()
    self.chunks, self.step = chunks, int(step)

  def __next__(self):
    out = self.chunks[self.step]
    self.step += 1
    return out

  def get_state(self) -> dict[str, Any]:
    return {"step": self.step, **self.chunks.signature}

  def set_state(self, state: dict[str, Any]) -> None:
    """Resumes at ``state["step"]``; raises ``ParamError("state")`` for another pipeline's."""
    state = dict(state)
    step = state.pop("step", None)
    if not isinstance(step, (int, np.integer)) or step < 0:
      raise ParamError(f"state must hold a step >= 0, got {step!r}.", "state")
    mine = self.chunks.signature
    differ = sorted(k for k in set(state) | set(mine) if state.get(k) != mine.get(k))
    if differ:
      raise ParamError(f"state is another pipeline's: its {', '.join(differ)} differ(s) from "
                       "this one's; restore it into an iterator over the same examples, "
                       "num_chunks, batch_size and seed.", "state")
    self.step = int(step)


def chunked(dataset, num_chunks: int, batch_size: int, seed=0, *,
            step: int = 0) -> ChunkIterator:
  """A checkpointable iterator of chunked batches over ``dataset`` for an own loop.

  ``next(it)`` gives step ``it.step``'s chunks, leaves ``[num_chunks, batch_size /
  num_chunks, ...]`` (the input of :func:`jaxgc.coded_value_and_grad`);
  ``it.get_state()`` (JSON) goes into a checkpoint and ``it.set_state(state)``
  resumes there. See :class:`StepChunks` for the order and the arguments; an int
  ``seed`` gives ``train.py``'s batches for ``--config.seed=seed``.

  Raises:
    jaxgc.errors.ParamError: a dataset of another kind, a batch that does not split
      into ``num_chunks``, a seed that is neither an int nor a key.
  """
  return ChunkIterator(StepChunks(dataset, seed=seed, batch_size=batch_size,
                                  num_chunks=num_chunks), step)


# -- your own data --------------------------------------------------------------------------

def import_source(source: str, param: str = "source"):
  """The function that ``"MODULE:FUNCTION"`` names, imported.

  ``MODULE`` is imported from ``sys.path`` (``PYTHONPATH``), else from the current
  directory. Raises :class:`~jaxgc.errors.ParamError` (``param``) for a malformed
  name, a module that does not import or a name that is not a function there.
  """
  if not isinstance(source, str) or source.count(":") != 1 or not all(source.split(":")):
    raise ParamError(f"source must name a function as 'MODULE:FUNCTION' (e.g. "
                     f"'mydata:splits'), got {source!r}.", param)
  module_name, attr = source.split(":")
  try:
    module = _import(module_name)
  except Exception as e:  # pylint: disable=broad-except
    # Whatever the import raises (a missing module or dependency, an error in it).
    why = " ".join(f"{type(e).__name__}: {e}".split())[:200]
    raise ParamError(f"source {source!r} is not importable ({why}); put {module_name!r} on "
                     "PYTHONPATH or in the current directory.", param) from None
  fn = getattr(module, attr, None)
  if not callable(fn):
    raise ParamError(f"source {source!r}: module {module_name!r} has no function {attr!r}.",
                     param)
  return fn


def _import(name: str):
  try:
    return importlib.import_module(name)
  except ModuleNotFoundError as e:
    # ``python train.py`` puts train.py's folder on the path, not the current directory.
    cwd = os.getcwd()
    if cwd in sys.path or not e.name or not (name + ".").startswith(e.name + "."):
      raise
    sys.path.append(cwd)     # (last: it shadows nothing)
    return importlib.import_module(name)


def _stack_field(rows, key: str, split: str, source: str) -> np.ndarray:
  arrays = [np.asarray(r[key]) for r in rows]
  first = arrays[0]
  for i, a in enumerate(arrays):
    if a.shape != first.shape or a.dtype.kind not in "biuf":
      got = f"shape {a.shape}" if a.shape != first.shape else f"dtype {a.dtype}"
      raise ParamError(f"source {source!r}: {split} example {i}'s {key!r} has {got}, example "
                       f"0's has shape {first.shape}; each {key!r} must be a numeric array of "
                       "one shape.", "source")
  out = np.stack(arrays)
  return out.astype(np.float32 if out.dtype.kind == "f" else np.int32)


def _read_split(split, name: str, source: str) -> tuple[np.ndarray, np.ndarray]:
  """All of one split's examples as ``(x [n, ...], y [n, ...])`` (checked)."""
  ds = examples(split, param="source")
  rows = [ds[i] for i in range(len(ds))]
  if not rows:
    raise ParamError(f"source {source!r}: its {name} split has no examples.", "source")
  for i, ex in enumerate(rows):
    if not isinstance(ex, Mapping) or set(ex) != {"x", "y"}:
      got = f"a dict with keys {sorted(ex)}" if isinstance(ex, Mapping) else type(ex).__name__
      raise ParamError(f"source {source!r}: {name} example {i} is {got}; each example must "
                       "be a dict {'x': features, 'y': label} of arrays.", "source")
  return _stack_field(rows, "x", name, source), _stack_field(rows, "y", name, source)


@DATASETS.register("custom")
def load_custom(source: str = "", num_classes: int | None = None) -> Dataset:
  """Your own data: ``source="MODULE:FUNCTION"``, where ``FUNCTION()`` returns
  ``(train, test)``.

  Each split is a ``grain.MapDataset`` or a random-access source (``len`` and
  ``[i]``, e.g. a list) of examples ``{"x": features, "y": label}``, or those
  columns as arrays ``{"x": [n, ...], "y": [n, ...]}``: ``x`` a
  numeric array of one shape (float -> float32, int -> int32 tokens), ``y`` an
  int class (or int tokens ``[T]``, next-token targets) or a float target
  (regression). Both splits are read once into host arrays; the test split must
  have the train split's shapes.

  Args:
    num_classes: ``None``: ``max(y) + 1`` over both splits for int labels, ``0``
      (regression) for float ones.
  """
  fn = import_source(source)
  try:
    out = fn()
  except Exception as e:  # pylint: disable=broad-except
    why = " ".join(f"{type(e).__name__}: {e}".split())[:200]
    raise ParamError(f"source {source!r} raised {why}.", "source") from None
  if not isinstance(out, (tuple, list)) or len(out) != 2:
    raise ParamError(f"source {source!r} returned {type(out).__name__}; it must return "
                     "(train, test), two datasets of {'x', 'y'} examples.", "source")
  (x_tr, y_tr), (x_te, y_te) = (_read_split(split, name, source)
                                for split, name in zip(out, ("train", "test"), strict=True))
  if (x_te.shape[1:], y_te.shape[1:]) != (x_tr.shape[1:], y_tr.shape[1:]) or (
      x_te.dtype, y_te.dtype) != (x_tr.dtype, y_tr.dtype):
    raise ParamError(f"source {source!r}: test examples have x {x_te.shape[1:]} {x_te.dtype}, "
                     f"y {y_te.shape[1:]} {y_te.dtype}, train ones x {x_tr.shape[1:]} "
                     f"{x_tr.dtype}, y {y_tr.shape[1:]} {y_tr.dtype}; they must agree.",
                     "source")
  regression = y_tr.dtype.kind == "f"
  if num_classes is None:
    num_classes = 0 if regression else int(max(y_tr.max(), y_te.max())) + 1
  if regression and num_classes:
    raise ParamError(f"source {source!r} has float labels (regression), so num_classes must "
                     f"be unset or 0, got {num_classes}.", "num_classes")
  if not regression and not (isinstance(num_classes, int) and num_classes >= 2 and
                             min(y_tr.min(), y_te.min()) >= 0 and
                             max(y_tr.max(), y_te.max()) < num_classes):
    raise ParamError(f"source {source!r}'s int labels span {min(y_tr.min(), y_te.min())}.."
                     f"{max(y_tr.max(), y_te.max())}: they must lie in 0..num_classes-1 with "
                     f"num_classes >= 2 (num_classes={num_classes}).", "num_classes")
  return Dataset(x_tr, y_tr, x_te, y_te, num_classes=num_classes)

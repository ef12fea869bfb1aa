"""The datasets (their registry and loaders) and the batch of each step, by seed."""
from __future__ import annotations

import os
import sysconfig
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgc.errors import ParamError
from jaxgc.registry import Registry

__all__ = ["Dataset", "load", "steps_per_epoch", "epoch_permutation", "batch_indices",
           "step_chunks", "DATASETS", "stdlib_corpus", "check_chunking", "load_digits",
           "load_synthetic_logistic", "load_synthetic_linear", "load_pystdlib"]

class Dataset(NamedTuple):
  """A train/test split held as host NumPy arrays.

  Attributes:
    x_train: float32 ``[n_train, *feature_shape]``, or int32 tokens ``[n_train, T]``.
    y_train: int32 ``[n_train]`` class labels, float32 ``[n_train]`` targets
      for regression, or int32 next tokens ``[n_train, T]`` (``x`` shifted by one).
    x_test: as ``x_train``, for the test split.
    y_test: as ``y_train``, for the test split.
    num_classes: number of classes (the vocabulary for text); ``0`` marks a
      regression task.
  """
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int

  @property
  def num_train(self) -> int:
    return int(self.x_train.shape[0])

  @property
  def is_regression(self) -> bool:
    return self.num_classes == 0


_Splits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _split(x, y, test_fraction: float, seed: int) -> _Splits:
  if not 0.0 < test_fraction < 1.0:
    raise ParamError(f"test_fraction must be in (0, 1), got {test_fraction}.", "test_fraction")
  perm = np.random.default_rng(seed).permutation(len(x))
  n_test = max(1, int(round(test_fraction * len(x))))
  te, tr = perm[:n_test], perm[n_test:]
  return x[tr], y[tr], x[te], y[te]


def stdlib_corpus(max_bytes: int | None = 2_000_000) -> np.ndarray:
  """The standard library's ``.py`` files as bytes, uint8 ``[≤ max_bytes]``.

  Files in a fixed order (a sorted directory walk of ``sysconfig``'s ``stdlib``,
  skipping ``site-packages``), concatenated until ``max_bytes`` (``None``: all).
  The same for every run on one Python installation; another Python version
  gives another text.
  """
  root = sysconfig.get_paths()["stdlib"]
  parts, total = [], 0
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames
                         if d not in ("site-packages", "dist-packages", "__pycache__"))
    for name in sorted(f for f in filenames if f.endswith(".py")):
      with open(os.path.join(dirpath, name), "rb") as f:
        parts.append(f.read())
      total += len(parts[-1])
      if max_bytes is not None and total >= max_bytes:
        return np.frombuffer(b"".join(parts)[:max_bytes], np.uint8)
  if not parts:
    raise ValueError(f"no .py files under the standard library at {root}; use another dataset.")
  return np.frombuffer(b"".join(parts), np.uint8)


def _text_windows(tokens, seq_len: int, test_fraction: float) -> _Splits:
  """Non-overlapping windows ``x = tokens[s:s+T]``, ``y = tokens[s+1:s+T+1]``; the last
  ``test_fraction`` of the text is the validation split (a contiguous tail, so no
  window straddles the two)."""
  if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
    raise ParamError(f"seq_len must be a positive integer, got {seq_len!r}.", "seq_len")
  if not 0.0 < test_fraction < 1.0:
    raise ParamError(f"test_fraction must be in (0, 1), got {test_fraction}.", "test_fraction")
  n = (len(tokens) - 1) // seq_len
  n_test = max(1, int(round(test_fraction * n)))
  if n - n_test < 1:
    raise ParamError(f"the corpus of {len(tokens)} bytes holds only {n} windows of "
                     f"seq_len={seq_len}; lower --config.seq_len or raise --config.corpus_bytes.",
                     "seq_len")
  tokens = tokens.astype(np.int32)
  x = tokens[: n * seq_len].reshape(n, seq_len)
  y = tokens[1: n * seq_len + 1].reshape(n, seq_len)
  cut = n - n_test
  return x[:cut], y[:cut], x[cut:], y[cut:]


def check_chunking(batch_size: int, num_chunks: int, seq_len: int | None = None) -> None:
  """Raises ``ValueError`` unless a step's batch splits into ``num_chunks`` equal chunks.

  For text, the unit is a sequence of ``seq_len`` tokens: chunks hold whole sequences.
  """
  if batch_size >= 1 and batch_size % num_chunks == 0:
    return
  unit = f" sequences of seq_len={seq_len}" if seq_len else " examples"
  fix = num_chunks * max(1, batch_size // num_chunks)
  raise ParamError(
      f"batch_size={batch_size}{unit} is not a multiple of the number of chunks "
      f"{num_chunks}, so it does not split into equal chunks; use a multiple of "
      f"{num_chunks}, e.g. --config.batch_size={fix}.", "batch_size")


DATASETS: Registry[Dataset] = Registry("dataset")
"""Name -> loader; each takes only its own options (see :func:`load`)."""


@DATASETS.register("digits")
def load_digits(test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
  """scikit-learn's 8×8 digits: 1797 images ``[64]`` with pixels in [0, 1], 10 classes.

  ``test_fraction`` of the examples (a permutation from ``split_seed``) is held out.
  """
  from sklearn.datasets import load_digits as sklearn_digits  # pylint: disable=import-outside-toplevel
  d = sklearn_digits()
  x = (d.data / 16.0).astype(np.float32)
  y = d.target.astype(np.int32)
  return Dataset(*_split(x, y, test_fraction, split_seed), num_classes=10)


def _synthetic(num_examples: int, dim: int, data_seed: int):
  """``x [n, dim] ~ N(0, I/dim)``, ``z = x·w*`` with ``‖w*‖ = 4√dim``, and the generator."""
  if num_examples < 2 or dim < 1:
    param = "num_examples" if num_examples < 2 else "dim"
    raise ParamError(f"synthetic data needs num_examples >= 2 and dim >= 1, got "
                     f"{num_examples}, {dim}.", param)
  rng = np.random.default_rng(data_seed)
  x = rng.standard_normal((num_examples, dim)).astype(np.float32) / np.sqrt(dim)
  w = rng.standard_normal(dim).astype(np.float32)
  w *= 4.0 * np.sqrt(dim) / np.linalg.norm(w)
  return x, x @ w, rng


@DATASETS.register("synthetic_logistic")
def load_synthetic_logistic(num_examples: int = 4000, dim: int = 32, data_seed: int = 0,
                            test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
  """Binary logistic-regression data: ``x ~ N(0, I/dim)``, ``P(y=1) = σ(x·w*)`` with
  ``‖w*‖ = 4√dim``, so the classes are learnable but not separable (seed ``data_seed``)."""
  x, z, rng = _synthetic(num_examples, dim, data_seed)
  y = (rng.uniform(size=num_examples) < 1.0 / (1.0 + np.exp(-z))).astype(np.int32)
  return Dataset(*_split(x, y, test_fraction, split_seed), num_classes=2)


@DATASETS.register("synthetic_linear")
def load_synthetic_linear(num_examples: int = 4000, dim: int = 32, noise: float = 0.1,
                          data_seed: int = 0, test_fraction: float = 0.2,
                          split_seed: int = 0) -> Dataset:
  """A regression task: ``y = x·w* + noise·ε``, ``x`` and ``w*`` as in
  :func:`load_synthetic_logistic` (``num_classes=0``)."""
  x, z, rng = _synthetic(num_examples, dim, data_seed)
  y = (z + noise * rng.standard_normal(num_examples)).astype(np.float32)
  return Dataset(*_split(x, y, test_fraction, split_seed), num_classes=0)


@DATASETS.register("pystdlib")
def load_pystdlib(seq_len: int = 64, max_bytes: int | None = 2_000_000,
                  test_fraction: float = 0.2) -> Dataset:
  """Next-byte prediction on :func:`stdlib_corpus` (its first ``max_bytes`` bytes;
  ``None``: all): int32 windows ``[n, seq_len]``, vocabulary 256. The last
  ``test_fraction`` of the text is the validation split (so no seed)."""
  return Dataset(*_text_windows(stdlib_corpus(max_bytes), seq_len, test_fraction),
                 num_classes=256)


def load(name: str, **options: Any) -> Dataset:
  """Loads the dataset registered as ``name`` in :data:`DATASETS` with its ``options``.

  ``"digits"`` (:func:`load_digits`), ``"synthetic_logistic"``
  (:func:`load_synthetic_logistic`), ``"synthetic_linear"``
  (:func:`load_synthetic_linear`), ``"pystdlib"`` (:func:`load_pystdlib`): these take
  ``test_fraction`` (share held out for testing); those with a random split take
  ``split_seed``; each takes only its own options besides. ``"custom"``
  (:func:`load_custom`) takes ``source="MODULE:FUNCTION"``, whose splits are its own.

  Raises:
    jaxgc.errors.ParamError: (a ``ValueError``) an unknown name (``param="name"``) or an
      option the dataset does not take (``param`` is the option), listing the valid ones.
  """
  return DATASETS.build(name, **options)


def steps_per_epoch(num_train: int, batch_size: int) -> int:
  """Steps in one pass over the data (the tail ``num_train % batch_size`` is dropped)."""
  if not 1 <= batch_size <= num_train:
    raise ValueError(f"batch_size must be in 1..{num_train}, got {batch_size}.")
  return num_train // batch_size


def epoch_permutation(data_key, epoch, num_train: int):
  """The example order of epoch ``epoch``: int32 ``[num_train]``, from
  ``fold_in(data_key, epoch)``."""
  return jax.random.permutation(jax.random.fold_in(data_key, epoch), num_train)


def batch_indices(data_key, step, num_train: int, batch_size: int, perm=None):
  """Indices of step ``step``'s batch: int32 ``[batch_size]``.

  Epoch ``e = step // steps_per_epoch`` uses :func:`epoch_permutation` ``(data_key, e)``
  and the batch is its next slice, so batches within an epoch are disjoint and
  the whole thing is a function of ``(data_key, step)``. Jit-able in ``step``.

  Args:
    perm: that epoch's permutation if the caller already holds it. Drawing it
      sorts ``num_train`` keys, which on a CPU mesh costs more than a small
      model's whole step, so a training loop draws it once per epoch.
  """
  per_epoch = steps_per_epoch(num_train, batch_size)
  step = jnp.asarray(step, jnp.int32)
  if perm is None:
    perm = epoch_permutation(data_key, step // per_epoch, num_train)
  elif jnp.shape(perm) != (num_train,):
    raise ValueError(f"perm must be the epoch's permutation of shape ({num_train},), got "
                     f"{jnp.shape(perm)}; build it with epoch_permutation(data_key, epoch, "
                     f"{num_train}).")
  return jax.lax.dynamic_slice(perm, ((step % per_epoch) * batch_size,), (batch_size,))


def step_chunks(data, data_key, step, batch_size: int, num_chunks: int, perm=None):
  """The batch of step ``step`` split into ``N`` equal chunks.

  Args:
    data: pytree of arrays ``[n_train, ...]`` (e.g. ``(x, y)``).
    data_key: as in :func:`batch_indices`.
    step: as in :func:`batch_indices`.
    batch_size: examples per step; must be a multiple of ``num_chunks``.
    num_chunks: ``N``.
    perm: optional, the epoch's permutation (see :func:`batch_indices`).

  Returns:
    The pytree with leaves ``[N, batch_size // N, ...]``.
  """
  check_chunking(batch_size, num_chunks)
  n = jax.tree.leaves(data)[0].shape[0]
  idx = batch_indices(data_key, step, n, batch_size, perm).reshape(num_chunks, -1)
  return jax.tree.map(lambda a: jnp.asarray(a)[idx], data)

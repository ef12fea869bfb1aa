"""Datasets and per-step chunking for the training loop.

Everything here is deterministic from seeds: the train/test split from
``split_seed``, the batch of step ``s`` from ``(data_key, s)``. So a resumed run
sees the same batches as an uninterrupted one, and every protocol sees the same
chunks at the same step (which is what makes exact-mode runs comparable).

Nothing downloads: ``digits`` ships with scikit-learn, ``synthetic_*`` is
generated.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Dataset", "load", "steps_per_epoch", "epoch_permutation", "batch_indices",
           "step_chunks", "DATASETS"]

DATASETS = ("digits", "synthetic_logistic", "synthetic_linear")


class Dataset(NamedTuple):
  """A train/test split held as host NumPy arrays.

  Attributes:
    x_train: float32 ``[n_train, *feature_shape]``.
    y_train: int32 ``[n_train]`` class labels, or float32 ``[n_train]`` targets
      for regression.
    x_test, y_test: the same for the test split.
    num_classes: number of classes; ``0`` marks a regression task.
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


def _split(x, y, test_fraction: float, seed: int):
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
  perm = np.random.default_rng(seed).permutation(len(x))
  n_test = max(1, int(round(test_fraction * len(x))))
  te, tr = perm[:n_test], perm[n_test:]
  return x[tr], y[tr], x[te], y[te]


def load(name: str, *, test_fraction: float = 0.2, split_seed: int = 0,
         num_examples: int = 4000, dim: int = 32, noise: float = 0.1,
         data_seed: int = 0) -> Dataset:
  """Loads a dataset by name.

  Args:
    name: ``"digits"`` (sklearn 8×8 digits, 1797 images, 10 classes, pixels
      scaled to [0, 1]); ``"synthetic_logistic"`` (binary logistic-regression
      data: ``x ~ N(0, I/dim)``, ``P(y=1) = σ(x·w*)`` with ``‖w*‖ = 4√dim`` so
      the classes are learnable but not separable); ``"synthetic_linear"``
      (``y = x·w* + noise·ε``, a regression task).
    test_fraction: share of examples held out for testing.
    split_seed: seed of the train/test permutation.
    num_examples, dim, noise, data_seed: sizes and seed of the synthetic tasks.
  """
  if name == "digits":
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    return Dataset(*_split(x, y, test_fraction, split_seed), num_classes=10)
  if name in ("synthetic_logistic", "synthetic_linear"):
    if num_examples < 2 or dim < 1:
      raise ValueError(f"synthetic data needs num_examples >= 2 and dim >= 1, got "
                       f"{num_examples}, {dim}.")
    rng = np.random.default_rng(data_seed)
    x = rng.standard_normal((num_examples, dim)).astype(np.float32) / np.sqrt(dim)
    w = rng.standard_normal(dim).astype(np.float32)
    w *= 4.0 * np.sqrt(dim) / np.linalg.norm(w)
    z = x @ w
    if name == "synthetic_logistic":
      y = (rng.uniform(size=num_examples) < 1.0 / (1.0 + np.exp(-z))).astype(np.int32)
      return Dataset(*_split(x, y, test_fraction, split_seed), num_classes=2)
    y = (z + noise * rng.standard_normal(num_examples)).astype(np.float32)
    return Dataset(*_split(x, y, test_fraction, split_seed), num_classes=0)
  raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}.")


def steps_per_epoch(num_train: int, batch_size: int) -> int:
  """Steps in one pass over the data (the tail ``num_train % batch_size`` is dropped)."""
  if not 1 <= batch_size <= num_train:
    raise ValueError(f"batch_size must be in 1..{num_train}, got {batch_size}.")
  return num_train // batch_size


def epoch_permutation(data_key, epoch, num_train: int):
  """The example order of epoch ``epoch``: int32 ``[num_train]``, from ``fold_in(data_key, epoch)``."""
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
    data_key, step: as in :func:`batch_indices`.
    batch_size: examples per step; must be a multiple of ``num_chunks``.
    num_chunks: ``N``.
    perm: optional, the epoch's permutation (see :func:`batch_indices`).

  Returns:
    The pytree with leaves ``[N, batch_size // N, ...]``.
  """
  if batch_size % num_chunks:
    raise ValueError(
        f"batch_size={batch_size} is not a multiple of the number of chunks "
        f"{num_chunks}; pick a batch_size divisible by it.")
  n = jax.tree.leaves(data)[0].shape[0]
  idx = batch_indices(data_key, step, n, batch_size, perm).reshape(num_chunks, -1)
  return jax.tree.map(lambda a: jnp.asarray(a)[idx], data)

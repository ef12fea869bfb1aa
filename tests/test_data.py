"""Batches: disjoint within an epoch, identical with or without a precomputed permutation."""
import jax
import numpy as np
import pytest

from jaxgc import data

N, B = 103, 10          # 10 steps per epoch, 3 examples dropped


def test_batches_within_an_epoch_are_disjoint():
  key = jax.random.key(0)
  per_epoch = data.steps_per_epoch(N, B)
  assert per_epoch == 10
  for epoch in range(2):
    idx = np.concatenate([np.asarray(data.batch_indices(key, epoch * per_epoch + s, N, B))
                          for s in range(per_epoch)])
    assert len(set(idx.tolist())) == per_epoch * B
    assert idx.min() >= 0 and idx.max() < N
  first = lambda e: np.asarray(data.batch_indices(key, e * per_epoch, N, B))
  assert not np.array_equal(first(0), first(1))    # a fresh order each epoch


def test_precomputed_permutation_gives_the_same_batches():
  key = jax.random.key(4)
  per_epoch = data.steps_per_epoch(N, B)
  for step in (0, 7, 10, 25):
    perm = data.epoch_permutation(key, step // per_epoch, N)
    np.testing.assert_array_equal(data.batch_indices(key, step, N, B, perm),
                                  data.batch_indices(key, step, N, B))


def test_step_chunks_shape_and_content():
  x = np.arange(N * 2, dtype=np.float32).reshape(N, 2)
  y = np.arange(N)
  key = jax.random.key(1)
  cx, cy = data.step_chunks((x, y), key, 3, B, 5)
  assert cx.shape == (5, 2, 2) and cy.shape == (5, 2)
  idx = np.asarray(data.batch_indices(key, 3, N, B)).reshape(5, 2)
  np.testing.assert_array_equal(cy, idx)
  np.testing.assert_array_equal(cx, x[idx])


def test_bad_inputs_raise_clear_errors():
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="batch_size must be in 1..103"):
    data.steps_per_epoch(N, 0)
  with pytest.raises(ValueError, match="batch_size must be in 1..103"):
    data.batch_indices(key, 0, N, 200)
  with pytest.raises(ValueError, match="epoch_permutation"):
    data.batch_indices(key, 0, N, B, perm=np.arange(N - 1))
  with pytest.raises(ValueError, match="not a multiple of the number of chunks"):
    data.step_chunks((np.zeros((N, 2)),), key, 0, B, 3)
  with pytest.raises(ValueError, match="unknown dataset"):
    data.load("mnist")

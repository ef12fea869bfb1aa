"""A user's own data for ``train.py`` (tests/test_grain.py):
``--config.data.name=custom --config.data.custom.source=tests.custom_source:splits``.

Three Gaussian blobs in 6 dimensions. The training split is a grain pipeline (a
``MapDataset`` over indices, mapped to examples); the test split a plain list,
a random-access source. Nothing downloads: the data come from a fixed seed.
"""
from __future__ import annotations

import grain
import numpy as np

NUM_TRAIN, NUM_TEST, DIM, CLASSES = 300, 60, 6, 3


def _blobs(n: int, seed: int):
  rng = np.random.default_rng(seed)
  centres = np.random.default_rng(0).standard_normal((CLASSES, DIM)) * 2.0
  y = rng.integers(0, CLASSES, n)
  x = centres[y] + rng.standard_normal((n, DIM))
  return x.astype(np.float32), y.astype(np.int32)


def splits():
  """``(train, test)``: examples ``{"x": float32 [6], "y": int32 class}``."""
  x, y = _blobs(NUM_TRAIN, 1)
  train = grain.MapDataset.range(NUM_TRAIN).map(lambda i: {"x": x[i], "y": y[i]})
  xt, yt = _blobs(NUM_TEST, 2)
  return train, [{"x": a, "y": b} for a, b in zip(xt, yt, strict=True)]


def arrays():
  """The training split as arrays ``(x [300, 6], y [300])`` (what the test compares with)."""
  return _blobs(NUM_TRAIN, 1)


def tuples():
  """Wrong: examples as ``(x, y)`` tuples, not ``{"x", "y"}`` dicts."""
  train, test = splits()
  return train.map(lambda e: (e["x"], e["y"])), test

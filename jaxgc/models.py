"""Small flax.linen models and the per-chunk loss the coded step differentiates.

The loss of a chunk is its *sum* of example losses divided by the step's batch
size, so that ``Σ_i g_i`` over the ``N`` chunks is the gradient of the usual
batch-mean loss (PROTOCOL.md §1: the goal is ``g = Σ_i g_i``).
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp
import optax

__all__ = ["MLP", "CNN", "get_model", "init_params", "chunk_loss_fn", "predict_metrics"]


class MLP(nn.Module):
  """``[batch, features...] -> [batch, num_outputs]``; ``hidden=()`` is a linear model."""
  hidden: Sequence[int] = (64, 64)
  num_outputs: int = 10

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for h in self.hidden:
      x = nn.relu(nn.Dense(h)(x))
    return nn.Dense(self.num_outputs)(x)


class CNN(nn.Module):
  """Small convnet for ``[batch, H·W]`` square grey images (``[batch, 64]`` digits)."""
  channels: Sequence[int] = (32, 64)
  hidden: int = 128
  num_outputs: int = 10

  @nn.compact
  def __call__(self, x):
    side = int(round(x.shape[-1] ** 0.5))
    x = x.reshape(x.shape[0], side, side, 1)
    for c in self.channels:
      x = nn.relu(nn.Conv(c, (3, 3))(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.num_outputs)(x)


def get_model(name: str, num_classes: int, hidden: Sequence[int] = (64, 64)) -> nn.Module:
  """``"mlp"``, ``"linear"`` (logistic/linear regression) or ``"cnn"``.

  ``num_classes=0`` (regression) gives one output.
  """
  out = max(int(num_classes), 1)
  if name == "mlp":
    return MLP(tuple(hidden), out)
  if name == "linear":
    return MLP((), out)
  if name == "cnn":
    return CNN(num_outputs=out)
  raise ValueError(f"unknown model {name!r}; choose one of ['mlp', 'linear', 'cnn'].")


def _example_losses(logits, y, regression: bool):
  if regression:
    return 0.5 * jnp.square(logits[:, 0] - y)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def chunk_loss_fn(apply_fn: Callable, batch_size: int, regression: bool = False):
  """``loss(params, (x, y)) -> scalar`` on one chunk: summed example losses / ``batch_size``.

  ``x``: ``[chunk_batch, ...]``, ``y``: ``[chunk_batch]``.
  """
  scale = 1.0 / float(batch_size)

  def loss(params, chunk):
    x, y = chunk
    return jnp.sum(_example_losses(apply_fn({"params": params}, x), y, regression)) * scale

  return loss


def predict_metrics(apply_fn: Callable, params, x, y, regression: bool = False):
  """Mean loss and accuracy (or MSE for regression) on ``x [n, ...]``, ``y [n]``."""
  logits = apply_fn({"params": params}, x)
  loss = jnp.mean(_example_losses(logits, y, regression))
  if regression:
    return {"test_loss": loss, "test_mse": jnp.mean(jnp.square(logits[:, 0] - y))}
  acc = jnp.mean(jnp.argmax(logits, -1) == y)
  return {"test_loss": loss, "test_accuracy": acc}


def init_params(model: nn.Module, key, example_x):
  """Initial parameters from one example batch ``[b, ...]``."""
  return model.init(key, jnp.asarray(example_x))["params"]

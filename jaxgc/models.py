"""flax.linen models and the per-chunk loss the coded step differentiates.

The loss of a chunk is its *sum* of example losses divided by the step's batch
size (and, for sequences, by the tokens per example), so that ``Σ_i g_i`` over
the ``N`` chunks is the gradient of the usual batch-mean loss (PROTOCOL.md §1:
the goal is ``g = Σ_i g_i``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgc.errors import ParamError
from jaxgc.registry import Registry

__all__ = ["MLP", "CNN", "CNNBN", "TransformerLM", "MODELS", "get_model", "mlp", "linear", "cnn",
           "cnn_bn", "transformer_lm", "init_params",
           "init_variables", "chunk_loss_fn", "stateful_chunk_loss_fn", "predict_metrics",
           "MemoryEstimate", "memory_estimate", "check_memory", "device_memory_budget"]


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


class CNNBN(nn.Module):
  """:class:`CNN` with batch norm after each convolution and dropout before the output.

  ``train=True`` normalises with the batch's (a chunk's: ghost batch norm) statistics
  and updates ``batch_stats``, and drops units with the ``"dropout"`` key;
  ``train=False`` (evaluation) uses the running statistics and no dropout.
  """
  channels: Sequence[int] = (32, 64)
  hidden: int = 128
  num_outputs: int = 10
  dropout: float = 0.1

  @nn.compact
  def __call__(self, x, train: bool = False):
    side = int(round(x.shape[-1] ** 0.5))
    x = x.reshape(x.shape[0], side, side, 1)
    for c in self.channels:
      x = nn.Conv(c, (3, 3), use_bias=False)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    x = nn.relu(nn.Dense(self.hidden)(x.reshape(x.shape[0], -1)))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_outputs)(x)


class _Block(nn.Module):
  """Pre-LN decoder block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))``."""
  num_heads: int
  mlp_ratio: int

  @nn.compact
  def __call__(self, x, mask):
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(h, h, mask=mask)
    h = nn.LayerNorm()(x)
    h = nn.gelu(nn.Dense(self.mlp_ratio * x.shape[-1])(h))
    return x + nn.Dense(x.shape[-1])(h)


class TransformerLM(nn.Module):
  """Decoder-only language model: tokens ``[batch, T] -> logits [batch, T, vocab]``,
  ``T ≤ seq_len``.

  Causal self-attention, pre-LN blocks, learned positions, untied output layer.
  """
  vocab: int = 256
  d_model: int = 64
  num_heads: int = 4
  num_layers: int = 2
  seq_len: int = 64
  mlp_ratio: int = 4

  @nn.compact
  def __call__(self, tokens):
    length = tokens.shape[-1]
    if length > self.seq_len:
      raise ValueError(f"sequences of length {length} exceed the model's seq_len={self.seq_len}; "
                       "build the model and the data with the same --config.seq_len.")
    x = nn.Embed(self.vocab, self.d_model)(tokens)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (self.seq_len, self.d_model))
    x = x + pos[:length].astype(x.dtype)
    mask = nn.make_causal_mask(tokens)
    for _ in range(self.num_layers):
      x = _Block(self.num_heads, self.mlp_ratio)(x, mask)
    return nn.Dense(self.vocab)(nn.LayerNorm()(x))


MODELS: Registry[nn.Module] = Registry("model", positional=1)
"""Name -> constructor ``(num_classes, **options) -> nn.Module``; ``num_classes=0``
(regression) gives one output."""


def _outputs(num_classes: int) -> int:
  return max(int(num_classes), 1)


@MODELS.register("mlp")
def mlp(num_classes: int, hidden: Sequence[int] = (64, 64)) -> MLP:
  """:class:`MLP` with hidden layer widths ``hidden``."""
  return MLP(tuple(hidden), _outputs(num_classes))


@MODELS.register("linear")
def linear(num_classes: int) -> MLP:
  """Logistic (or, for regression, linear) regression: an :class:`MLP` with no hidden layer."""
  return MLP((), _outputs(num_classes))


@MODELS.register("cnn")
def cnn(num_classes: int) -> CNN:
  """:class:`CNN` for square grey images."""
  return CNN(num_outputs=_outputs(num_classes))


@MODELS.register("cnn_bn")
def cnn_bn(num_classes: int, dropout: float = CNNBN.dropout) -> CNNBN:
  """:class:`CNNBN` (batch norm, and ``dropout`` in ``[0, 1)`` before the output)."""
  rate = float(dropout)
  if not 0.0 <= rate < 1.0:
    raise ParamError(f"dropout={rate} must be in [0, 1).", "dropout")
  return CNNBN(num_outputs=_outputs(num_classes), dropout=rate)


@MODELS.register("transformer_lm")
def transformer_lm(num_classes: int, d_model: int = TransformerLM.d_model,
                   num_heads: int = TransformerLM.num_heads,
                   num_layers: int = TransformerLM.num_layers,
                   seq_len: int = TransformerLM.seq_len,
                   mlp_ratio: int = TransformerLM.mlp_ratio) -> TransformerLM:
  """:class:`TransformerLM` with vocabulary ``num_classes``; ``num_heads`` must divide
  ``d_model``."""
  if d_model % num_heads:
    raise ParamError(f"d_model={d_model} is not a multiple of num_heads={num_heads}; "
                     "pick num_heads dividing d_model.", "num_heads")
  return TransformerLM(vocab=_outputs(num_classes), d_model=d_model, num_heads=num_heads,
                       num_layers=num_layers, seq_len=seq_len, mlp_ratio=mlp_ratio)


def get_model(name: str, num_classes: int, hidden: Sequence[int] = (64, 64),
              **options: Any) -> nn.Module:
  """The model registered as ``name`` in :data:`MODELS`: ``"mlp"``, ``"linear"``
  (logistic/linear regression), ``"cnn"``, ``"cnn_bn"`` (with batch norm and dropout,
  option ``dropout``) or ``"transformer_lm"``.

  ``num_classes=0`` (regression) gives one output; for ``transformer_lm`` it is
  the vocabulary, and ``options`` are :class:`TransformerLM`'s fields
  (``d_model``, ``num_heads``, ``num_layers``, ``seq_len``, ``mlp_ratio``).
  ``hidden``: the widths of a model with option ``hidden`` (the ``mlp``), unused by
  the others.

  Raises:
    jaxgc.errors.ParamError: (a ``ValueError``) an unknown name (``param="name"``),
      an option the model does not take, or a bad value; ``param`` names it.
  """
  if "hidden" in MODELS.options(name):
    options.setdefault("hidden", hidden)
  return MODELS.build(name, num_classes, **options)


def _example_losses(logits, y, regression: bool):
  if regression:
    return 0.5 * jnp.square(logits[:, 0] - y)
  # Integer labels [n] or next-token targets [n, T] against logits [..., classes].
  return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def chunk_loss_fn(apply_fn: Callable, batch_size: int, regression: bool = False):
  """``loss(params, (x, y)) -> scalar`` on one chunk: summed losses / (``batch_size`` ·
  targets per example).

  ``x``: ``[chunk_batch, ...]``, ``y``: ``[chunk_batch]``, or ``[chunk_batch, T]``
  next-token targets of a language model (then the sum is over tokens, and the
  chunk losses add up to the batch's mean token loss).
  """
  def loss(params, chunk):
    x, y = chunk
    scale = 1.0 / (float(batch_size) * math.prod(y.shape[1:]))
    return jnp.sum(_example_losses(apply_fn({"params": params}, x), y, regression)) * scale

  return loss


def stateful_chunk_loss_fn(apply_fn: Callable, batch_size: int, regression: bool = False):
  """:func:`chunk_loss_fn` of a model with state (batch norm) and dropout.

  ``loss(params, chunk, model_state, *, rng) -> (loss, new_model_state)``:
  ``model_state`` is the model's non-``params`` collections (``{"batch_stats": ...}``),
  normalised with the chunk's statistics (ghost batch norm); ``rng`` is the chunk's
  dropout key (:func:`jaxgc.chunk_keys`), the same on every worker that computes it.
  """
  def loss(params, chunk, model_state, *, rng):
    x, y = chunk
    scale = 1.0 / (float(batch_size) * math.prod(y.shape[1:]))
    logits, new = apply_fn({"params": params, **model_state}, x, train=True,
                           rngs={"dropout": rng}, mutable=list(model_state))
    return jnp.sum(_example_losses(logits, y, regression)) * scale, dict(new)

  return loss


def predict_metrics(apply_fn: Callable, params, x, y, regression: bool = False,
                    model_state=None):
  """Mean loss and accuracy (or MSE for regression) on ``x [n, ...]``, ``y [n]``.

  For a language model (``y [n, T]``): mean token loss, next-token accuracy and
  perplexity ``exp(loss)``. ``model_state``: the model's other collections
  (batch-norm running statistics).
  """
  logits = apply_fn({"params": params, **(model_state or {})}, x)
  loss = jnp.mean(_example_losses(logits, y, regression))
  if regression:
    return {"test_loss": loss, "test_mse": jnp.mean(jnp.square(logits[:, 0] - y))}
  acc = jnp.mean(jnp.argmax(logits, -1) == y)
  if y.ndim > 1:
    return {"test_loss": loss, "test_accuracy": acc, "test_perplexity": jnp.exp(loss)}
  return {"test_loss": loss, "test_accuracy": acc}


def init_params(model: nn.Module, key, example_x):
  """Initial parameters from one example batch ``[b, ...]``."""
  return model.init(key, jnp.asarray(example_x))["params"]


def init_variables(model: nn.Module, key, example_x):
  """``(params, model_state)``: model_state is every other collection (``{}`` for none)."""
  variables = dict(model.init(key, jnp.asarray(example_x)))
  return variables.pop("params"), variables


class MemoryEstimate(NamedTuple):
  """Estimated bytes on one device for one worker's step, by part.

  ``params``, ``optimizer`` (``optimizer_slots`` copies of the parameters),
  ``chunk_gradients`` (``gradient_buffers`` gradients held at once), ``activations``
  (XLA's temp memory for one chunk's gradient), ``inputs`` (``load`` chunks).
  """
  params: int
  optimizer: int
  chunk_gradients: int
  activations: int
  inputs: int

  @property
  def total(self) -> int:
    return sum(self)


def _tree_bytes(tree) -> int:
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def memory_estimate(loss_fn: Callable, params, chunk, load: int, *, optimizer_slots: int = 2,
                    gradient_buffers: int | None = None,
                    param_bytes: int | None = None) -> MemoryEstimate:
  """Per-device bytes of one worker's chunk work at ``load``, without running it.

  ``params`` and ``chunk`` may be arrays or ``jax.ShapeDtypeStruct``s (nothing is
  allocated): one chunk's gradient is compiled and its temp memory read from
  XLA's memory analysis. ``gradient_buffers`` (default ``load``): chunk gradients
  held at once, ``load`` when a worker materialises all of them before encoding.
  ``param_bytes`` (default: all of ``params``): the parameter bytes one device
  holds, less when a group of devices shards them
  (:meth:`jaxgc.parallel.Placement.bytes_per_device`); the optimizer state and
  gradients scale with it.
  """
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), (params, chunk))
  compiled = jax.jit(jax.grad(loss_fn)).lower(*shapes).compile()
  analysis = compiled.memory_analysis()
  temp = int(getattr(analysis, "temp_size_in_bytes", 0) or 0)
  p = _tree_bytes(shapes[0]) if param_bytes is None else int(param_bytes)
  buffers = load if gradient_buffers is None else gradient_buffers
  return MemoryEstimate(params=p, optimizer=optimizer_slots * p, chunk_gradients=buffers * p,
                        activations=temp, inputs=load * _tree_bytes(shapes[1]))


def check_memory(estimate: MemoryEstimate, budget_bytes: float | None, load: int) -> None:
  """Raises :class:`~jaxgc.errors.ParamError` (``param="load"``) with the estimate when it
  exceeds ``budget_bytes`` (``None``: no check)."""
  if budget_bytes is None or estimate.total <= budget_bytes:
    return
  gib = lambda b: f"{b / 2**30:.3g} GiB"
  parts = ", ".join(f"{k} {gib(v)}" for k, v in estimate._asdict().items())
  raise ParamError(
      f"the model is too large for load={load}: estimated {gib(estimate.total)} per device "
      f"({parts}) exceeds the memory budget of {gib(budget_bytes)}. Lower --config.load or "
      "--config.batch_size, shrink the model (e.g. --config.d_model, --config.num_layers), or "
      "raise --config.memory_budget_gb, or shard it over groups of devices "
      "(--config.mesh.model).", "load")


def device_memory_budget(device=None) -> int | None:
  """The device's allocatable bytes where the backend reports them (GPU/TPU), else ``None``."""
  device = device or jax.local_devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None

"""Models written for pmap run unchanged: flax's ImageNet ResNet, its BatchNorm(axis_name='batch').

The model file is flax's own (tests/flax_models/imagenet_resnet.py, copied unchanged
with its licence header); so are S5's (tests/flax_models/s5) and AlgoPerf's DeepSpeech
(tests/flax_models/algoperf, a masked batch norm that psums its statistics). With
``batch_axis_name='batch'`` each chunk runs with the axis bound to itself alone, so its
batch statistics are its own: the coded gradient
must equal the sum of the chunks' gradients each computed alone (``jax.grad`` under
a size-1 ``vmap(axis_name='batch')``, outside any ``shard_map``), and the new
``batch_stats`` the step keeps must be the mean over chunks of each chunk's own.
"""
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jaxgc
from jaxgc import assignments, parallel, timing
from jaxgc.errors import ParamError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flax_models import imagenet_resnet  # noqa: E402  (flax's file, as published)

# AlgoPerf's files import each other by their package path (algorithmic_efficiency....).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "flax_models",
                                "algoperf"))

M, LOAD, CHUNK = 8, 3, 4
STRAGGLER = timing.Slowdown(timing.ShiftedExponential(1.0, 1.0), 0.25, 5.0)


def resnet(stage_sizes):
  return imagenet_resnet.ResNet(stage_sizes=stage_sizes, block_cls=imagenet_resnet.ResNetBlock,
                                num_classes=3, num_filters=4)


def make_loss(model):
  def loss_fn(params, chunk, batch_stats):
    """flax's train.py loss, per chunk: summed cross-entropy and the new batch statistics."""
    logits, upd = model.apply({"params": params, "batch_stats": batch_stats}, chunk["x"],
                              train=True, mutable=["batch_stats"])
    loss = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, chunk["y"]))
    return loss / (M * CHUNK), upd["batch_stats"]
  return loss_fn


def direct(loss_fn, params, chunks, stats):
  """``(Σ_i loss_i, aux [N, ...], Σ_i g_i)``, each chunk alone: its ``'batch'`` axis bound by a
  size-1 vmap, so flax's pmean averages over that chunk only."""
  @jax.jit
  def one(chunk):
    f = lambda c: jax.value_and_grad(loss_fn, has_aux=True)(params, c, stats)
    out = jax.vmap(f, axis_name="batch")(jax.tree.map(lambda x: x[None], chunk))
    return jax.tree.map(lambda x: x[0], out)
  outs = [one(jax.tree.map(lambda x, i=i: x[i], chunks)) for i in range(M)]
  stack = lambda *xs: jnp.stack(xs)
  loss = sum(o[0][0] for o in outs)
  aux = jax.tree.map(stack, *[o[0][1] for o in outs])
  g = jax.tree.map(lambda *xs: sum(xs), *[o[1] for o in outs])
  return loss, aux, g


def rel(a, b):
  a, b = ravel_pytree(a)[0], ravel_pytree(b)[0]
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def data(model):
  kx, ky, kp = jax.random.split(jax.random.key(0), 3)
  chunks = {"x": jax.random.normal(kx, (M, CHUNK, 8, 8, 3)),
            "y": jax.random.randint(ky, (M, CHUNK), 0, 3)}
  # flax's train.py initialises with train=False: no batch statistics, no pmean.
  v = model.init(kp, chunks["x"][0], train=False)
  return chunks, v["params"], v["batch_stats"]


def protocol(ell=2):
  return jaxgc.PartialStraggler(assignments.cyclic(M, LOAD), ell)


@pytest.fixture(scope="module")
def small():
  """flax's testing ResNet (``_ResNet1``'s one stage), 4 filters, 8 x 8 images."""
  model = resnet([1])
  chunks, params, stats = data(model)
  return make_loss(model), chunks, params, stats


@pytest.fixture(scope="module")
def setup(small):
  """``small`` and its direct per-chunk reference."""
  return small + (direct(small[0], small[2], small[1], small[3]),)


def test_resnet_gradient_is_the_sum_of_each_chunks_own(setup):
  """coded_value_and_grad on a 1-D mesh: exact, aux chunk by chunk, under jit and eagerly
  (its outputs mix with arrays on the user's mesh)."""
  loss_fn, chunks, params, stats, (want_loss, want_aux, want_g) = setup
  grad_fn = jaxgc.coded_value_and_grad(loss_fn, protocol(), STRAGGLER, parallel.make_mesh(8),
                                       has_aux=True, batch_axis_name="batch")
  (loss, aux), g, info = jax.jit(grad_fn)(params, chunks, jax.random.key(1), stats)
  assert bool(info["exact"])
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  assert rel(g, want_g) < 1e-5
  assert rel(aux, want_aux) < 1e-5
  moved = jax.tree.map(lambda p, d: p - 0.1 * d, params, g)   # eager, across the two meshes
  assert rel(moved, params) > 0
  # The statistics really are per chunk: pooled over all chunks the gradient is another.
  pooled = jax.grad(lambda p: jnp.sum(jax.vmap(lambda c: loss_fn(p, c, stats)[0],
                                               axis_name="batch")(chunks)))(params)
  assert rel(pooled, want_g) > 1e-3


def test_resnet_trains_on_a_workers_by_model_mesh(setup):
  """make_coded_step on a 4 x 2 mesh, parameters sharded over ``model`` on the user's mesh:
  an SGD(1) step moves them by exactly -Σ_i g_i, and the kept batch statistics are the mean
  over chunks of each chunk's own (the step's model-state rule)."""
  loss_fn, chunks, params, stats, (want_loss, want_aux, want_g) = setup
  last = lambda path, shape, k: (P(*([None] * (len(shape) - 1)), "model")
                                 if shape and shape[-1] % k == 0 else P())
  step = jaxgc.make_coded_step(protocol(), STRAGGLER, loss_fn, optax.sgd(1.0),
                               parallel.make_mesh(8, model=2), has_aux=True,
                               batch_axis_name="batch", param_sharding=last)
  state = step.init_state(params, jax.random.key(0), model_state=stats)
  assert step.placement(params).sharded
  new, metrics = step.jit()(state, chunks, jax.random.key(3))
  assert bool(metrics["exact"])
  np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)
  want_params = optax.apply_updates(params, jax.tree.map(jnp.negative, want_g))
  assert rel(new.params, want_params) < 1e-6
  assert rel(jax.tree.map(lambda a, b: a - b, params, new.params), want_g) < 1e-4
  assert rel(new.model_state, jax.tree.map(lambda a: jnp.mean(a, 0), want_aux)) < 1e-5


def test_plain_step_binds_the_batch_axis_as_the_coded_step_does(setup):
  """make_plain_step(batch_axis_name='batch'), the uncoded reference: each chunk counted once
  with its own statistics, its gradient is the direct per-chunk sum; the same refusals."""
  loss_fn, chunks, params, stats, (want_loss, _, want_g) = setup
  loss = lambda p, c: loss_fn(p, c, stats)[0]   # (the plain step passes no model state)
  mesh, asg = parallel.make_mesh(8), assignments.cyclic(M, LOAD)
  plain = parallel.make_plain_step(asg, loss, optax.sgd(1.0), mesh, batch_axis_name="batch")
  g, value = jax.jit(plain.gradient)(params, chunks)
  np.testing.assert_allclose(value, want_loss, rtol=1e-5)
  assert rel(g, want_g) < 1e-5
  with pytest.raises(ParamError) as e:
    parallel.make_plain_step(asg, loss, optax.sgd(1.0), mesh).gradient(params, chunks)
  assert e.value.param == "batch_axis_name" and "batch_axis_name='batch'" in one_line(e)
  with pytest.raises(ParamError, match="already an axis of the mesh") as e:
    parallel.make_plain_step(asg, loss, optax.sgd(1.0), mesh, batch_axis_name="workers")
  assert e.value.param == "batch_axis_name"


# -- refusals: one line, naming the axis and the argument -----------------------------------

def one_line(e) -> str:
  msg = str(e.value)
  assert "\n" not in msg
  return msg


def test_unbound_axis_names_batch_axis_name(small):
  loss_fn, chunks, params, stats = small
  grad_fn = jaxgc.coded_value_and_grad(loss_fn, protocol(), STRAGGLER, parallel.make_mesh(8),
                                       has_aux=True)
  with pytest.raises(ParamError) as e:
    grad_fn(params, chunks, jax.random.key(0), stats)
  assert e.value.param == "batch_axis_name"
  assert "batch_axis_name='batch'" in one_line(e)


def test_another_axis_than_the_declared_one_is_named(small):
  _, chunks, params, _ = small
  loss = lambda p, c: jax.lax.pmean(jnp.sum(c["x"]) * p["Dense_0"]["bias"][0], "data")
  grad_fn = jaxgc.coded_value_and_grad(loss, protocol(), STRAGGLER, parallel.make_mesh(8),
                                       batch_axis_name="batch")
  with pytest.raises(ParamError) as e:
    grad_fn(params, chunks, jax.random.key(0))
  assert e.value.param == "batch_axis_name"
  assert "'data'" in one_line(e) and "batch_axis_name='batch'" in str(e.value)


@pytest.mark.parametrize("model,axis", [(1, "workers"), (2, "model")])
def test_collective_over_a_mesh_axis_is_refused_not_hung(small, model, axis):
  """Inside shard_map these axes are bound: psum over workers would reach other workers."""
  _, chunks, params, _ = small
  loss = lambda p, c: jax.lax.psum(jnp.sum(c["x"]) * p["Dense_0"]["bias"][0], axis)
  for batch in (None, "batch"):
    grad_fn = jaxgc.coded_value_and_grad(loss, protocol(), STRAGGLER,
                                         parallel.make_mesh(8, model=model),
                                         batch_axis_name=batch)
    with pytest.raises(ParamError) as e:
      grad_fn(params, chunks, jax.random.key(0))
    assert e.value.param == "loss_fn" and repr(axis) in one_line(e)


def test_a_mesh_axis_named_batch_is_refused_by_name(small):
  """The issue's workaround, a mesh axis 'batch' of size 2, aborted the process."""
  loss_fn, chunks, params, stats = small
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("workers", "batch"))
  grad_fn = jaxgc.coded_value_and_grad(loss_fn, protocol(), STRAGGLER, mesh, has_aux=True)
  with pytest.raises(ParamError) as e:
    grad_fn(params, chunks, jax.random.key(0), stats)
  assert e.value.param == "loss_fn"
  assert "batch_axis_name='batch'" in one_line(e) and "without 'batch'" in str(e.value)
  with pytest.raises(ParamError, match="already an axis of the mesh") as e:
    jaxgc.coded_value_and_grad(loss_fn, protocol(), STRAGGLER, mesh, has_aux=True,
                               batch_axis_name="batch")
  assert e.value.param == "batch_axis_name"


# -- S5 (lindermanlab/S5): a model that binds 'batch' itself, with flax nn.vmap ------------------

class TinySSM(nn.Module):
  """A stand-in for S5's SSM (its ssm.py no longer imports on JAX): a causal linear map."""
  step_rescale: float = 1.0

  @nn.compact
  def __call__(self, x):
    return nn.Dense(x.shape[-1])(jnp.cumsum(x, 0))


def test_s5_model_that_binds_its_own_axis():
  """S5's BatchClassificationModel vmaps its examples with axis_name='batch', so its batch
  norm averages over the chunk's examples: no batch_axis_name needed. JAX's varying-axes
  check refuses that vmap inside shard_map; the step says so in one line, naming
  check_vma, and with check_vma=False the gradient is exact."""
  from flax_models.s5 import seq_model
  kw = dict(ssm=TinySSM, d_output=3, d_model=4, n_layers=1, padded=False, dropout=0.0,
            batchnorm=True)
  model = seq_model.BatchClassificationModel(training=True, **kw)
  kx, ky, kp = jax.random.split(jax.random.key(1), 3)
  chunks = {"x": jax.random.normal(kx, (M, CHUNK, 6, 2)),
            "y": jax.random.randint(ky, (M, CHUNK), 0, 3)}
  v = seq_model.BatchClassificationModel(training=False, **kw).init(kp, chunks["x"][0], None)

  def loss_fn(params, chunk, batch_stats):
    logp, upd = model.apply({"params": params, "batch_stats": batch_stats}, chunk["x"], None,
                            mutable=["batch_stats"])
    loss = -jnp.sum(jnp.take_along_axis(logp, chunk["y"][:, None], 1))
    return loss / (M * CHUNK), upd["batch_stats"]

  params, stats = v["params"], v["batch_stats"]
  one = jax.jit(lambda c: jax.grad(lambda p: loss_fn(p, c, stats)[0])(params))
  want = jax.tree.map(lambda *g: sum(g), *[one(jax.tree.map(lambda x, i=i: x[i], chunks))
                                           for i in range(M)])
  mesh = parallel.make_mesh(8)
  strict = jaxgc.coded_value_and_grad(loss_fn, protocol(), STRAGGLER, mesh, has_aux=True)
  with pytest.raises(ParamError) as e:
    strict(params, chunks, jax.random.key(0), stats)
  assert e.value.param == "check_vma" and "check_vma=False" in one_line(e)
  grad_fn = jaxgc.coded_value_and_grad(loss_fn, protocol(), STRAGGLER, mesh, has_aux=True,
                                       check_vma=False)
  (_, aux), g, info = jax.jit(grad_fn)(params, chunks, jax.random.key(0), stats)
  assert bool(info["exact"])
  assert rel(g, want) < 1e-5
  assert rel(aux, jax.vmap(lambda c: loss_fn(params, c, stats)[1])(chunks)) < 1e-5


def test_config_field_is_refused_on_a_backend_that_cannot_bind_it():
  import importlib

  from configs import default as default_config
  from jaxgc import experiment
  build = importlib.import_module("jaxgc.experiment.build")
  config = experiment.apply_overrides(default_config.get_config(),
                                      [("step.batch_axis_name", "batch"), ("backend", "ray")])
  with pytest.raises(experiment.ConfigError) as e:
    build.make_step(config, protocol(), STRAGGLER, None, None, None)
  assert "--config.step.batch_axis_name='batch'" in one_line(e) and "spmd" in str(e.value)


# -- DeepSpeech (mlcommons/algorithmic-efficiency): a masked batch norm that psums -------------

def test_algoperf_deepspeech_psum_statistics_are_each_chunks_own():
  """AlgoPerf's DeepSpeech sums its batch norm's masked statistics over the devices with
  ``jax.lax.psum(..., axis_name='batch')`` (padded utterances count for nothing). With
  ``batch_axis_name='batch'`` each chunk's sums are its own: the coded gradient is the sum
  of the chunks' own, and so are the new statistics, chunk by chunk (pooled, every chunk's
  would be the same). Its LSTM scans from a constant zero carry, which JAX's varying-axes
  check refuses inside ``shard_map``: ``check_vma=False``."""
  from algorithmic_efficiency.workloads.librispeech_deepspeech.librispeech_jax import models
  config = models.DeepspeechConfig(vocab_size=5, encoder_dim=4, num_lstm_layers=1,
                                   num_ffn_layers=1, use_specaug=False, input_dropout_rate=0.0,
                                   feed_forward_dropout_rate=0.0)
  model = models.Deepspeech(config)
  ka, kl, ky, kp = jax.random.split(jax.random.key(2), 4)
  b, samples = 2, 4000                 # 2 utterances per chunk, 1/4 s of 16 kHz audio each
  lengths = jax.random.randint(kl, (M, b), samples // 2, samples + 1)
  chunks = {"audio": jax.random.normal(ka, (M, b, samples)) * 3000.0,
            "pad": (jnp.arange(samples) >= lengths[..., None]).astype(jnp.float32),
            "y": jax.random.randint(ky, (M, b, 2), 1, config.vocab_size),
            "ypad": jnp.zeros((M, b, 2))}
  # AlgoPerf's init_model_fn: jitted, train=False (no psum).
  v = jax.jit(lambda k, a, p: model.init(k, a, p, train=False))(kp, chunks["audio"][0],
                                                                 chunks["pad"][0])
  params, stats = v["params"], v["batch_stats"]

  def loss_fn(params, chunk, batch_stats):
    """AlgoPerf's loss (its workload's CTC, summed), per chunk, and the new statistics."""
    (logits, paddings), upd = model.apply({"params": params, "batch_stats": batch_stats},
                                          chunk["audio"], chunk["pad"], train=True,
                                          mutable=["batch_stats"])
    per_example = optax.ctc_loss(nn.log_softmax(logits), paddings, chunk["y"], chunk["ypad"])
    return jnp.sum(per_example) / (M * b), upd["batch_stats"]

  want_loss, want_aux, want_g = direct(loss_fn, params, chunks, stats)
  assert float(want_loss) < 100.0               # (every utterance can be aligned to its labels)
  grad_fn = jaxgc.coded_value_and_grad(loss_fn, protocol(), STRAGGLER, parallel.make_mesh(8),
                                       has_aux=True, batch_axis_name="batch", check_vma=False)
  (loss, aux), g, info = jax.jit(grad_fn)(params, chunks, jax.random.key(1), stats)
  assert bool(info["exact"])
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  assert rel(g, want_g) < 1e-5
  assert rel(aux, want_aux) < 1e-5
  # The chunks' statistics differ: so do their moves of the running averages (momentum .999).
  moved = jax.tree.map(lambda new, old: new - old, want_aux, stats)
  assert rel(jax.tree.map(lambda d: jnp.broadcast_to(d[:1], d.shape), moved), moved) > 1e-2


def test_a_scan_from_a_constant_carry_is_refused_naming_check_vma_and_exact_without():
  """flax's nn.RNN starts its scan from a constant zero carry; with the parameters varying
  over the workers the carry's types differ, and JAX's varying-axes check raises a
  TypeError deep in the scan. The step says so in one line naming check_vma, and with
  check_vma=False the gradient is the sum of the chunks' own."""
  class Recurrent(nn.Module):
    @nn.compact
    def __call__(self, x):
      return jnp.sum(nn.RNN(nn.LSTMCell(3))(x) ** 2)

  model = Recurrent()
  chunks = {"x": jax.random.normal(jax.random.key(3), (M, CHUNK, 5, 2))}
  params = model.init(jax.random.key(4), chunks["x"][0])
  loss_fn = lambda p, chunk: model.apply(p, chunk["x"])
  mesh = parallel.make_mesh(8)
  strict = jaxgc.coded_value_and_grad(loss_fn, protocol(), STRAGGLER, mesh)
  with pytest.raises(ParamError) as e:
    strict(params, chunks, jax.random.key(0))
  assert e.value.param == "check_vma" and "nn.RNN" in one_line(e)
  loose = jaxgc.coded_value_and_grad(loss_fn, protocol(), STRAGGLER, mesh, check_vma=False)
  value, g, info = jax.jit(loose)(params, chunks, jax.random.key(0))
  one = jax.jit(jax.value_and_grad(loss_fn))
  outs = [one(params, jax.tree.map(lambda x, i=i: x[i], chunks)) for i in range(M)]
  assert bool(info["exact"])
  assert abs(float(value) - sum(float(o[0]) for o in outs)) < 1e-4 * abs(float(value))
  assert rel(g, jax.tree.map(lambda *xs: sum(xs), *[o[1] for o in outs])) < 1e-5

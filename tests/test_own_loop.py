"""Your model, your loop: jaxgc.coded_value_and_grad with batch norm, dropout, aux and NNX."""
import os
import re
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import jaxgc
from jaxgc import assignments, parallel, timing
from tests import warm

M, LOAD, CHUNK = 8, 3, 4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRAGGLER = timing.Slowdown(timing.ShiftedExponential(1.0, 1.0), 0.25, 5.0)


class Net(nn.Module):
  """Dense -> batch norm -> relu -> dropout -> dense."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(16)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    x = nn.Dropout(0.3, deterministic=not train)(x)
    return nn.Dense(3)(x)


NET = Net()


def loss_fn(params, chunk, batch_stats, *, rng):
  """A dict batch; returns the chunk's summed loss and its updated batch statistics."""
  logits, upd = NET.apply({"params": params, "batch_stats": batch_stats}, chunk["x"],
                          train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
  loss = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, chunk["y"]))
  return loss / (M * CHUNK), upd["batch_stats"]


@jax.jit
def direct(params, chunks, key, stats):
  """Σ_i of directly computed chunk values and gradients, with chunk_keys; aux stacked."""
  keys = jaxgc.chunk_keys(key, M)
  one = lambda c, k: jax.value_and_grad(loss_fn, has_aux=True)(params, c, stats, rng=k)
  (loss, aux), g = jax.vmap(one)(chunks, keys)
  return jnp.sum(loss), aux, jax.tree.map(lambda x: jnp.sum(x, 0), g)


def rel(a, b):
  a, b = ravel_pytree(a)[0], ravel_pytree(b)[0]
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.fixture(scope="module")
def setup():
  mesh = parallel.make_mesh(8)
  kx, ky, kp = jax.random.split(jax.random.key(0), 3)
  chunks = {"x": jax.random.normal(kx, (M, CHUNK, 5)),
            "y": jax.random.randint(ky, (M, CHUNK), 0, 3)}
  v = NET.init(kp, chunks["x"][0])
  return mesh, chunks, v["params"], v["batch_stats"]


def coded(setup, ell, **kw):
  proto = jaxgc.PartialStraggler(assignments.cyclic(M, LOAD), ell)
  return jaxgc.coded_value_and_grad(loss_fn, proto, kw.pop("straggler", STRAGGLER), setup[0],
                                    has_aux=True, **kw)


@pytest.mark.parametrize("ell,faults", [(1, {}), (2, {}), (3, {}),
                                        (1, dict(message_loss_prob=0.3)),
                                        (1, dict(straggler=timing.Failures(STRAGGLER, 0.2)))])
def test_exact_gradient_is_the_sum_of_chunk_gradients(setup, ell, faults):
  _, chunks, params, stats = setup
  grad_fn = jax.jit(coded(setup, ell, **faults))
  exact, erased = 0, 0
  for s in range(2):
    key = jax.random.key(10 + s)
    (loss, aux), g, info = grad_fn(params, chunks, key, stats)
    want_loss, want_aux, want_g = direct(params, chunks, key, stats)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    assert rel(aux, want_aux) < 1e-5                      # aux stacking, chunk by chunk
    assert jax.tree.structure(g) == jax.tree.structure(params)
    assert info["coverage"].shape == (M,) and info["finished"].shape == (M,)
    if bool(info["exact"]):
      exact += 1
      assert rel(g, want_g) < 1e-5, rel(g, want_g)
      assert bool(np.all(info["finished"]))
      erased += int(info["erasures"]) > 0
  assert exact >= 1
  assert erased >= 1 or "message_loss_prob" not in faults   # the erasure round is exercised


def test_another_key_gives_another_dropout_gradient(setup):
  _, chunks, params, stats = setup
  grad_fn = jax.jit(coded(setup, 2))
  _, g1, i1 = grad_fn(params, chunks, jax.random.key(1), stats)
  _, g2, i2 = grad_fn(params, chunks, jax.random.key(2), stats)
  _, g1b, _ = grad_fn(params, chunks, jax.random.key(1), stats)
  assert bool(i1["exact"]) and bool(i2["exact"])
  assert rel(g1, g2) > 1e-2
  assert rel(g1, g1b) == 0.0


def test_deadline_mode_marks_unfinished_chunks(setup):
  _, chunks, params, stats = setup
  grad_fn = jax.jit(coded(setup, 2, mode="deadline", deadline=1.5))
  for s in range(4):
    (_, aux), _, info = grad_fn(params, chunks, jax.random.key(s), stats)
    cov = np.asarray(info["coverage"])
    np.testing.assert_array_equal(info["finished"], cov > 0)
    assert jax.tree.leaves(aux)[0].shape[0] == M
    if not np.all(cov > 0):
      return
  pytest.fail("a deadline of 1.5 left every chunk finished in 4 steps")


def test_own_optax_loop_trains_with_running_stats(setup):
  _, chunks, params, stats = setup
  tx = optax.adam(0.05)
  grad_fn = coded(setup, 2)

  @jax.jit
  def train_step(params, stats, opt_state, key):
    (loss, new_stats), g, info = grad_fn(params, chunks, key, stats)
    updates, opt_state = tx.update(g, opt_state, params)
    stats = jax.tree.map(lambda s: jnp.mean(s, 0), new_stats)   # ghost batch norm
    return optax.apply_updates(params, updates), stats, opt_state, loss

  opt_state, losses = tx.init(params), []
  for s in range(15):
    params, new, opt_state, loss = train_step(params, stats, opt_state, jax.random.key(s))
    losses.append(float(loss))
  assert losses[-1] < 0.7 * losses[0]
  assert rel(new, stats) > 0        # running statistics move


def test_make_coded_step_update_keeps_batch_stats(setup):
  mesh, chunks, params, stats = setup
  proto = jaxgc.PartialStraggler(assignments.cyclic(M, LOAD), 2)
  step = jaxgc.make_coded_step(proto, STRAGGLER, loss_fn, optax.adam(0.05), mesh, has_aux=True)
  state = step.init_state(params, jax.random.key(0), model_state=stats)
  update = step.jit()
  new, metrics = update(state, chunks, jax.random.key(3))
  _, want_aux, _ = direct(params, chunks, jax.random.fold_in(jax.random.key(3), 0), stats)
  assert bool(metrics["exact"])
  assert rel(new.model_state, jax.tree.map(lambda a: jnp.mean(a, 0), want_aux)) < 1e-5


def test_nnx_state_as_params(setup):
  from flax import nnx
  mesh, chunks, _, _ = setup

  class Mlp(nnx.Module):
    def __init__(self, rngs):
      self.a, self.b = nnx.Linear(5, 8, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
      return self.b(jax.nn.relu(self.a(x)))

  graphdef, state = nnx.split(Mlp(nnx.Rngs(0)))

  def nnx_loss(state, chunk):
    logits = nnx.merge(graphdef, state)(chunk["x"])
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, chunk["y"]))

  proto = jaxgc.PartialStraggler(assignments.cyclic(M, LOAD), 2)
  grad_fn = jax.jit(jaxgc.coded_value_and_grad(nnx_loss, proto, STRAGGLER, mesh))
  loss, g, info = grad_fn(state, chunks, jax.random.key(0))
  total = lambda s: jnp.sum(jax.vmap(lambda c: nnx_loss(s, c))(chunks))
  want_loss, want = jax.value_and_grad(total)(state)
  assert bool(info["exact"]) and isinstance(g, nnx.State)
  assert rel(g, want) < 1e-5
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)


# -- errors ------------------------------------------------------------------------------

def test_tuple_loss_without_has_aux_names_has_aux(setup):
  mesh, chunks, params, stats = setup
  proto = jaxgc.PartialStraggler(assignments.cyclic(M, LOAD), 2)
  grad_fn = jaxgc.coded_value_and_grad(loss_fn, proto, STRAGGLER, mesh)
  with pytest.raises(ValueError, match="has_aux=True"):
    grad_fn(params, chunks, jax.random.key(0), stats)


def test_non_scalar_loss_names_the_contract(setup):
  mesh, chunks, params, _ = setup
  proto = jaxgc.PartialStraggler(assignments.cyclic(M, LOAD), 2)
  bad = lambda p, c: jnp.sum(p["Dense_0"]["kernel"]) * jnp.ones(2)
  grad_fn = jaxgc.coded_value_and_grad(bad, proto, STRAGGLER, mesh)
  with pytest.raises(ValueError, match=r"scalar.*loss_fn\(params, chunk, \*args\)"):
    grad_fn(params, chunks, jax.random.key(0))


def test_straggler_that_is_not_a_model_is_refused_at_build(setup):
  proto = jaxgc.PartialStraggler(assignments.cyclic(M, LOAD), 2)
  with pytest.raises(ValueError, match="straggler model.*get_straggler_model"):
    jaxgc.coded_value_and_grad(loss_fn, proto, "slowdown", setup[0])


def test_mesh_axis_error_names_axis_name():
  mesh = jax.make_mesh((8,), ("data",))
  proto = jaxgc.PartialStraggler(assignments.cyclic(M, LOAD), 2)
  with pytest.raises(ValueError, match="axis_name="):
    jaxgc.coded_value_and_grad(loss_fn, proto, STRAGGLER, mesh)


def test_library_errors_never_say_config():
  with pytest.raises(Exception) as e:
    parallel.make_mesh(16)
  assert "16" in str(e.value) and "config" not in str(e.value).lower()


def test_update_without_tx_says_so(setup):
  mesh, _, params, _ = setup
  proto = jaxgc.PartialStraggler(assignments.cyclic(M, LOAD), 2)
  step = jaxgc.make_coded_step(proto, STRAGGLER, loss_fn, mesh=mesh)
  with pytest.raises(ValueError, match="tx=None"):
    step.init_state(params, jax.random.key(0))


# -- the examples ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["own_loop_linen.py", "own_loop_nnx.py"])
def test_example_runs_and_the_loss_falls(name):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  out = warm.run([sys.executable, os.path.join(ROOT, "examples", name)], env=env,
                       capture_output=True, text=True, timeout=240, check=True).stdout
  losses = [float(v) for v in re.findall(r"loss ([0-9.]+)", out)]
  assert len(losses) >= 3, out
  assert losses[-1] < 0.8 * losses[0], out


def test_train_py_model_with_batch_norm_and_dropout(tmp_path):
  """cnn_bn through the experiment: running statistics in the state, moved by the steps."""
  from configs import default as default_config
  from jaxgc import experiment
  flags = ("num_devices=2", "num_cpu_devices=8", "num_workers=4", "load=2", "ell=1",
           "batch_size=64", "model=cnn_bn", "num_steps=2", "eval_every=2", "checkpoint_every=0")
  config = experiment.apply_overrides(default_config.get_config(),
                                      [f.split("=", 1) for f in flags])
  state = experiment.train_and_evaluate(config, str(tmp_path))
  mean = state.model_state["batch_stats"]["BatchNorm_0"]["mean"]
  assert int(state.step) == 2 and float(jnp.max(jnp.abs(mean))) > 0

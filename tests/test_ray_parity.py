"""The Ray backend does what the SPMD step does: batch norm, dropout, extra arguments,
the adaptive PS, and coded_value_and_grad; the same losses step for step."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

ray = pytest.importorskip("ray")

import jaxgc  # pylint: disable=wrong-import-position
from jaxgc import adaptive, assignments, data, detector, models, parallel, timing  # noqa: E402  (after importorskip)
from jaxgc.backends import capabilities  # pylint: disable=wrong-import-position
from jaxgc.backends.ray import RayStep  # pylint: disable=wrong-import-position
from jaxgc.errors import ParamError  # pylint: disable=wrong-import-position
from tests.helpers import local_ray_pool  # pylint: disable=wrong-import-position

M, LOAD, BATCH, STEPS = 4, 2, 32, 3
STRAGGLER = timing.Slowdown(timing.ShiftedExponential(1.0, 1.0), 0.25, 5.0)


@pytest.fixture(scope="module")
def pool():
  # 3 CPUs: the pool's 2 actors, and one more for the device-group step's own actor.
  with local_ray_pool(num_cpus=3, num_actors=2) as p:   # workers 0, 2 on actor 0; 1, 3 on 1
    yield p


@pytest.fixture(scope="module")
def cnn_bn():
  """cnn_bn (batch norm, dropout 0.3) on digits: ``(params, model_state, loss_fn, batches)``."""
  ds = data.load("digits")
  model = models.get_model("cnn_bn", ds.num_classes, dropout=0.3)
  params, model_state = models.init_variables(model, jax.random.key(0), ds.x_train[:1])
  loss_fn = models.stateful_chunk_loss_fn(model.apply, BATCH)
  per = BATCH // M
  batches = [(ds.x_train[s * BATCH:(s + 1) * BATCH].reshape(M, per, -1),
              ds.y_train[s * BATCH:(s + 1) * BATCH].reshape(M, per)) for s in range(STEPS)]
  return params, model_state, loss_fn, batches


def protocol(ell=1, load=LOAD):
  return jaxgc.PartialStraggler(assignments.cyclic(M, load), ell)


def flat(tree):
  return np.asarray(ravel_pytree(tree)[0])


def test_ray_declares_what_it_runs():
  caps = capabilities.of("ray")
  assert caps.adaptive and caps.model_state and caps.model_axis and caps.requires == "ray"
  assert capabilities.supporting("model_state") == ["ray", "spmd"]


def test_same_losses_step_for_step_as_spmd_on_cnn_bn_with_dropout(pool, cnn_bn):
  """Batch norm (ghost, per chunk), dropout from chunk_keys and the model state's chunk
  mean: the Ray backend's losses, parameters and batch statistics are the SPMD step's."""
  params, model_state, loss_fn, batches = cnn_bn
  proto, tx, key = protocol(), optax.sgd(0.1), jax.random.key(7)
  spmd = parallel.make_coded_step(proto, STRAGGLER, loss_fn, tx, parallel.make_mesh(4),
                                  has_aux=True)
  on_ray = RayStep(proto, STRAGGLER, loss_fn, tx, pool=pool, time_scale=0.002, has_aux=True)
  s_state = spmd.init_state(params, key, model_state=model_state)
  s_state = jax.device_put(s_state, spmd.state_sharding(s_state))   # as jit returns it: one compile
  r_state = on_ray.init_state(params, key, model_state=model_state)
  update = spmd.jit()
  for s in range(STEPS):
    s_state, s_metrics = update(s_state, batches[s], key)
    r_state, r_metrics = on_ray.update(r_state, batches[s], key)
    assert r_metrics["exact"] and bool(s_metrics["exact"])
    np.testing.assert_allclose(r_metrics["loss"], float(s_metrics["loss"]), rtol=2e-5)
  np.testing.assert_allclose(flat(r_state.params), flat(s_state.params), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(flat(r_state.model_state), flat(s_state.model_state), rtol=1e-4,
                             atol=1e-5)
  assert not np.allclose(flat(r_state.model_state), flat(model_state))   # it did move


@functools.partial(jax.jit, static_argnums=0)
def direct(loss_fn, params, chunks, key, *args):
  """Σ_i of directly computed chunk values and gradients with chunk_keys; aux stacked."""
  keys = jaxgc.chunk_keys(key, M)
  one = lambda c, k: jax.value_and_grad(loss_fn, has_aux=True)(params, c, *args, rng=k)
  (loss, aux), g = jax.vmap(one)(chunks, keys)
  return jnp.sum(loss), aux, jax.tree.map(lambda x: jnp.sum(x, 0), g)


def test_own_loop_on_ray_is_the_sum_of_chunk_gradients(pool, cnn_bn):
  """jaxgc.coded_value_and_grad(..., backend="ray"): the SPMD grad_fn's signature and
  outputs; exact against the direct sum, with an extra loss argument (the batch stats)."""
  params, model_state, loss_fn, batches = cnn_bn
  grad_fn = jaxgc.coded_value_and_grad(loss_fn, protocol(2, 3), STRAGGLER, backend="ray",
                                       has_aux=True, pool=pool, time_scale=0.002)
  grads = []
  with grad_fn:
    for s in range(2):
      key = jax.random.key(10 + s)
      (loss, aux), g, info = grad_fn(params, batches[0], key, model_state)
      want_loss, want_aux, want_g = direct(loss_fn, params, batches[0], key, model_state)
      assert info["exact"] and info["finished"].all() and info["coverage"].shape == (M,)
      assert info["coverage"].min() >= 2
      np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
      np.testing.assert_allclose(flat(aux), flat(want_aux), rtol=1e-5, atol=1e-6)
      assert jax.tree.structure(g) == jax.tree.structure(params)
      err = np.linalg.norm(flat(g) - flat(want_g)) / np.linalg.norm(flat(want_g))
      assert err < 1e-5, (s, err)
      grads.append(flat(g))
  assert not np.allclose(grads[0], grads[1], rtol=1e-2)   # another key, other dropout masks
  assert grad_fn.step.closed and pool.actors        # a passed pool outlives the grad_fn


def test_workers_as_device_groups_are_exact(pool, cnn_bn):
  """model=2: the step's own actor starts with 2 host devices, and its workers run on a
  local 1 × 2 mesh with the FSDP placement; still the direct sum of chunk gradients."""
  del pool                    # (its Ray instance)
  params, model_state, loss_fn, batches = cnn_bn
  key = jax.random.key(3)
  with jaxgc.coded_value_and_grad(loss_fn, protocol(), STRAGGLER, backend="ray", has_aux=True,
                                  num_actors=1, model=2, time_scale=0.002) as grad_fn:
    assert len(ray.get(grad_fn.step.pool.actors[0].devices.remote())) == 2
    (loss, _), g, info = grad_fn(params, batches[0], key, model_state)
  want_loss, _, want_g = direct(loss_fn, params, batches[0], key, model_state)
  assert info["exact"]
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  err = np.linalg.norm(flat(g) - flat(want_g)) / np.linalg.norm(flat(want_g))
  assert err < 1e-5, err


def test_adaptive_ps_on_ray_moves_lists_and_stays_exact(pool, cnn_bn):
  """Two adjacent workers slowed 10× (real sleeps): the adaptive PS learns it from what
  it saw and spreads them, every step exact, its state carried in the TrainState."""
  params, model_state, loss_fn, batches = cnn_bn
  proto = protocol()
  # Workers 0 and 1 are slow and share chunk 1: spread apart, every chunk has a fast holder.
  slow = timing.RecordedDurations(np.array([[10.0, 10.0], [10.0, 10.0], [1.0, 1.0], [1.0, 1.0]],
                                           np.float32))
  step = RayStep(proto, slow, loss_fn, optax.sgd(0.1), pool=pool, time_scale=0.01,
                 has_aux=True, adaptive=adaptive.AdaptivePS(
                     proto, decay=1.0, detector=detector.Detector(slow_factor=1.5)))
  state = step.init_state(params, jax.random.key(0), model_state=model_state)
  perms, flags = [], []
  for s in range(STEPS):
    state, metrics = step.update(state, batches[s], jax.random.key(0))
    assert metrics["exact"]
    perms.append(np.asarray(step.adaptive.placement(state.adaptive_state)))
    flags.append(metrics["slow_workers"])
  assert not np.array_equal(perms[-1], np.arange(M))       # the slow worker's list moved
  assert int(state.adaptive_state.num_obs) == STEPS
  # The detector, fed the reports' arrival times, ranks the two slow workers at least twice
  # as slow as the others and names them. (Half the fleet is slow, so the fleet's median
  # lies between the groups: hence slow_factor 1.5 rather than the default 2.)
  level = np.asarray(state.adaptive_state.detect.level)
  assert level[:2].min() - level[2:].max() > np.log(2.0), level
  np.testing.assert_array_equal(flags[-1], [True, True, False, False], str(flags))


def test_train_runs_cnn_bn_on_ray(pool, tmp_path):
  """train.py's path: --config.backend=ray --config.model.name=cnn_bn, the batch
  statistics kept in the state as on SPMD."""
  del pool                    # (its Ray instance)
  from jaxgc import experiment  # pylint: disable=import-outside-toplevel
  config = experiment.apply_overrides(experiment.default_config(), [f.split("=", 1) for f in (
      "backend=ray", "model=cnn_bn", "num_workers=4", "load=2", "ell=1", "batch_size=32",
      "num_steps=2", "eval_every=2", "checkpoint_every=0", "ray.num_actors=1",
      "ray.time_scale=0.002")])
  state = experiment.train_and_evaluate(config, str(tmp_path))
  init = models.init_variables(models.get_model("cnn_bn", 10), jax.random.key(0),
                               np.zeros((1, 64), np.float32))[1]
  assert jax.tree.structure(state.model_state) == jax.tree.structure(init)
  assert int(state.step) == 2 and int(state.num_skipped) == 0
  assert np.isfinite(flat(state.model_state)).all()
  assert not np.allclose(flat(state.model_state), flat(init))


def test_misuse_is_one_line(pool, cnn_bn):
  params, model_state, loss_fn, batches = cnn_bn
  proto = protocol()
  cases = [
      (lambda: jaxgc.coded_value_and_grad(loss_fn, proto, STRAGGLER, parallel.make_mesh(4),
                                          backend="ray"), "mesh"),
      (lambda: jaxgc.coded_value_and_grad(loss_fn, proto, STRAGGLER), "mesh"),
      (lambda: jaxgc.coded_value_and_grad(loss_fn, proto, STRAGGLER, parallel.make_mesh(4),
                                          num_actors=2), "num_actors"),
      (lambda: jaxgc.coded_value_and_grad(loss_fn, proto, STRAGGLER, backend="mpi"), "backend"),
      (lambda: jaxgc.coded_value_and_grad(loss_fn, proto, STRAGGLER, backend="ray",
                                          batch_axis_name="batch"), "batch_axis_name"),
      (lambda: RayStep(proto, STRAGGLER, loss_fn, None, pool=pool, adaptive=adaptive.AdaptivePS(
          protocol(2).__class__(assignments.cyclic(M + 1, LOAD), 1))), "adaptive"),
      (lambda: RayStep(proto, STRAGGLER, loss_fn, None, pool=pool, model=0), "model"),
      (lambda: RayStep(proto, STRAGGLER, loss_fn, None, pool=pool, model=2), "model"),
  ]
  for make, param in cases:
    with pytest.raises(ParamError) as e:
      make()
    assert e.value.param == param and "\n" not in str(e.value), str(e.value)
  # A model state without has_aux: named before any actor runs.
  step = RayStep(proto, STRAGGLER, loss_fn, optax.sgd(0.1), pool=pool)
  state = step.init_state(params, jax.random.key(0), model_state=model_state)
  with pytest.raises(ParamError, match="has_aux=True") as e:
    step.update(state, batches[0], jax.random.key(0))
  assert e.value.param == "has_aux"

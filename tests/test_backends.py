"""jaxgc.backends: the declared step interface, the registry, and the code both steps share."""
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgc import assignments, backends, parallel, protocols, timing
from jaxgc.errors import ParamError
from tests.helpers import digits_mlp, host_batches, local_ray_pool

M, LOAD, BATCH = 4, 3, 32
KEY = jax.random.key(11)


@pytest.fixture(scope="module")
def setup():
  ds, _, params, loss_fn, _ = digits_mlp((8,), BATCH)
  chunks = host_batches(ds, M, BATCH, 2)
  proto = protocols.get_protocol("partial_straggler", assignments.cyclic(M, LOAD), 1)
  # With memory: its initial state comes from the shared init key, so a wrong key shows.
  straggler = timing.GilbertElliott(timing.ShiftedExponential(1.0, 1.0), p_slow=0.3,
                                    p_recover=0.3, factor=4.0)
  return params, loss_fn, chunks, proto, straggler


def spmd_step(setup, tx=None, **kw):
  _, loss_fn, _, proto, straggler = setup
  tx = optax.sgd(0.1) if tx is None else tx
  return backends.get_backend("spmd")(proto, straggler, loss_fn, tx, parallel.make_mesh(1), **kw)


# -- the registry ------------------------------------------------------------------------

def test_registry_lists_both_backends_and_rejects_an_unknown_name():
  assert backends.BACKENDS.names() == ["ray", "spmd"]
  with pytest.raises(ValueError, match=r"unknown backend 'tpu'.*\['ray', 'spmd'\]") as e:
    backends.get_backend("tpu")
  assert isinstance(e.value, ParamError) and e.value.param == "name"


def test_spmd_step_is_a_step_backend(setup):
  step = spmd_step(setup)
  assert isinstance(step, backends.StepBackend) and isinstance(step, parallel.CodedStep)
  assert step.traced and isinstance(step.layout, parallel.WorkerLayout)
  step.close()          # a no-op: the step still runs
  g, _ = jax.jit(step.gradient)(setup[0], setup[2][0], KEY)
  assert jax.tree.structure(g) == jax.tree.structure(setup[0])


def test_jaxgc_parallel_is_a_facade_over_the_spmd_backends_objects():
  import importlib

  from jaxgc.backends import spmd
  assert set(parallel.__all__) <= set(spmd.__all__) | {"TrainState"}
  assert all(getattr(parallel, n) is getattr(spmd, n) for n in parallel.__all__)
  assert parallel.TrainState is backends.TrainState
  for sub in ("step", "devices", "layout", "sharding", "chunk_fn", "value_and_grad"):
    with pytest.raises(ModuleNotFoundError):     # one path per name: the shims are gone
      importlib.import_module(f"jaxgc.parallel.{sub}")


class _OnlySampleStep:
  """A model with memory that implements sample_step only."""
  stateful = True

  def sample_step(self, key, state, assignment):
    raise NotImplementedError


def test_check_straggler_accepts_models_and_refuses_other_objects():
  backends.check_straggler(timing.ShiftedExponential(1.0, 1.0))
  backends.check_straggler(timing.GilbertElliott())
  backends.check_straggler(_OnlySampleStep())
  assert isinstance(timing.Slowdown(), timing.StragglerModel)
  for bad in ("slowdown", object(), type("Stateful", (), {"stateful": True})()):
    with pytest.raises(ValueError, match="straggler must be a straggler model"):
      backends.check_straggler(bad)

def test_both_backends_refuse_bad_arguments_alike(setup):
  _, loss_fn, _, proto, straggler = setup
  for kw, word in ((dict(mode="fast"), "unknown mode"), (dict(mode="deadline"), "deadline"),
                   (dict(timeout=-1.0), "timeout"), (dict(nan_message_prob=1.5), "nan_message")):
    with pytest.raises(ValueError, match=word):
      backends.check_step_args(proto, kw.get("mode", "exact"), kw.get("deadline"),
                               kw.get("timeout"), 0.0, kw.get("nan_message_prob", 0.0))
    with pytest.raises(ValueError, match=word):
      spmd_step(setup, **kw)
    with pytest.raises(ValueError, match=word):     # before any actor starts
      backends.get_backend("ray")(proto, straggler, loss_fn, optax.sgd(0.1), **kw)
  # A straggler model given by name is refused when the step is built, by both.
  for build in (backends.get_backend("spmd"), backends.get_backend("ray")):
    with pytest.raises(ValueError, match="straggler must be a straggler model"):
      build(proto, "slowdown", loss_fn, optax.sgd(0.1), parallel.make_mesh(1))


# -- the shared update -------------------------------------------------------------------

def test_the_shared_update_skips_non_finite_updates_eagerly_and_traced():
  params = {"w": jnp.arange(3.0)}
  tx = optax.adam(0.1)
  opt = tx.init(params)
  for g, finite in (({"w": jnp.ones(3)}, True), ({"w": jnp.array([1.0, jnp.nan, 0.0])}, False)):
    new_p, new_o, ok = backends.optimizer_update(tx, g, opt, params)
    assert bool(ok) == finite
    eager = backends.keep_if(not bool(ok), (params, opt), (new_p, new_o))
    traced = jax.jit(lambda s, new: backends.keep_if(s, (params, opt), new))(~ok, (new_p, new_o))
    want = (new_p, new_o) if finite else (params, opt)
    for tree in (eager, traced):
      jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                   tree, want)


def test_spmd_step_skips_a_non_finite_update(setup):
  params, _, chunks, _, _ = setup
  step = spmd_step(setup, tx=optax.chain(optax.sgd(0.1), optax.scale(float("nan"))))
  state, metrics = jax.jit(step.update)(step.init_state(params, KEY), chunks[0], KEY)
  assert bool(metrics["skipped"]) and int(state.num_skipped) == 1 and int(state.step) == 1
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               state.params, params)


# -- the Ray step, against the SPMD step --------------------------------------------------

@pytest.fixture(scope="module")
def pool():
  pytest.importorskip("ray")
  with local_ray_pool(num_cpus=2, num_actors=1) as p:
    yield p


def test_ray_step_is_a_step_backend_and_draws_what_the_spmd_step_draws(pool, setup):
  params, loss_fn, chunks, proto, straggler = setup
  faults = dict(message_loss_prob=0.3, nan_message_prob=0.3)
  ray_step = backends.get_backend("ray")(proto, straggler, loss_fn, optax.sgd(0.1), pool=pool,
                                         time_scale=0.001, **faults)
  assert isinstance(ray_step, backends.StepBackend) and not ray_step.traced
  assert ray_step.layout is None and ray_step.placement(params) is None
  spmd = spmd_step(setup, **faults)
  state = ray_step.init_state(params, KEY)
  s_state = None
  for c in chunks:
    step = int(state.step)
    plan, s_state, _ = spmd.plan_step(KEY, step, s_state)
    state, _ = ray_step.update(state, c, KEY)
    rec = ray_step.last_record
    # The same durations (their stop and state), faults and straggler state, bit for bit.
    assert rec["sim_stop"] == float(plan.stop)
    np.testing.assert_array_equal(np.asarray(timing.progress(rec["durations"], plan.stop)),
                                  np.asarray(plan.counts))
    np.testing.assert_array_equal(rec["lost"], np.asarray(plan.lost[:M]))
    np.testing.assert_array_equal(rec["corrupt"], np.asarray(plan.corrupt[:M]))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 state.straggler_state, s_state)
  ray_step.close()


def test_ray_step_skips_a_non_finite_update(pool, setup):
  params, loss_fn, chunks, proto, straggler = setup
  tx = optax.chain(optax.sgd(0.1), optax.scale(float("nan")))
  ray_step = backends.get_backend("ray")(proto, straggler, loss_fn, tx, pool=pool,
                                         time_scale=0.001)
  state, metrics = ray_step.update(ray_step.init_state(params, KEY), chunks[0], KEY)
  assert metrics["skipped"] and int(state.num_skipped) == 1 and int(state.step) == 1
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               state.params, params)
  ray_step.close()


# Without Ray: every import works (the old names too); building a pool asks for Ray.
NO_RAY = """
import sys
sys.modules["ray"] = None          # what `import ray` sees where Ray is not installed
import jaxgc.ray_backend, jaxgc.ray_faults
from jaxgc.backends.ray import KillLoop, RayStep, WorkerPool
assert jaxgc.ray_backend.RayStep is RayStep and jaxgc.ray_faults.KillLoop is KillLoop
try:
  WorkerPool(1)
except ValueError as err:
  print(err)
"""


def test_the_ray_backend_imports_without_ray_and_asks_for_it_when_a_pool_is_built():
  root = str(pathlib.Path(__file__).resolve().parents[1])
  env = dict(os.environ, PYTHONPATH=root)
  out = subprocess.run([sys.executable, "-c", NO_RAY], cwd=root, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "the Ray backend needs Ray: pip install 'jaxgc[ray]'"

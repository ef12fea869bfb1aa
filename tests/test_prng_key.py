"""A key that is not one PRNG key is refused naming `key` (issue #27.5), eagerly and under
jit, by coded_value_and_grad and by CodedStep.update; both kinds of real key give the exact
coded gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxgc
from jaxgc.errors import ParamError

PROTOCOL = jaxgc.PartialStraggler(jaxgc.assignments.cyclic(4, 2), ell=1)
STRAGGLER = jaxgc.timing.ShiftedExponential(1.0, 1.0)
LOSS = lambda p, chunk: 0.5 * jnp.sum((chunk["x"] @ p["w"] - chunk["y"]) ** 2)


@pytest.fixture(scope="module")
def grad_fn():
  return jaxgc.coded_value_and_grad(LOSS, PROTOCOL, STRAGGLER, jaxgc.parallel.make_mesh(4))


CHUNKS = {"x": jnp.arange(24.0).reshape(4, 2, 3) / 10, "y": jnp.arange(8.0).reshape(4, 2)}
PARAMS = {"w": jnp.array([0.5, -1.0, 2.0])}


BAD_KEYS = pytest.mark.parametrize("key, got", [
    (0, r"got (int 0|an array int32\[\])"),     # (under jit, an int32 tracer)
    (np.int32(3), r"got an array int32\[\]"),
    (jnp.zeros((2,), jnp.float32), r"got an array float32\[2\]"),
    (jnp.zeros((3,), jnp.uint32), r"got an array uint32\[3\]"),
    (jax.random.split(jax.random.key(0), 3), r"got 3 keys"),
    ("seed", r"got str 'seed'"),
])


def refused_naming_key(fn, args, key, got):
  """``fn(*args, key)`` raises the one-line ParamError naming ``key``, eagerly and jitted."""
  for f in (fn, jax.jit(fn)):
    if isinstance(key, str) and f is not fn:
      continue                               # (jit refuses a string argument itself)
    with pytest.raises(ParamError, match=r"^key must be one PRNG key, e.g. jax.random.key\(0\) "
                       r"or jax.random.PRNGKey\(0\).*" + got) as e:
      f(*args, key)
    assert e.value.param == "key"


@BAD_KEYS
def test_a_key_that_is_not_one_prng_key_is_refused_naming_key(grad_fn, key, got):
  refused_naming_key(grad_fn, (PARAMS, CHUNKS), key, got)


@pytest.fixture(scope="module")
def step():
  step = jaxgc.make_coded_step(PROTOCOL, STRAGGLER, LOSS, optax.sgd(0.1),
                               jaxgc.parallel.make_mesh(4))
  return step, step.init_state(PARAMS, jax.random.key(0))


@BAD_KEYS
def test_coded_step_update_refuses_a_key_that_is_not_one_prng_key(step, key, got):
  """The base key of CodedStep.update (step s draws from fold_in(key, s)): JAX's own error
  for an integer there named no argument."""
  step, state = step
  refused_naming_key(step.update, (state, CHUNKS), key, got)


def test_typed_and_raw_keys_give_the_exact_gradient(grad_fn):
  direct = sum(jax.grad(lambda p, i=i: 0.5 * jnp.sum(
      (CHUNKS["x"][i] @ p["w"] - CHUNKS["y"][i]) ** 2))(PARAMS)["w"] for i in range(4))
  _, grads, info = jax.jit(grad_fn)(PARAMS, CHUNKS, jax.random.key(7))
  assert bool(info["exact"])
  np.testing.assert_allclose(grads["w"], direct, rtol=1e-5)
  # Raw key data is a key too (traced only: the same program).
  _, grads, _ = jax.eval_shape(grad_fn, PARAMS, CHUNKS, jax.random.PRNGKey(7))
  assert grads["w"].shape == (3,)


def test_coded_step_update_with_a_real_key_moves_by_the_exact_gradient(step):
  """Both kinds of key pass update's check; SGD(0.1) moves by exactly -0.1 Σ_i g_i."""
  step, state = step
  direct = sum(jax.grad(lambda p, i=i: LOSS(p, {k: v[i] for k, v in CHUNKS.items()}))(PARAMS)["w"]
               for i in range(4))
  new, metrics = step.jit()(state, CHUNKS, jax.random.key(5))
  assert bool(metrics["exact"])
  np.testing.assert_allclose(new.params["w"], PARAMS["w"] - 0.1 * direct, rtol=1e-5)
  new, _ = jax.eval_shape(step.update, state, CHUNKS, jax.random.PRNGKey(5))
  assert new.params["w"].shape == (3,)

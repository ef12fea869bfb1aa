"""A key that is not one PRNG key is refused naming `key` (issue #27.5), eagerly and under
jit; both kinds of real key give the exact coded gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgc
from jaxgc.errors import ParamError


@pytest.fixture(scope="module")
def grad_fn():
  protocol = jaxgc.PartialStraggler(jaxgc.assignments.cyclic(4, 2), ell=1)
  straggler = jaxgc.timing.ShiftedExponential(1.0, 1.0)
  loss = lambda p, chunk: 0.5 * jnp.sum((chunk["x"] @ p["w"] - chunk["y"]) ** 2)
  return jaxgc.coded_value_and_grad(loss, protocol, straggler, jaxgc.parallel.make_mesh(4))


CHUNKS = {"x": jnp.arange(24.0).reshape(4, 2, 3) / 10, "y": jnp.arange(8.0).reshape(4, 2)}
PARAMS = {"w": jnp.array([0.5, -1.0, 2.0])}


@pytest.mark.parametrize("key, got", [
    (0, r"got (int 0|an array int32\[\])"),     # (under jit, an int32 tracer)
    (np.int32(3), r"got an array int32\[\]"),
    (jnp.zeros((2,), jnp.float32), r"got an array float32\[2\]"),
    (jnp.zeros((3,), jnp.uint32), r"got an array uint32\[3\]"),
    (jax.random.split(jax.random.key(0), 3), r"got 3 keys"),
    ("seed", r"got str 'seed'"),
])
def test_a_key_that_is_not_one_prng_key_is_refused_naming_key(grad_fn, key, got):
  for fn in (grad_fn, jax.jit(grad_fn)):
    if isinstance(key, str) and fn is not grad_fn:
      continue                               # (jit refuses a string argument itself)
    with pytest.raises(ParamError, match=r"^key must be one PRNG key, e.g. jax.random.key\(0\) "
                       r"or jax.random.PRNGKey\(0\).*" + got) as e:
      fn(PARAMS, CHUNKS, key)
    assert e.value.param == "key"


def test_typed_and_raw_keys_give_the_exact_gradient(grad_fn):
  direct = sum(jax.grad(lambda p, i=i: 0.5 * jnp.sum(
      (CHUNKS["x"][i] @ p["w"] - CHUNKS["y"][i]) ** 2))(PARAMS)["w"] for i in range(4))
  _, grads, info = jax.jit(grad_fn)(PARAMS, CHUNKS, jax.random.key(7))
  assert bool(info["exact"])
  np.testing.assert_allclose(grads["w"], direct, rtol=1e-5)
  # Raw key data is a key too (traced only: the same program).
  _, grads, _ = jax.eval_shape(grad_fn, PARAMS, CHUNKS, jax.random.PRNGKey(7))
  assert grads["w"].shape == (3,)

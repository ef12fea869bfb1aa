"""Your model, your loop, flax NNX: coded gradients of the ``nnx.State`` from ``nnx.split``.

Run: python examples/own_loop_nnx.py   (8 simulated CPU devices)
"""
import jax

import jaxgc

jaxgc.parallel.set_cpu_device_count(8)   # before JAX starts; a GPU/TPU host uses its devices

import jax.numpy as jnp
import optax
from flax import nnx

M, LOAD, ELL, PER_CHUNK = 16, 3, 2, 16


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden, self.out = nnx.Linear(10, 32, rngs=rngs), nnx.Linear(32, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))[:, 0]


graphdef, params = nnx.split(MLP(nnx.Rngs(0)))


def loss_fn(params, chunk, *, rng):               # rng: input noise, the same on every copy
  x = chunk["x"] + 0.05 * jax.random.normal(rng, chunk["x"].shape)
  pred = nnx.merge(graphdef, params)(x)
  return 0.5 * jnp.sum((pred - chunk["y"]) ** 2) / (M * PER_CHUNK)


x = jax.random.normal(jax.random.key(1), (M, PER_CHUNK, 10))
chunks = {"x": x, "y": jnp.sin(x.sum(-1))}

protocol = jaxgc.PartialStraggler(jaxgc.assignments.cyclic(M, LOAD), ELL)
straggler = jaxgc.timing.Slowdown(jaxgc.timing.ShiftedExponential(1.0, 1.0), 0.25, 5.0)
grad_fn = jaxgc.coded_value_and_grad(loss_fn, protocol, straggler, jaxgc.parallel.make_mesh(8))
tx = optax.adam(1e-2)
opt_state = tx.init(params)


@jax.jit
def train_step(params, opt_state, key):
  loss, grads, info = grad_fn(params, chunks, key)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss, info["exact"]


for step in range(30):
  params, opt_state, loss, exact = train_step(params, opt_state, jax.random.key(step))
  if step % 5 == 0 or step == 29:
    print(f"step {step:2d}  loss {float(loss):.4f}  exact {bool(exact)}")
model = nnx.merge(graphdef, params)   # the trained module

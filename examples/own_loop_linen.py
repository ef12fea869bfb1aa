"""Your model, your loop: a flax linen CNN with batch norm and dropout, coded gradients.

Run: python examples/own_loop_linen.py   (8 simulated CPU devices)
"""
import jax

import jaxgc

jaxgc.parallel.set_cpu_device_count(8)   # before JAX starts; a GPU/TPU host uses its devices

import flax.linen as nn
import jax.numpy as jnp
import optax

M, LOAD, ELL, PER_CHUNK = 16, 3, 2, 16            # workers = chunks, chunk load, ℓ, examples


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (3, 3))(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    x = nn.Dropout(0.2, deterministic=not train)(x.reshape(x.shape[0], -1))
    return nn.Dense(2)(x)


model = CNN()


def loss_fn(params, chunk, batch_stats, *, rng):   # rng: the chunk's key, same on every copy
  logits, new = model.apply({"params": params, "batch_stats": batch_stats}, chunk["image"],
                            train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, chunk["label"]).sum()
  return loss / (M * PER_CHUNK), new["batch_stats"]    # chunk losses sum to the batch mean


# Synthetic task: is the image's top half brighter than its bottom half?
x = jax.random.normal(jax.random.key(0), (M, PER_CHUNK, 8, 8, 1))
chunks = {"image": x, "label": (x[:, :, :4].mean((2, 3, 4)) > x[:, :, 4:].mean((2, 3, 4)))
          .astype(jnp.int32)}
variables = model.init(jax.random.key(1), x[0])
params, batch_stats = variables["params"], variables["batch_stats"]

protocol = jaxgc.PartialStraggler(jaxgc.assignments.cyclic(M, LOAD), ELL)
straggler = jaxgc.timing.Slowdown(jaxgc.timing.ShiftedExponential(1.0, 1.0), 0.25, 5.0)
grad_fn = jaxgc.coded_value_and_grad(loss_fn, protocol, straggler, jaxgc.parallel.make_mesh(8),
                                     has_aux=True)
tx = optax.adam(1e-2)
opt_state = tx.init(params)


@jax.jit
def train_step(params, batch_stats, opt_state, key):
  (loss, chunk_stats), grads, info = grad_fn(params, chunks, key, batch_stats)
  updates, opt_state = tx.update(grads, opt_state, params)
  batch_stats = jax.tree.map(lambda s: s.mean(0), chunk_stats)   # ghost BN: mean over chunks
  return optax.apply_updates(params, updates), batch_stats, opt_state, loss, info["exact"]


for step in range(30):
  params, batch_stats, opt_state, loss, exact = train_step(
      params, batch_stats, opt_state, jax.random.key(step))
  if step % 5 == 0 or step == 29:
    print(f"step {step:2d}  loss {float(loss):.4f}  exact {bool(exact)}")

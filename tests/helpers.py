"""Small test helpers (no chex: plain tree asserts)."""
import contextlib

import jax
import numpy as np

import jaxgc


def assert_trees_allclose(a, b, rtol=1e-6, atol=1e-6):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb, f"tree structures differ: {ta} vs {tb}"
  for x, y in zip(la, lb, strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def assert_tree_all_finite(tree):
  for x in jax.tree_util.tree_leaves(tree):
    assert np.isfinite(np.asarray(x)).all(), "non-finite value in tree"


def random_lists(rng, m, n_chunks, min_rep=1, max_load=None):
  """Random non-regular ordered lists where every chunk is held by >= min_rep workers."""
  max_load = max_load or n_chunks
  lists = [[] for _ in range(m)]
  for i in range(n_chunks):
    for j in rng.choice(m, size=min(m, min_rep), replace=False):
      lists[j].append(i)
  for j in range(m):
    extra = rng.integers(0, max(1, max_load - len(lists[j])) + 1)
    pool = [i for i in range(n_chunks) if i not in lists[j]]
    lists[j] += list(rng.choice(pool, size=min(extra, len(pool)), replace=False)) if pool else []
    rng.shuffle(lists[j])
  lists = [[int(c) for c in lst] or [int(rng.integers(n_chunks))] for lst in lists]
  return jaxgc.assignments.from_lists(lists, n_chunks)


def host_batches(ds, num_chunks, batch_size, steps):
  """``steps`` consecutive training batches as host chunks ``(x [N, b/N, ...], y [N, b/N])``:
  plain slicing, nothing to compile (what the Ray PS takes)."""
  per = batch_size // num_chunks
  return [(ds.x_train[s * batch_size:(s + 1) * batch_size].reshape(num_chunks, per, -1),
           ds.y_train[s * batch_size:(s + 1) * batch_size].reshape(num_chunks, per))
          for s in range(steps)]


def digits_mlp(hidden, batch_size, seed=0):
  """``(dataset, model, params, chunk loss_fn, train_data)`` for a small MLP on digits."""
  import jax.numpy as jnp

  from jaxgc import data, models
  ds = data.load("digits")
  model = models.get_model("mlp", ds.num_classes, hidden)
  params = models.init_params(model, jax.random.key(seed), ds.x_train[:1])
  loss_fn = models.chunk_loss_fn(model.apply, batch_size)
  return ds, model, params, loss_fn, (jnp.asarray(ds.x_train), jnp.asarray(ds.y_train))


@contextlib.contextmanager
def local_ray_pool(num_cpus: int, num_actors: int):
  """A local Ray instance with a :class:`jaxgc.backends.ray.WorkerPool`, always shut down."""
  import ray

  from jaxgc.backends.ray import WorkerPool
  ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, configure_logging=False,
           log_to_driver=False)
  try:
    with WorkerPool(num_actors) as pool:
      yield pool
  finally:
    ray.shutdown()

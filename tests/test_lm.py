"""The transformer LM on the stdlib corpus: data, chunk loss, coded exactness, bad input."""
import functools
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgc import assignments, data, models, parallel, protocols, timing

M, LOAD, ELL, BATCH, SEQ = 8, 3, 2, 16, 16     # 2 sequences of 16 bytes per chunk


@functools.lru_cache(maxsize=None)
def setup():
  ds = data.load("pystdlib", seq_len=SEQ, max_bytes=60_000, test_fraction=0.1)
  model = models.get_model("transformer_lm", ds.num_classes, d_model=32, num_heads=2,
                           num_layers=1, seq_len=SEQ)
  params = jax.jit(model.init)(jax.random.key(0), ds.x_train[:1])["params"]
  return ds, model, params, models.chunk_loss_fn(model.apply, BATCH)


def test_corpus_is_the_stdlib_source_in_sorted_order():
  ds, _, _, _ = setup()
  text = data.stdlib_corpus(60_000)
  assert text.shape == (60_000,) and text.dtype == np.uint8
  np.testing.assert_array_equal(text, data.stdlib_corpus(60_000))     # deterministic
  # It starts with the first .py file of a sorted walk of the stdlib directory.
  root = sysconfig.get_paths()["stdlib"]
  import os  # pylint: disable=import-outside-toplevel
  first = sorted(f for f in os.listdir(root) if f.endswith(".py"))[0]
  with open(os.path.join(root, first), "rb") as f:
    head = f.read()[:1000]
  assert bytes(text[: len(head)]) == head
  # Windows: y is x shifted by one byte; validation is the tail; nothing overlaps.
  n_train, n_test = len(ds.x_train), len(ds.x_test)
  assert ds.x_train.shape == (n_train, SEQ) and ds.num_classes == 256
  np.testing.assert_array_equal(ds.x_train.reshape(-1), text[: n_train * SEQ])
  np.testing.assert_array_equal(ds.y_train.reshape(-1), text[1: n_train * SEQ + 1])
  np.testing.assert_array_equal(ds.x_test.reshape(-1), text[n_train * SEQ:(n_train + n_test) * SEQ])
  assert n_test == round(0.1 * (n_train + n_test))


def test_chunk_losses_sum_to_the_batch_mean_token_loss():
  ds, model, params, loss_fn = setup()
  x, y = jnp.asarray(ds.x_train[:BATCH]), jnp.asarray(ds.y_train[:BATCH])

  @jax.jit
  def losses(params):
    logits = model.apply({"params": params}, x)
    want = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    chunks = (x.reshape(M, -1, SEQ), y.reshape(M, -1, SEQ))
    got = jnp.sum(jax.vmap(loss_fn, (None, 0))(params, chunks))
    return want, got, models.predict_metrics(model.apply, params, x, y)

  want, got, ev = losses(params)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  np.testing.assert_allclose(float(ev["test_loss"]), float(want), rtol=1e-5)
  np.testing.assert_allclose(float(ev["test_perplexity"]), np.exp(float(want)), rtol=1e-5)


def test_causal():
  """Changing byte t changes no logit before t."""
  ds, model, params, _ = setup()
  x = jnp.asarray(ds.x_train[:2])
  y = x.at[:, 9].set((x[:, 9] + 1) % 256)
  apply = jax.jit(model.apply)
  a, b = apply({"params": params}, x), apply({"params": params}, y)
  np.testing.assert_array_equal(np.asarray(a[:, :9]), np.asarray(b[:, :9]))
  assert not np.allclose(np.asarray(a[:, 9:]), np.asarray(b[:, 9:]))


def test_coded_lm_equals_uncoded_step_by_step_and_full_batch_gradient():
  """Exact-mode partial_straggler: its first SGD step moves the parameters by the
  full-batch gradient, and its losses equal uncoded training's step by step
  (same keys, same chunks)."""
  ds, _, params, loss_fn = setup()
  mesh = parallel.make_mesh(8)
  asg = assignments.cyclic(M, LOAD)
  lr = 0.5
  train = (jnp.asarray(ds.x_train), jnp.asarray(ds.y_train))
  data_key, key = jax.random.key(1), jax.random.key(2)
  chunks = [data.step_chunks(train, data_key, s, BATCH, M) for s in range(3)]
  flat = lambda t: jax.flatten_util.ravel_pytree(t)[0]
  losses = {}
  for name, ell in (("partial_straggler", ELL), ("uncoded", 1)):
    step = parallel.make_coded_step(protocols.get_protocol(name, asg, ell),
                                    timing.get_model("slowdown"), loss_fn, optax.sgd(lr), mesh)
    state, update = jax.jit(step.init_state)(params, key), step.jit()
    losses[name] = []
    for s, c in enumerate(chunks):
      new, metrics = update(state, c, key)
      assert bool(metrics["exact"])
      losses[name].append(float(metrics["loss"]))
      if s == 0 and name == "partial_straggler":
        total = lambda p, c=c: jnp.sum(jax.vmap(loss_fn, (None, 0))(p, c))
        want = flat(jax.jit(jax.grad(total))(params))
        got = (flat(params) - flat(new.params)) / lr
        assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-4
      state = new
  np.testing.assert_allclose(losses["partial_straggler"], losses["uncoded"], rtol=1e-5)
  assert losses["uncoded"][-1] < losses["uncoded"][0]


def test_bad_input_names_the_setting_and_the_fix():
  _, model, params, loss_fn = setup()
  with pytest.raises(ValueError, match=r"batch_size=20 sequences of seq_len=16 is not a multiple"
                                       r".*--config.batch_size=16"):
    data.check_chunking(20, 8, seq_len=16)
  with pytest.raises(ValueError, match="seq_len=16.*--config.seq_len"):
    model.apply({"params": params}, jnp.zeros((1, 32), jnp.int32))
  with pytest.raises(ValueError, match="d_model=30 is not a multiple of num_heads=4"):
    models.get_model("transformer_lm", 256, d_model=30, num_heads=4)
  with pytest.raises(ValueError, match="lower --config.seq_len or raise --config.corpus_bytes"):
    data.load("pystdlib", seq_len=64, max_bytes=64)
  chunk = (jax.ShapeDtypeStruct((2, SEQ), jnp.int32), jax.ShapeDtypeStruct((2, SEQ), jnp.int32))
  est = models.memory_estimate(loss_fn, params, chunk, load=4)
  p = sum(x.size * 4 for x in jax.tree.leaves(params))
  assert est.params == p and est.chunk_gradients == 4 * p and est.optimizer == 2 * p
  assert est.activations > 0 and est.inputs == 4 * 2 * 2 * SEQ * 4
  models.check_memory(est, est.total, load=4)              # fits exactly: no error
  with pytest.raises(ValueError, match=r"too large for load=4: estimated .* GiB per device "
                                       r"\(params .*\) exceeds the memory budget.*--config.load"):
    models.check_memory(est, est.total - 1, load=4)

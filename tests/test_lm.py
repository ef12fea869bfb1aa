"""The transformer LM on the stdlib corpus: data, chunk loss, coded exactness, bad input."""
import functools
import json
import os
import sys
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgc import assignments, data, experiment, models, parallel, protocols, timing
from tests import warm

M, LOAD, ELL, BATCH, SEQ = 8, 3, 2, 16, 16     # 2 sequences of 16 bytes per chunk


@functools.cache
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
  # The loop evaluates in batches (3 of 5 sequences and 1 left over): the same numbers.
  batched = experiment.evaluate(model.apply, params, (x, y), batch_size=5)
  assert batched.keys() == ev.keys()
  for k, v in batched.items():
    np.testing.assert_allclose(v, float(ev[k]), rtol=1e-5, err_msg=k)


def test_causal():
  """Changing byte t changes no logit before t."""
  ds, model, params, _ = setup()
  x = jnp.asarray(ds.x_train[:2])
  y = x.at[:, 9].set((x[:, 9] + 1) % 256)
  apply = jax.jit(model.apply)
  a, b = apply({"params": params}, x), apply({"params": params}, y)
  np.testing.assert_array_equal(np.asarray(a[:, :9]), np.asarray(b[:, :9]))
  assert not np.allclose(np.asarray(a[:, 9:]), np.asarray(b[:, 9:]))


def test_coded_lm_gradient_equals_full_batch_gradient():
  """Exact-mode partial_straggler (ℓ = 2) on the sharded step decodes the LM's
  full-batch gradient, with 20% of the workers 5x slower."""
  ds, _, params, loss_fn = setup()
  proto = protocols.get_protocol("partial_straggler", assignments.cyclic(M, LOAD), ELL)
  step = parallel.make_coded_step(proto, timing.get_straggler_model("slowdown"), loss_fn,
                                  optax.sgd(0.1), parallel.make_mesh(8))
  train = (jnp.asarray(ds.x_train), jnp.asarray(ds.y_train))
  chunks = data.step_chunks(train, jax.random.key(1), 0, BATCH, M)
  got, metrics = jax.jit(step.gradient)(params, chunks, jax.random.key(2))
  total = lambda p: jnp.sum(jax.vmap(loss_fn, (None, 0))(p, chunks))
  want = jax.jit(jax.grad(total))(params)
  flat = lambda t: jax.flatten_util.ravel_pytree(t)[0]
  assert bool(metrics["exact"])
  err = jnp.linalg.norm(flat(got) - flat(want)) / jnp.linalg.norm(flat(want))
  assert float(err) < 1e-4, float(err)


def test_train_py_lm_coded_equals_uncoded_and_logs_perplexity(tmp_path):
  """``train.py --config=configs/lm.py``: exact-mode partial_straggler's losses equal
  uncoded training's step by step (same seed: same chunks), the loss falls, and
  evaluation logs validation loss, next-byte accuracy and perplexity."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = root
  flags = ["--config.num_steps=4", "--config.eval_every=4", "--config.checkpoint_every=0",
           "--config.mode=exact", "--config.seed=3", "--config.corpus_bytes=200000",
           "--config.num_layers=1"]
  out = warm.run([sys.executable, os.path.join(root, "train.py"),
                        f"--config={os.path.join(root, 'configs', 'lm.py')}",
                        f"--workdir={tmp_path}", "--compare=partial_straggler,uncoded", *flags],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  losses, evals = {}, {}
  for name in ("partial_straggler", "uncoded"):
    rows = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
    losses[name] = [r["loss"] for r in rows if "loss" in r]
    evals[name] = [r for r in rows if "test_loss" in r]
  assert len(losses["uncoded"]) == 4
  np.testing.assert_allclose(losses["partial_straggler"], losses["uncoded"], rtol=1e-5)
  assert losses["uncoded"][-1] < losses["uncoded"][0] - 0.5
  for ev in evals["partial_straggler"]:
    np.testing.assert_allclose(ev["test_perplexity"], np.exp(ev["test_loss"]), rtol=1e-5)
    assert 0.0 <= ev["test_accuracy"] <= 1.0
  assert [ev["step"] for ev in evals["partial_straggler"]] == [0, 4]
  assert evals["partial_straggler"][-1]["test_loss"] < evals["partial_straggler"][0]["test_loss"]
  assert (tmp_path / "accuracy_vs_time.png").exists()


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

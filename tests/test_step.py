"""The coded shard_map step: exactness, faults, layout, and the check_vma decoder."""
import functools
from typing import NamedTuple

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import digits_mlp
from jax.sharding import PartitionSpec as P

from jaxgc import assignments, data, models, parallel, protocols, timing
from jaxgc.backends.spmd import collectives

M, LOAD, BATCH = 20, 4, 160


@pytest.fixture(scope="module")
def setup():
  assert len(jax.devices()) >= 8, "conftest must give 8 CPU devices"
  mesh = parallel.make_mesh(8)
  ds, model, params, loss_fn, train_data = digits_mlp((32,), BATCH)
  return mesh, train_data, model, params, loss_fn


def full_grad(loss_fn, params, chunks):
  """jax.grad of the whole batch's loss (the sum of the chunk losses)."""
  total = lambda p: jnp.sum(jax.vmap(lambda c: loss_fn(p, c))(chunks))
  return jax.grad(total)(params)


def rel_err(a, b):
  a, b = (jax.flatten_util.ravel_pytree(t)[0] for t in (a, b))
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("name,ell,tol", [
    ("partial_straggler", 1, 1e-5),
    ("partial_straggler", 2, 1e-5),
    ("uncoded", 1, 1e-6),
])
def test_exact_mode_equals_full_batch_gradient_every_step(setup, name, ell, tol):
  mesh, train_data, _, params, loss_fn = setup
  proto = protocols.get_protocol(name, assignments.cyclic(M, LOAD), ell)
  coded = parallel.make_coded_step(proto, timing.get_model("slowdown"), loss_fn,
                                   optax.sgd(0.5), mesh)
  grad_fn = jax.jit(coded.gradient)
  data_key = jax.random.key(1)
  for s in range(4):
    chunks = data.step_chunks(train_data, data_key, s, BATCH, M)
    g, metrics = grad_fn(params, chunks, jax.random.key(100 + s))
    want = full_grad(loss_fn, params, chunks)
    assert rel_err(g, want) < tol, (s, rel_err(g, want))
    assert bool(metrics["exact"]) and bool(metrics["decodable"])
    assert not bool(metrics["skipped"]) and int(metrics["erasures"]) == 0
    assert int(metrics["min_coverage"]) >= proto.ell
    assert np.isfinite(float(metrics["step_sim_time"]))
    params = jax.tree.map(lambda p, d: p - 0.5 * d, params, want)


@pytest.mark.parametrize("name,ell,mode", [
    ("original", 1, "exact"), ("original", 2, "exact"), ("original", 2, "deadline"),
    ("ignore_stragglers", 1, "deadline"), ("partial_straggler", 3, "deadline"),
])
def test_sharded_step_matches_reference_encode_decode(setup, name, ell, mode):
  """Whatever the protocol's own numerical quality (the float32 original codes are
  far from exact, PROTOCOL.md §3), the sharded step reproduces its
  encode -> decode at the same state."""
  mesh, train_data, _, params, loss_fn = setup
  a = assignments.cyclic(M, LOAD)
  proto = protocols.get_protocol(name, a, ell)
  coded = parallel.make_coded_step(proto, timing.get_model("slowdown"), loss_fn,
                                   optax.sgd(0.5), mesh, mode=mode,
                                   deadline=7.0 if mode == "deadline" else None)
  chunks = data.step_chunks(train_data, jax.random.key(1), 0, BATCH, M)
  g, metrics = jax.jit(coded.gradient)(params, chunks, jax.random.key(5))
  flat, _ = jax.flatten_util.ravel_pytree(params)
  per_chunk = jax.vmap(lambda c: jax.flatten_util.ravel_pytree(
      jax.grad(loss_fn)(params, c))[0])(chunks)                        # [N, d]
  slots = per_chunk[np.maximum(a.order, 0)]                            # [m, L, d]
  enc, dec = proto.coefficients(metrics["counts"])
  want = protocols.decode(protocols.encode(slots, enc), dec, flat.shape[0])
  got = jax.flatten_util.ravel_pytree(g)[0]
  scale = float(jnp.linalg.norm(want)) + 1e-12
  # Both sides evaluate one formula in float32 with different summation orders;
  # an ill-conditioned code amplifies that rounding exactly as it amplifies its
  # own error against the true sum, so that error bounds the gap too.
  tol = 1e-4
  if mode == "exact":
    tol += 2 * float(jnp.linalg.norm(want - per_chunk.sum(0))) / scale
  assert float(jnp.linalg.norm(got - want)) / scale < tol


def test_pipelined_plan_changes_nothing(setup):
  """A state with a precomputed plan steps exactly like one planning in-step."""
  mesh, train_data, _, params, loss_fn = setup
  proto = protocols.PartialStraggler(assignments.cyclic(M, LOAD), 2)
  coded = parallel.make_coded_step(proto, timing.get_model("slowdown"), loss_fn,
                                   optax.adam(1e-2), mesh, message_loss_prob=0.2)
  key, data_key = jax.random.key(7), jax.random.key(8)

  @jax.jit
  def run(state):
    for _ in range(3):
      chunks = data.step_chunks(train_data, data_key, state.step, BATCH, M)
      state, metrics = coded.update(state, chunks, key)
    return state, metrics

  fresh = parallel.TrainState.create(params, coded.tx)
  assert fresh.plan is None
  a, ma = run(coded.init_state(params, key))
  b, mb = run(fresh)
  assert isinstance(b.plan, parallel.Plan)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert float(a.sim_time) == float(b.sim_time) and int(a.num_erasures) == int(b.num_erasures)
  assert float(ma["loss"]) == float(mb["loss"])


def test_deadline_mode_heavy_faults_keeps_params_finite(setup):
  mesh, train_data, _, params, loss_fn = setup
  proto = protocols.PartialStraggler(assignments.cyclic(M, LOAD), 2)
  straggler = timing.get_model("shifted_exponential", failure_prob=0.6)
  coded = parallel.make_coded_step(proto, straggler, loss_fn, optax.adam(1e-2), mesh,
                                   mode="deadline", deadline=1.5, message_loss_prob=0.4,
                                   nan_message_prob=0.4)
  step = jax.jit(coded.update)
  state = coded.init_state(params, jax.random.key(0))
  seen = {"skipped": 0, "erasures": 0, "approx": 0}
  for s in range(12):
    chunks = data.step_chunks(train_data, jax.random.key(3), s, BATCH, M)
    state, metrics = step(state, chunks, jax.random.key(0))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    assert float(metrics["step_sim_time"]) <= 1.5
    seen["skipped"] += int(metrics["skipped"])
    seen["erasures"] += int(metrics["erasures"])
    seen["approx"] += int(not bool(metrics["exact"]))
  assert seen["erasures"] > 0 and seen["approx"] > 0
  assert int(state.num_skipped) == seen["skipped"]
  assert int(state.num_erasures) == seen["erasures"]


def test_nan_chunk_gradient_is_erased_not_applied(setup):
  """A chunk whose gradient is NaN makes its finishers' messages erasures."""
  mesh, train_data, _, params, loss_fn = setup
  proto = protocols.PartialStraggler(assignments.cyclic(M, LOAD), 1)
  coded = parallel.make_coded_step(proto, timing.ShiftedExponential(), loss_fn,
                                   optax.sgd(0.1), mesh)
  x, y = data.step_chunks(train_data, jax.random.key(3), 0, BATCH, M)
  x = x.at[5, 0, 0].set(jnp.nan)
  state = coded.init_state(params, jax.random.key(0))
  new, metrics = jax.jit(coded.update)(state, (x, y), jax.random.key(0))
  assert int(metrics["erasures"]) >= 1
  # Every finisher of chunk 5 is erased, so chunk 5 is lost: an approximation.
  assert not bool(metrics["decodable"]) and int(metrics["min_coverage"]) == 0
  assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(new.params))
  assert not bool(metrics["skipped"])
  pairs = zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params), strict=True)
  changed = any(not np.array_equal(a, b) for a, b in pairs)
  assert changed


def test_step_without_any_sender_is_skipped(setup):
  mesh, train_data, _, params, loss_fn = setup
  proto = protocols.PartialStraggler(assignments.cyclic(M, LOAD), 1)
  coded = parallel.make_coded_step(proto, timing.ShiftedExponential(shift=5.0), loss_fn,
                                   optax.sgd(0.1), mesh, mode="deadline", deadline=1.0)
  chunks = data.step_chunks(train_data, jax.random.key(3), 0, BATCH, M)
  state = coded.init_state(params, jax.random.key(0))
  new, metrics = jax.jit(coded.update)(state, chunks, jax.random.key(0))
  assert bool(metrics["skipped"]) and int(new.num_skipped) == 1 and int(new.step) == 1
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(new.sim_time) == pytest.approx(1.0)


@pytest.mark.parametrize("m,load", [(5, 2), (8, 3), (13, 3)])
def test_any_worker_count_on_eight_devices(setup, m, load):
  """Fewer, equal and more workers than devices (phantom-padded) all decode exactly."""
  mesh, train_data, _, params, _ = setup
  batch = 8 * m
  model = models.get_model("mlp", 10, (32,))
  loss_fn = models.chunk_loss_fn(model.apply, batch)
  proto = protocols.PartialStraggler(assignments.cyclic(m, load), 2)
  coded = parallel.make_coded_step(proto, timing.ShiftedExponential(), loss_fn,
                                   optax.sgd(0.1), mesh)
  chunks = data.step_chunks(train_data, jax.random.key(0), 0, batch, m)
  g, metrics = jax.jit(coded.gradient)(params, chunks, jax.random.key(1))
  assert rel_err(g, full_grad(loss_fn, params, chunks)) < 1e-5
  assert bool(metrics["exact"])


@pytest.mark.parametrize("unroll", [64, 0])   # the unrolled sum and the einsum
def test_plain_step_is_the_full_batch_gradient(setup, monkeypatch, unroll):
  monkeypatch.setattr(protocols.base, "UNROLL_LIMIT", unroll)
  mesh, train_data, _, params, loss_fn = setup
  plain = parallel.make_plain_step(assignments.cyclic(M, LOAD), loss_fn, optax.sgd(0.1), mesh)
  chunks = data.step_chunks(train_data, jax.random.key(0), 0, BATCH, M)
  g, loss = jax.jit(plain.gradient)(params, chunks)
  assert rel_err(g, full_grad(loss_fn, params, chunks)) < 1e-6
  want = jnp.sum(jax.vmap(lambda c: loss_fn(params, c))(chunks))
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)


def test_decoder_under_shard_map_with_check_vma():
  """decode_sharded == protocols.decode, and its output is device-invariant (P())."""
  mesh = parallel.make_mesh(8)
  m_pad, ell, d = 24, 3, 100
  b = protocols.base.num_blocks(d, ell)
  k1, k2 = jax.random.split(jax.random.key(0))
  msgs = jax.random.normal(k1, (m_pad, b))
  dec = jax.random.normal(k2, (ell, m_pad)).at[:, 5].set(0.0)
  msgs = msgs.at[5].set(jnp.nan)   # a non-sender's garbage must not leak in
  fn = jax.shard_map(functools.partial(parallel.decode_sharded, d=d),
                          mesh=mesh, in_specs=(P("workers"), P(None, "workers")),
                          out_specs=P(), check_vma=True)
  got = jax.jit(fn)(msgs, dec)
  want = protocols.decode(msgs, dec, d)
  assert np.isfinite(np.asarray(got)).all()
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_pvary_gives_local_gradients():
  """The PROTOCOL.md §6 pitfall: without pvary, grad w.r.t. P() params is all-reduced."""
  mesh = parallel.make_mesh(8)
  w = jnp.ones(3)
  xs = jnp.arange(8.0)[:, None] * jnp.ones((8, 3))

  def body(w, x, cast):
    wv = parallel.pvary(w, "workers") if cast else w
    g = jax.grad(lambda w: jnp.sum(w * x))(wv)[None]
    return g if cast else parallel.pvary(g, "workers")

  run = lambda cast: jax.jit(jax.shard_map(
      functools.partial(body, cast=cast), mesh=mesh, in_specs=(P(), P("workers")),
      out_specs=P("workers")))(w, xs)
  np.testing.assert_allclose(np.asarray(run(True)), np.asarray(xs))
  np.testing.assert_allclose(np.asarray(run(False)), np.broadcast_to(xs.sum(0), (8, 3)))


def test_psum_packed_roundtrip():
  mesh = parallel.make_mesh(8)
  tree = {"a": jnp.arange(3.0), "b": jnp.array([True, False]), "c": jnp.array(7, jnp.int32)}

  def body(t):
    mine = jax.lax.axis_index("workers") == 2
    t = jax.tree.map(lambda x: jnp.where(mine, x, jnp.zeros_like(x)), t)
    return collectives.psum_packed(t, "workers")

  out = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(), out_specs=P()))(tree)
  assert out["b"].dtype == jnp.bool_ and out["c"].dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(out["a"]), [0.0, 1.0, 2.0])
  np.testing.assert_array_equal(np.asarray(out["b"]), [True, False])
  assert int(out["c"]) == 7


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="deadline"), "deadline"),
    (dict(mode="deadline", deadline=-1.0), "deadline"),
    (dict(mode="eventually"), "unknown mode"),
    (dict(message_loss_prob=1.5), "message_loss_prob"),
])
def test_bad_step_arguments(setup, kwargs, match):
  mesh, _, _, _, loss_fn = setup
  proto = protocols.PartialStraggler(assignments.cyclic(M, LOAD), 1)
  with pytest.raises(ValueError, match=match):
    parallel.make_coded_step(proto, timing.ShiftedExponential(), loss_fn, optax.sgd(0.1),
                             mesh, **kwargs)


def test_ignore_stragglers_has_no_exact_mode(setup):
  mesh, _, _, _, loss_fn = setup
  proto = protocols.IgnoreStragglers(assignments.cyclic(M, LOAD))
  with pytest.raises(ValueError, match="deadline"):
    parallel.make_coded_step(proto, timing.ShiftedExponential(), loss_fn, optax.sgd(0.1),
                             mesh, mode="exact")


def test_set_cpu_device_count_fails_loudly_when_too_late():
  jax.devices()  # the backend is up (8 devices from conftest)
  parallel.set_cpu_device_count(8)       # enough: fine
  with pytest.raises(RuntimeError, match="already started"):
    parallel.set_cpu_device_count(64)
  with pytest.raises(RuntimeError, match="only 8"):
    parallel.make_mesh(64)


# -- per-worker layout, streaming encode, straggler state --------------------------

SM, SLOAD, SBATCH = 8, 4, 64      # small: one worker per device, quick to compile


@pytest.fixture(scope="module")
def small(setup):
  mesh, train_data, _, _, _ = setup
  model = models.get_model("mlp", 10, (16,))
  params = models.init_params(model, jax.random.key(0), train_data[0][:1])
  loss_fn = models.chunk_loss_fn(model.apply, SBATCH)
  chunks = data.step_chunks(train_data, jax.random.key(2), 0, SBATCH, SM)
  return mesh, params, loss_fn, chunks


@pytest.fixture(scope="module")
def lossy(small):
  """A coded step with message losses and its jitted gradient (shared: one compile)."""
  mesh, _, loss_fn, _ = small
  proto = protocols.PartialStraggler(assignments.cyclic(SM, SLOAD), 1)
  coded = parallel.make_coded_step(proto, timing.get_model("slowdown"), loss_fn,
                                   optax.sgd(0.1), mesh, message_loss_prob=0.12)
  return proto, coded, jax.jit(coded.gradient)


def test_sharded_layout_equals_replicated_path(small, lossy):
  """Per-worker input (host-built, process-local, or laid out by the step) gives
  bit-identical steps; each device holds load/m of the batch."""
  _, params, _, chunks = small
  _, coded, grad_fn = lossy
  host = jax.tree.map(np.asarray, chunks)
  sharded = coded.shard_chunks(host)
  lay = coded.layout
  local = jax.tree.map(lambda x: x[np.maximum(lay.process_chunk_ids(), 0)], host)
  from_local = lay.from_process_chunks(local)
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(from_local), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  x = jax.tree.leaves(sharded.data)[0]
  assert x.shape[:2] == (SM, SLOAD) and x.sharding.spec == P("workers")
  global_bytes = sum(np.asarray(v).nbytes for v in jax.tree.leaves(host))
  assert lay.device_bytes(sharded) * SM == global_bytes * SLOAD
  for key in (jax.random.key(0), jax.random.key(3)):
    (ga, ma), (gb, mb) = (grad_fn(params, c, key) for c in (chunks, sharded))
    for a, b in zip(jax.tree.leaves((ga, ma)), jax.tree.leaves((gb, mb)), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_layout_for_the_wrong_mesh_is_refused(small):
  mesh, params, loss_fn, chunks = small
  proto = protocols.PartialStraggler(assignments.cyclic(12, 3), 1)
  on8 = parallel.make_coded_step(proto, timing.ShiftedExponential(), loss_fn, optax.sgd(0.1),
                                 mesh)
  on4 = parallel.make_coded_step(proto, timing.ShiftedExponential(), loss_fn, optax.sgd(0.1),
                                 parallel.make_mesh(4))
  host = jax.tree.map(np.asarray, data.step_chunks(
      (np.zeros((96, 3), np.float32), np.zeros(96, np.int32)), jax.random.key(0), 0, 96, 12))
  wrong = on4.shard_chunks(host)               # [12, 3, ...] on 4 devices; on8 needs [16, 3]
  with pytest.raises(ValueError, match="another mesh.*shard_chunks"):
    on8.update(parallel.TrainState.create(params, on8.tx), wrong, jax.random.key(0))
  with pytest.raises(ValueError, match="num_chunks=12"):
    on8.shard_chunks(jax.tree.map(lambda v: v[:5], host))
  with pytest.raises(ValueError, match="process_chunk_ids"):
    on8.layout.from_process_chunks(jax.tree.map(lambda v: v[:3, None], host))
  placed = jax.device_put(host, jax.sharding.NamedSharding(parallel.make_mesh(4), P()))
  with pytest.raises(ValueError, match="another mesh"):
    on8.shard_chunks(placed)


def test_streaming_encode_under_erasures_is_exact(small, lossy):
  """Erasures re-solve and re-stream: wherever the final state is decodable the
  step equals the full-batch gradient (PlainStep), elsewhere the reference
  encode -> decode at the final state; computed_fraction counts the slots with
  nonzero coefficients."""
  mesh, params, loss_fn, chunks = small
  proto, _, grad_fn = lossy
  a = proto.assignment
  plain = parallel.make_plain_step(a, loss_fn, optax.sgd(0.1), mesh)
  want = jax.flatten_util.ravel_pytree(jax.jit(plain.gradient)(params, chunks)[0])[0]
  per_chunk = jax.vmap(lambda c: jax.flatten_util.ravel_pytree(
      jax.grad(loss_fn)(params, c))[0])(chunks)
  seen = {"exact_after_erasure": 0, "lossy": 0, "clean": 0}
  for s in range(12):
    g, met = grad_fn(params, chunks, jax.random.key(s))
    got = jax.flatten_util.ravel_pytree(g)[0]
    enc, dec = proto.coefficients(met["counts"])
    # Slots with nonzero coefficients at the final state: round 1 computed just
    # these when nothing was erased; after an erasure round 2 recomputes them.
    used = int(np.sum(np.any(np.asarray(enc) != 0, axis=-1))) / a.loads.sum()
    if int(met["erasures"]) == 0:
      seen["clean"] += 1
      assert float(met["computed_fraction"]) == pytest.approx(used)
      assert float(met["recomputed_fraction"]) == 0.0
    else:
      assert float(met["recomputed_fraction"]) == pytest.approx(used)
    if bool(met["exact"]):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
      seen["exact_after_erasure"] += int(met["erasures"]) > 0
    else:
      ref = protocols.decode(protocols.encode(per_chunk[np.maximum(a.order, 0)], enc), dec,
                             want.shape[0])
      np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-6)
      seen["lossy"] += 1
  assert seen["exact_after_erasure"] and seen["lossy"] and seen["clean"], seen


class CountingStraggler(NamedTuple):
  """Slot durations ``1 + steps drawn so far``: a model with memory across steps."""
  stateful = True

  def init_state(self, key, num_workers):
    del key, num_workers
    return {"steps": jnp.zeros((), jnp.int32)}

  def sample_step(self, key, state, assignment):
    del key
    tau = jnp.full(assignment.order.shape, 1.0 + state["steps"], jnp.float32)
    return tau, {"steps": state["steps"] + 1}


def test_stateful_straggler_advances_and_survives_checkpoint(small):
  mesh, params, loss_fn, chunks = small
  proto = protocols.PartialStraggler(assignments.cyclic(SM, SLOAD), 1)
  coded = parallel.make_coded_step(proto, CountingStraggler(), loss_fn, optax.adam(1e-2), mesh)
  update = jax.jit(coded.update)
  state = coded.init_state(params, jax.random.key(0))
  assert int(state.straggler_state["steps"]) == 1          # step 0 is planned ahead
  for s in range(3):
    state, met = update(state, chunks, jax.random.key(0))
    # Equal slot durations 1 + s: every worker's first chunk decodes, at t = 1 + s.
    assert float(met["step_sim_time"]) == 1.0 + s
    assert float(met["computed_fraction"]) == pytest.approx(1 / SLOAD)
  assert int(state.straggler_state["steps"]) == 4
  blob = flax.serialization.to_bytes(state)
  restored = flax.serialization.from_bytes(coded.init_state(params, jax.random.key(1)), blob)
  (sa, ma), (sb, mb) = (update(st, chunks, jax.random.key(0)) for st in (state, restored))
  for x, y in zip(jax.tree.leaves((sa, ma)), jax.tree.leaves((sb, mb)), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert int(sb.straggler_state["steps"]) == 5 and float(mb["step_sim_time"]) == 4.0


def test_undecodable_step_costs_the_timeout(setup):
  """Issue #12: with every worker failing, exact mode waits `timeout`, not 0."""
  mesh, _, _, _, loss_fn = setup
  proto = protocols.PartialStraggler(assignments.cyclic(SM, SLOAD), 1)
  dead = timing.get_model("shifted_exponential", failure_prob=1.0)
  plan = parallel.make_coded_step(proto, dead, loss_fn, optax.sgd(0.1), mesh,
                                  timeout=5.0).plan_step(jax.random.key(0))[0]
  assert float(plan.stop) == 5.0 and not np.asarray(plan.solve.senders).any()
  plan = parallel.make_coded_step(proto, dead, loss_fn, optax.sgd(0.1),
                                  mesh).plan_step(jax.random.key(0))[0]
  assert float(plan.stop) == 0.0       # without a timeout: the last finish, none here
  with pytest.raises(ValueError, match="timeout"):
    parallel.make_coded_step(proto, dead, loss_fn, optax.sgd(0.1), mesh, timeout=-1.0)

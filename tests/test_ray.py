"""The Ray backend against a local Ray instance: exactness, erasures, deadline, startup errors."""
import functools
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

ray = pytest.importorskip("ray")

from jaxgc import assignments, parallel, protocols, timing  # pylint: disable=wrong-import-position
from jaxgc.backends.ray import RayStep, measured_durations  # pylint: disable=wrong-import-position
from tests.helpers import digits_mlp, host_batches, local_ray_pool  # pylint: disable=wrong-import-position

M, LOAD, BATCH = 4, 3, 32


@pytest.fixture(scope="module")
def pool():
  with local_ray_pool(num_cpus=4, num_actors=2) as p:   # workers 0, 2 on actor 0; 1, 3 on 1
    yield p


@pytest.fixture(scope="module")
def setup():
  ds, _, params, loss_fn, _ = digits_mlp((8,), BATCH)
  return params, loss_fn, host_batches(ds, M, BATCH, 3)   # three steps' batches


@pytest.fixture(scope="module")
def partial():
  """partial_straggler with ell = 1, 2 on the cyclic assignment (shared: the PS compiles once)."""
  a = assignments.cyclic(M, LOAD)
  return {ell: protocols.get_protocol("partial_straggler", a, ell) for ell in (1, 2)}


@functools.partial(jax.jit, static_argnums=0)
def full_grad(loss_fn, params, chunks):
  return jax.grad(lambda p: jnp.sum(jax.vmap(lambda c: loss_fn(p, c))(chunks)))(params)


def flat(tree):
  return np.asarray(jax.flatten_util.ravel_pytree(tree)[0])


@functools.partial(jax.jit, static_argnums=0)
def chunk_grads(loss_fn, params, chunks):
  return jax.vmap(lambda c: jax.flatten_util.ravel_pytree(jax.grad(loss_fn)(params, c))[0])(chunks)


def estimate_at(proto, loss_fn, params, chunks, counts):
  """The PS's estimate at state ``counts``, from directly computed chunk gradients."""
  a = proto.assignment
  g = chunk_grads(loss_fn, params, chunks)
  slots = g[np.maximum(a.order, 0)]                                   # [m, max_load, d]
  enc, dec = jax.jit(proto.coefficients)(jnp.asarray(counts))
  sends = np.any(np.asarray(enc) != 0, axis=(1, 2))
  msgs = jnp.where(sends[:, None], protocols.encode(slots, enc), 0.0)
  return np.asarray(protocols.decode(msgs, dec, g.shape[-1]))


def trace(rows):
  """Injected durations ``[M, LOAD]`` given per worker."""
  return timing.Trace(np.asarray(rows, np.float32))


def test_exact_gradient_equals_full_batch_and_replays(pool, setup, partial):
  params, loss_fn, chunks = setup
  proto = partial[2]
  step = RayStep(proto, timing.get_model("slowdown"), loss_fn, optax.sgd(0.1), pool=pool,
                 time_scale=0.005)
  completion = jax.jit(proto.completion_time)
  for s in range(2):
    g, metrics = step.gradient(params, chunks[s], jax.random.key(3), step=s)
    np.testing.assert_allclose(flat(g), flat(full_grad(loss_fn, params, chunks[s])),
                               rtol=1e-5, atol=1e-6)
    assert metrics["exact"] and not metrics["skipped"] and metrics["erasures"] == 0
    rec = step.last_record
    # The PS stopped at the first decodable state it saw: replaying the measured
    # arrival times in the simulator gives that same moment.
    replay = float(completion(jnp.asarray(measured_durations(rec), jnp.float32)))
    np.testing.assert_allclose(replay * rec["time_scale"], rec["stop_wall"], rtol=0.05, atol=2e-3)
    # and the simulator's stop for the injected durations is what the metrics report.
    assert metrics["step_sim_time"] == pytest.approx(float(completion(rec["durations"])))


def test_exact_losses_equal_spmd_uncoded(pool, setup, partial):
  params, loss_fn, chunks = setup
  # SGD: Adam would blow float rounding on exactly-zero gradients up to full steps.
  a, tx, key = assignments.cyclic(M, LOAD), optax.sgd(0.5), jax.random.key(7)
  straggler = timing.get_model("slowdown")
  # timeout · time_scale is microseconds, far below the workers' real compute: the PS
  # still waits for it, as the simulator would (a decodable step is never cut).
  ps = RayStep(partial[2], straggler, loss_fn, tx,
               pool=pool, time_scale=0.005, timeout=1e-3)
  spmd = parallel.make_coded_step(protocols.get_protocol("uncoded", a), straggler, loss_fn, tx,
                                  parallel.make_mesh(1))
  update = ps.jit()
  spmd_update = spmd.jit()
  # Unplanned SPMD state (plan=None), placed on the mesh as the step returns it: one
  # compile instead of three, same numbers.
  on_mesh = functools.partial(jax.device_put, device=NamedSharding(spmd.mesh, P()))
  s_ray, s_spmd = ps.init_state(params, key), on_mesh(parallel.TrainState.create(params, tx))
  for c in chunks:
    s_ray, m_ray = update(s_ray, c, key)
    s_spmd, m_spmd = spmd_update(s_spmd, on_mesh(c), key)
    np.testing.assert_allclose(m_ray["loss"], float(m_spmd["loss"]), rtol=1e-5)
    assert m_ray["exact"] and m_ray["wall_time"] > 0
  np.testing.assert_allclose(flat(s_ray.params), flat(s_spmd.params), rtol=1e-4, atol=1e-5)
  assert int(s_ray.step) == 3 and int(s_ray.num_skipped) == 0


def test_deadline_stops_at_T_with_least_squares_estimate(pool, setup, partial):
  params, loss_fn, chunks = setup
  proto = partial[2]
  # Workers 0, 1 finish a chunk per simulated second; 2, 3 nothing before T.
  durations = trace([[1, 1, 1], [1, 1, 1], [50, 50, 50], [50, 50, 50]])
  step = RayStep(proto, durations, loss_fn, optax.sgd(0.1), pool=pool, mode="deadline",
                 deadline=2.5, time_scale=0.1)
  g, metrics = step.gradient(params, chunks[0], jax.random.key(0))
  rec = step.last_record
  assert 0.25 <= rec["stop_wall"] < 0.25 + 0.2
  assert metrics["step_sim_time"] == pytest.approx(2.5)
  counts = rec["counts"]
  assert counts.sum() > 0 and not bool(proto.is_decodable(counts)) and not metrics["exact"]
  # The recorded state is what had arrived by the stop ...
  np.testing.assert_array_equal(counts, np.sum(rec["finish_wall"] <= rec["stop_wall"], axis=1))
  # ... and the update is the protocol's least-squares estimate at that state.
  np.testing.assert_allclose(flat(g), estimate_at(proto, loss_fn, params, chunks[0], counts),
                             rtol=1e-5, atol=1e-6)


def test_nan_messages_are_erasures(pool, setup, partial):
  params, loss_fn, chunks = setup
  proto = partial[1]
  # A chunk whose data is NaN poisons every message that carries it: real non-finite
  # messages, erased; the PS re-solves without those workers.
  bad = jax.tree.map(lambda x: np.asarray(x).copy(), chunks[0])
  bad[0][3] = np.nan
  step = RayStep(proto, trace([[1, 1, 1]] * M), loss_fn, optax.sgd(0.1), pool=pool,
                 time_scale=0.01)
  g, metrics = step.gradient(params, bad, jax.random.key(0))
  rec = step.last_record
  assert metrics["erasures"] >= 1 and not metrics["skipped"]
  assert np.all(rec["counts"][rec["erased"]] == 0)
  assert np.isfinite(flat(g)).all()
  np.testing.assert_allclose(flat(g), estimate_at(proto, loss_fn, params, bad, rec["counts"]),
                             rtol=1e-5, atol=1e-6)
  assert metrics["exact"] == bool(proto.is_decodable(rec["counts"]))

  # Every message corrupted: nothing decodes, the step is skipped and counted, and
  # the parameters are untouched.
  step = RayStep(proto, trace([[1, 1, 1]] * M), loss_fn, optax.sgd(0.1), pool=pool,
                 time_scale=0.01, nan_message_prob=1.0)
  state = step.init_state(params, jax.random.key(0))
  state, metrics = step.update(state, chunks[0], jax.random.key(0))
  assert metrics["skipped"] and metrics["erasures"] >= 1
  assert int(state.num_skipped) == 1 and int(state.num_erasures) == metrics["erasures"]
  np.testing.assert_array_equal(flat(state.params), flat(params))


class _Warming:
  """A straggler model with memory: every chunk of step ``t`` takes ``1 + t``."""
  stateful = True

  def init_state(self, key, num_workers):
    del key, num_workers
    return jnp.zeros((), jnp.float32)

  def sample_step(self, key, state, assignment):
    del key
    shape = (assignment.num_workers, assignment.max_load)
    return jnp.full(shape, 1.0 + state, jnp.float32), state + 1


def test_stateful_straggler_model_carries_its_state(pool, setup, partial):
  params, loss_fn, chunks = setup
  step = RayStep(partial[1], _Warming(), loss_fn, optax.sgd(0.1), pool=pool, time_scale=0.002)
  state = step.init_state(params, jax.random.key(0))
  times = []
  for c in chunks[:2]:
    state, metrics = step.update(state, c, jax.random.key(0))
    times.append(metrics["step_sim_time"])
    # ell=1, cyclic: every worker's first chunk covers a different chunk.
    assert metrics["exact"]
  assert times == [1.0, 2.0]


def test_startup_errors_are_one_line(monkeypatch, setup):
  params, loss_fn, _ = setup
  proto = protocols.get_protocol("uncoded", assignments.cyclic(M, LOAD))
  t0 = time.perf_counter()
  with pytest.raises(ValueError, match="cannot reach the Ray cluster") as err:
    RayStep(proto, timing.get_model("slowdown"), loss_fn, optax.sgd(0.1), address="127.0.0.1:1")
  assert "\n" not in str(err.value) and time.perf_counter() - t0 < 10
  monkeypatch.setitem(sys.modules, "ray", None)      # what `import ray` sees without Ray
  with pytest.raises(ValueError, match=r"needs Ray: pip install 'jaxgc\[ray\]'") as err:
    RayStep(proto, timing.get_model("slowdown"), loss_fn, optax.sgd(0.1))
  assert "\n" not in str(err.value)


@pytest.mark.parametrize("ell", [1, 2])
def test_killed_actor_is_an_erasure(pool, setup, ell):
  """Actor 1 (workers 1, 3) dies mid-step after reporting a chunk each.

  Workers 0 and 2 first compute what 1 and 3 had reported, then the rest, so
  their first two chunks cover every chunk once: ell=1 still decodes exactly,
  whether or not the PS noticed the death before its stop; ell=2 cannot, and
  the PS applies the least-squares estimate of what survived.
  """
  params, loss_fn, chunks = setup
  lists = [[1, 0, 2], [1, 2, 3], [3, 2, 0], [3, 0, 1]]
  proto = protocols.get_protocol("partial_straggler", assignments.from_lists(lists), ell)
  # Ray reports a death about a second later: ell=1 stops before that (its erasures
  # show up in the message round), ell=2 runs longer and sees the actor die.
  fast = [2, 2, 2] if ell == 1 else [4, 4, 4]
  durations = trace([fast, [0.5, 50, 50], fast, [0.5, 50, 50]])
  step = RayStep(proto, durations, loss_fn, optax.sgd(0.1), pool=pool, time_scale=0.2)
  step.warmup(params, chunks[0])          # compiles, and waits out the last test's restart
  killer = threading.Timer(0.25, lambda: ray.kill(pool.actors[1], no_restart=False))
  killer.start()
  g, metrics = step.gradient(params, chunks[0], jax.random.key(0))
  killer.join()
  rec = step.last_record
  # Either way workers 1 and 3 had a counted chunk, are erased, and end with k_j = 0.
  assert metrics["erasures"] == 2 and not rec["dead"][[0, 2]].any()
  # ell=1 stops at the first decodable state; ell=2 once nothing more can arrive.
  np.testing.assert_array_equal(rec["counts"], [2, 0, 2, 0] if ell == 1 else [LOAD, 0, LOAD, 0])
  assert np.isfinite(flat(g)).all() and not metrics["skipped"]
  if ell == 1:
    assert metrics["exact"]
    np.testing.assert_allclose(flat(g), flat(full_grad(loss_fn, params, chunks[0])),
                               rtol=1e-5, atol=1e-6)
  else:
    assert not metrics["exact"] and metrics["chunks_below_ell"] == 2
    np.testing.assert_allclose(flat(g), estimate_at(proto, loss_fn, params, chunks[0],
                                                    rec["counts"]), rtol=1e-5, atol=1e-6)


def test_condition_number_and_message_sizes_are_reported(pool, setup, partial):
  params, loss_fn, chunks = setup
  proto = partial[2]
  step = RayStep(proto, trace([[1, 1, 1], [1, 1, 1], [1, 1, 1], [3, 3, 3]]), loss_fn,
                 optax.sgd(0.1), pool=pool, time_scale=0.01)
  _, metrics = step.gradient(params, chunks[0], jax.random.key(0))
  rec = step.last_record
  # The final solve's condition number, as the protocol computes it at that state.
  assert metrics["condition_number"] == pytest.approx(
      float(proto.condition_number(jnp.asarray(rec["counts"]))), rel=1e-5)
  # Each sender's message is d/ell float32 blocks, measured as it arrived.
  d = flat(params).size
  sent = rec["message_bytes"] > 0
  assert sent.sum() == metrics["senders"] > 0
  assert set(rec["message_bytes"][sent]) == {4 * protocols.base.num_blocks(d, 2)}
  assert metrics["message_bytes"] == 4 * protocols.base.num_blocks(d, 2)
  t = rec["transfer_s"][sent]
  assert np.all((t >= 0) & (t < 60)) and np.isnan(rec["transfer_s"][~sent]).all()
  assert metrics["message_transfer_s"] == pytest.approx(float(np.median(t)))
  # No condition number where the protocol has none to report.
  step = RayStep(protocols.get_protocol("uncoded", assignments.cyclic(M, LOAD)),
                 trace([[1, 1, 1]] * M), loss_fn, optax.sgd(0.1), pool=pool, time_scale=0.01)
  assert "condition_number" not in step.gradient(params, chunks[0], jax.random.key(0))[1]


def test_closed_step_keeps_its_pool_and_refuses_to_run(pool, setup, partial):
  params, loss_fn, chunks = setup
  step = RayStep(partial[1], trace([[1, 1, 1]] * M), loss_fn, optax.sgd(0.1), pool=pool)
  step.close()
  assert step.pool is pool and pool.actors       # a shared pool is not the step's to close
  with pytest.raises(ValueError, match="closed"):
    step.gradient(params, chunks[0], jax.random.key(0))


def test_fail_at_is_validated_like_the_spmd_schedule(pool, setup, partial):
  _, loss_fn, _ = setup
  for bad, match in [([(M, 0)], "worker 4 is not one of the 4 workers"),
                     ([(0, -1)], "step -1 is negative"), ([3], r"\(worker, step\) pair")]:
    with pytest.raises(ValueError, match=match):
      RayStep(partial[1], trace([[1, 1, 1]] * M), loss_fn, optax.sgd(0.1), pool=pool,
              fail_at=bad)

"""Ray workers killed for real while training: a fault schedule, a kill loop, a node removed.

Every test trains a small MLP on digits with partial_straggler (ell = 1) on the
cyclic assignment of 4 workers over 2 actors: either actor alone covers every
chunk, so a step stays exact while one actor is down, and the run must end where
failure-free SGD on the full-batch gradient ends (the reference is plain JAX).
"""
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

ray = pytest.importorskip("ray")

from jaxgc import assignments, protocols, timing  # pylint: disable=wrong-import-position
from jaxgc.backends.ray import KillLoop, RayStep, WorkerPool  # pylint: disable=wrong-import-position
from tests.helpers import digits_mlp, host_batches, local_ray_pool  # pylint: disable=wrong-import-position

M, LOAD, BATCH, LR, SCALE = 4, 3, 64, 0.5, 0.005


@pytest.fixture(scope="module")
def problem():
  ds, model, params, loss_fn, _ = digits_mlp((16,), BATCH)
  batches = host_batches(ds, M, BATCH, len(ds.x_train) // BATCH)
  proto = protocols.get_protocol("partial_straggler", assignments.cyclic(M, LOAD), 1)
  accuracy = jax.jit(lambda p: jnp.mean(
      jnp.argmax(model.apply({"params": p}, ds.x_test), -1) == ds.y_test))
  return params, loss_fn, batches, proto, accuracy


@functools.partial(jax.jit, static_argnums=0)
def _sgd_step(loss_fn, params, chunks):
  g = jax.grad(lambda p: jnp.sum(jax.vmap(lambda c: loss_fn(p, c))(chunks)))(params)
  return jax.tree.map(lambda p, gi: p - LR * gi, params, g)


def failure_free(problem, log):
  """Full-batch SGD on the batches of the steps in ``log`` that applied an update.

  What an exact coded run must reproduce: a skipped step applies nothing, so the
  reference skips that step's batch too rather than shifting every later batch."""
  params, loss_fn, batches, _, _ = problem
  for s, m in enumerate(log):
    if not m["skipped"]:
      params = _sgd_step(loss_fn, params, batches[s % len(batches)])
  return params


def train(step, problem, steps: int, until=None, max_steps: int = 1000):
  """Runs ``step`` for ``steps`` steps (more while ``until()`` is False); ``(state, metrics)``."""
  params, _, batches, _, _ = problem
  state = step.init_state(params, jax.random.key(1))
  log = []
  while len(log) < max_steps and (len(log) < steps or (until is not None and not until())):
    state, metrics = step.update(state, batches[len(log) % len(batches)], jax.random.key(1))
    log.append(metrics)
  return state, log


def check_nothing_lost(problem, state, log):
  """Every step accounted for, finite parameters, accuracy within 0.02 of failure-free.

  A skipped step (no live worker covers some chunk, exact mode) applies no update and is
  counted in ``num_skipped``; the reference is failure-free SGD on the batches of the
  steps that applied one, so the check is that what was applied was right, not how many
  steps the faults cost (the chaos benchmark measures that, in wall-clock time to accuracy)."""
  accuracy = problem[4]
  assert int(state.step) == len(log)
  assert int(state.num_skipped) == sum(m["skipped"] for m in log)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
  ref = failure_free(problem, log)
  got, want = float(accuracy(state.params)), float(accuracy(ref))
  summary = [(m["exact"], m["skipped"]) for m in log if not m["exact"] or m["skipped"]]
  assert abs(got - want) <= 0.02, (got, want, summary)
  if all(m["exact"] or m["skipped"] for m in log):   # exact steps are SGD on the full batch
    for p, r in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref), strict=True):
      np.testing.assert_allclose(p, r, rtol=1e-3, atol=1e-4)


class TestLocal:
  """Two actors on a local Ray instance."""

  @pytest.fixture(scope="class")
  def pool(self):
    with local_ray_pool(num_cpus=3, num_actors=2) as p:   # workers 0, 2 on actor 0; 1, 3 on 1
      yield p

  def test_fail_at_kills_the_actor_and_it_rejoins(self, pool, problem):
    _, loss_fn, _, proto, _ = problem
    step = RayStep(proto, timing.get_model("slowdown"), loss_fn, optax.sgd(LR), pool=pool,
                   time_scale=SCALE, fail_at=[(3, 2)])
    back = lambda: step.restarts and step.restarts[0].first_report_step is not None
    t0 = time.perf_counter()
    state, log = train(step, problem, 8, until=back)
    assert time.perf_counter() - t0 < 120
    # Worker 3 lives on actor 1, with worker 1: both are dead from step 2 on ...
    assert [m["faults_injected"] for m in log[:4]] == [0, 0, 1, 0]
    assert [m["dead_workers"] for m in log[:4]] == [0, 0, 2, 2]
    (ev,) = step.restarts
    assert (ev.actor, ev.cause, ev.down_step) == (1, "fail_at", 2)
    # ... until Ray restarted it; it gets the current parameters and reports again.
    assert log[ev.up_step]["dead_workers"] == 0 and ev.up_step < ev.first_report_step + 1
    assert 0 < ev.up_s <= ev.first_report_s
    arrived = step.records[ev.first_report_step]["finish_wall"][[1, 3]]
    assert np.isfinite(arrived).any()          # a chunk of worker 1 or 3 reached the PS
    assert all(m["exact"] for m in log) and log[-1]["dead_workers"] == 0
    check_nothing_lost(problem, state, log)

  def test_kill_loop(self, pool, problem):
    _, loss_fn, _, proto, _ = problem
    step = RayStep(proto, timing.get_model("slowdown"), loss_fn, optax.sgd(LR), pool=pool,
                   time_scale=SCALE)
    step.warmup(problem[0], problem[2][0])
    with KillLoop(ray, pool.actors, mtbf=1.0, min_gap=0.5, seed=0) as chaos:
      # 80 steps: past the steep part of the learning curve, where an inexact step
      # or two would move the accuracy by more than the 0.02 the check allows.
      state, log = train(step, problem, 80, until=lambda: len(chaos.kills) >= 3, max_steps=600)
    assert len(chaos.kills) >= 3, (chaos.kills, len(log))
    # The degraded steps are visible, and the run went on through them.
    degraded = [m["dead_workers"] for m in log]
    assert sum(d > 0 for d in degraded) >= 3, (chaos.kills, degraded)
    # (two kills of one actor between two polls are one outage)
    assert len(step.restarts) >= 2, (chaos.kills, step.restarts)
    check_nothing_lost(problem, state, log)


def test_node_removed_mid_training(problem):
  """Three one-CPU nodes, two actors: the node of one is removed; Ray restarts it on the third."""
  from ray.cluster_utils import Cluster  # pylint: disable=import-outside-toplevel
  _, loss_fn, _, proto, _ = problem
  fast = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 200,
          "health_check_failure_threshold": 3}
  cluster = Cluster(initialize_head=True, head_node_args={
      "num_cpus": 1, "include_dashboard": False, "_system_config": fast})
  try:
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
    with WorkerPool(2) as pool:
      on = {n.node_id: n for n in nodes}
      victim = next(h for h, host in enumerate(pool.hosts) if host[2] in on)
      step = RayStep(proto, timing.get_model("slowdown"), loss_fn, optax.sgd(LR), pool=pool,
                     time_scale=SCALE)
      params, _, batches, _, _ = problem
      state = step.init_state(params, jax.random.key(1))
      log = []
      for s in range(200):
        if s == 5:
          cluster.remove_node(on[pool.hosts[victim][2]], allow_graceful=False)
        state, metrics = step.update(state, batches[s % len(batches)], jax.random.key(1))
        log.append(metrics)
        if s >= 40 and step.restarts and step.restarts[0].first_report_step is not None:
          break
      assert sum(m["dead_workers"] > 0 for m in log) >= 1
      ev = step.restarts[0]
      assert ev.actor == victim and ev.down_step >= 5
      check_nothing_lost(problem, state, log)
  finally:
    ray.shutdown()
    cluster.shutdown()

"""Hot spares and elastic membership on Ray (PROTOCOL.md §16): takeovers, shrink, grow, resume.

A small MLP on digits with partial_straggler (ell = 1; uncoded for the takeover, where
the spare's report must be waited for). Every step here must be
exact, so each run must end exactly where full-batch SGD on the same batches ends
(the reference is plain JAX), whatever the membership did meanwhile.
"""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

ray = pytest.importorskip("ray")

from jaxgc import assignments, experiment, protocols, timing  # pylint: disable=wrong-import-position
from jaxgc.backends.ray import RayStep, WorkerPool  # pylint: disable=wrong-import-position
from jaxgc.backends.ray.membership import reformed_assignment  # pylint: disable=wrong-import-position
from jaxgc.errors import ParamError  # pylint: disable=wrong-import-position
from tests.helpers import digits_mlp, host_batches  # pylint: disable=wrong-import-position

BATCH, LR, SCALE = 48, 0.5, 0.002
FAST = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 200,
        "health_check_failure_threshold": 3}


@pytest.fixture(scope="module")
def problem():
  ds, _, params, loss_fn, _ = digits_mlp((16,), BATCH)
  return params, loss_fn, {n: host_batches(ds, n, BATCH, 20) for n in (4, 6)}


@functools.partial(jax.jit, static_argnums=0)
def _sgd_step(loss_fn, params, chunks):
  g = jax.grad(lambda p: jnp.sum(jax.vmap(lambda c: loss_fn(p, c))(chunks)))(params)
  return jax.tree.map(lambda p, gi: p - LR * gi, params, g)


def assert_sgd(problem, state, batches, log):
  """Every step exact, and the parameters those of full-batch SGD on the same batches."""
  params, loss_fn, _ = problem
  assert all(m["exact"] and not m["skipped"] for m in log), [
      (s, m["exact"], m["dead_workers"]) for s, m in enumerate(log) if not m["exact"]]
  for s in range(len(log)):
    params = _sgd_step(loss_fn, params, batches[s % len(batches)])
  for p, r in zip(jax.tree.leaves(state.params), jax.tree.leaves(params), strict=True):
    np.testing.assert_allclose(p, r, rtol=1e-3, atol=1e-4)


def run(step, state, batches, log, steps=1, until=None, most=2000):
  """``steps`` more steps (more while ``until()`` is False, at most ``most``)."""
  for n in range(most):
    if n >= steps and (until is None or until()):
      break
    state, metrics = step.update(state, batches[len(log) % len(batches)], jax.random.key(1))
    log.append(metrics)
  return state


@pytest.mark.parametrize("n,m,load", [(4, 4, 3), (6, 4, 3), (6, 2, 3), (6, 9, 2), (8, 12, 3)])
def test_reformed_assignment_keeps_every_chunk_at_load_holders(n, m, load):
  a = reformed_assignment(n, m, load)
  assert a.num_workers == m and a.num_chunks == n
  assert (a.replication == min(load, m)).all()
  total = n * min(load, m)
  assert set(a.loads.tolist()) <= {total // m, -(-total // m)}
  if n == m:
    np.testing.assert_array_equal(a.order, assignments.cyclic(m, load).order)


class TestSpares:
  """Two actors and one spare on a local Ray instance of three CPUs."""

  @pytest.fixture(scope="class")
  def pool(self):
    ray.init(address="local", num_cpus=3, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    try:
      with WorkerPool(2, num_spares=1) as p:
        yield p
    finally:
      ray.shutdown()

  def test_a_spare_takes_over_in_the_step_of_the_kill(self, pool, problem):
    params, loss_fn, by_n = problem
    # Uncoded: a step is exact only once every worker reported, so a spare that took
    # over reported in every exact step (a coded step might finish without it).
    proto = protocols.get_protocol("uncoded", assignments.cyclic(4, 1), 1)
    step = RayStep(proto, timing.get_model("slowdown"), loss_fn, optax.sgd(LR), pool=pool,
                   time_scale=SCALE, fail_at=[(1, 2)])
    first, spare = list(pool.actors), pool.spares[0]
    state, log = step.init_state(params, jax.random.key(1)), []
    state = run(step, state, by_n[4], log, 4)
    # Worker 1 lives on actor 1, killed for real at the start of step 2; the spare
    # runs its workers in that very step, so no step ran without them.
    (ev,) = step.restarts
    assert (ev.actor, ev.cause, ev.spare, ev.down_step, ev.up_step) == (1, "fail_at", True, 2, 2)
    assert ev.steps_lost == 0
    assert [m["faults_injected"] for m in log] == [0, 0, 1, 0]
    assert [m["dead_workers"] for m in log] == [0, 0, 0, 0]
    assert pool.actors == [first[0], spare] and pool.spares == [first[1]]
    # The killed actor, restarted by Ray and warmed in the background, is the next spare.
    state = run(step, state, by_n[4], log, until=lambda: step.membership.ready_spares() == 1)
    assert step.liveness.kill(0, len(log))
    state = run(step, state, by_n[4], log, 2)
    assert pool.actors == [first[1], spare] and step.restarts[-1].spare
    assert step.restarts[-1].steps_lost == 0 and log[-2]["dead_workers"] == 0
    assert all(m["live_workers"] == 4 and m["membership_epoch"] == 0 for m in log)
    assert_sgd(problem, state, by_n[4], log)

  def test_more_spares_than_free_cpus_is_one_line(self, pool):
    del pool          # holds 3 CPUs of 3
    with pytest.raises(ParamError, match=r"^num_spares=2: 1 actors and 2 spares need 3 CPUs, "
                       r"the cluster has 0 free; lower --config.ray.num_spares\.$") as e:
      WorkerPool(1, num_spares=2)
    assert e.value.param == "num_spares"


def test_misuse_names_the_flag():
  with pytest.raises(ParamError, match=r"^max_restarts must be an integer >= 0 .*got -1; set "
                     r"--config.ray.max_restarts\.$"):
    WorkerPool(1, max_restarts=-1)
  cfg = lambda *f: experiment.apply_overrides(experiment.default_config(), [
      x.split("=", 1) for x in ("num_workers=4", "load=2", "model=linear", *f)])
  for flags, match in [
      (("ray.num_spares=1",), r"^--config.ray.num_spares: hot spares are Ray actors, but "
       r"--config.backend=spmd; use --config.backend=ray, or leave --config.ray.num_spares=0\.$"),
      (("backend=ray", "ray.max_restarts=-2"), r"^--config.ray.max_restarts=-2: max_restarts must "
       r"be an integer >= 0 .*--config.ray.max_restarts\.$")]:
    config = cfg(*flags)
    proto = experiment.make_protocol(config, experiment.make_assignment(config))
    with pytest.raises(experiment.ConfigError, match=match):
      experiment.make_step(config, proto, experiment.make_straggler_model(config),
                           lambda p, c: jnp.sum(p), experiment.make_optimizer(config), None)


def test_shrink_and_grow_on_a_cluster(problem):
  """Three actors, one on a node that is removed for good: the code shrinks over the other
  two; a node joins: its actor joins and the code grows back. Every step exact."""
  from ray.cluster_utils import Cluster  # pylint: disable=import-outside-toplevel
  params, loss_fn, by_n = problem
  cluster = Cluster(initialize_head=True, head_node_args={
      "num_cpus": 2, "include_dashboard": False, "_system_config": FAST})
  try:
    node = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
    with WorkerPool(3) as pool:
      proto = protocols.get_protocol("partial_straggler", assignments.cyclic(6, 3), 1)
      step = RayStep(proto, timing.get_model("slowdown"), loss_fn, optax.sgd(LR), pool=pool,
                     time_scale=SCALE)
      victim = [h[2] for h in pool.hosts].index(node.node_id)
      state, log = step.init_state(params, jax.random.key(1)), []
      state = run(step, state, by_n[6], log, 3)
      cluster.remove_node(node, allow_graceful=False)
      state = run(step, state, by_n[6], log, until=lambda: step.reforms)
      (shrink,) = step.reforms
      assert {k: shrink[k] for k in ("m_before", "m_after", "actors_before", "actors_after",
                                     "load", "why", "epoch")} == dict(
          m_before=6, m_after=4, actors_before=3, actors_after=2, load=3, why="gone", epoch=1)
      assert len(pool.actors) == 2 and step.assignment.num_workers == 4
      assert (step.assignment.replication == 3).all()
      assert step.restarts[0].actor == victim
      cluster.add_node(num_cpus=1)
      state = run(step, state, by_n[6], log, 2, until=lambda: len(step.reforms) == 2)
      grow = step.reforms[1]
      assert (grow["m_before"], grow["m_after"], grow["actors_after"], grow["why"]) == (
          4, 6, 3, "joined")
      state = run(step, state, by_n[6], log, 2)
      lw = [(m["live_workers"], m["membership_epoch"]) for m in log]
      s1, s2 = shrink["step"], grow["step"]
      assert lw[s1:s2] == [(4, 1)] * (s2 - s1) and lw[s2:] == [(6, 2)] * (len(log) - s2)
      assert all(e == 0 for _, e in lw[:s1])
      assert_sgd(problem, state, by_n[6], log)
  finally:
    ray.shutdown()
    cluster.shutdown()


def test_resume_on_another_cluster_size_re_forms_at_once(tmp_path):
  """A run on 2 actors (4 workers) checkpoints its membership; resumed with 3 actors, the
  code re-forms to 6 workers before the first resumed step. (On the default 8-device mesh:
  the restored state is laid out as the one the Ray step's jitted update was given.)"""
  flags = ("backend=ray", "num_workers=4", "load=3", "ell=1", "model=linear", "batch_size=48",
           "eval_every=4", "checkpoint_every=2", "ray.time_scale=0.002")
  cfg = lambda *f: experiment.apply_overrides(experiment.default_config(), [
      x.split("=", 1) for x in (*flags, *f)])
  ray.init(address="local", num_cpus=3, include_dashboard=False, configure_logging=False,
           log_to_driver=False)
  try:
    experiment.train_and_evaluate(cfg("num_steps=4", "ray.num_actors=2"), str(tmp_path))
    with open(tmp_path / "summary.json") as f:
      assert json.load(f)["reforms"] == []
    experiment.train_and_evaluate(cfg("num_steps=6", "ray.num_actors=3"), str(tmp_path))
  finally:
    ray.shutdown()
  with open(tmp_path / "summary.json") as f:
    summary = json.load(f)
  assert [{k: r[k] for k in ("step", "epoch", "m_before", "m_after", "actors_after", "why")}
          for r in summary["reforms"]] == [dict(step=4, epoch=1, m_before=4, m_after=6,
                                                actors_after=3, why="resume")]
  with open(tmp_path / "metrics.jsonl") as f:
    steps = [r for r in map(json.loads, f) if "loss" in r]
  assert [(r["step"], r["live_workers"], r["membership_epoch"], r["exact"]) for r in steps] == [
      (1, 4, 0, True), (2, 4, 0, True), (3, 4, 0, True), (4, 4, 0, True),
      (5, 6, 1, True), (6, 6, 1, True)]
  # Each checkpoint's meta records the membership it was saved under.
  saved = {}
  for step in (4, 6):
    with open(tmp_path / "checkpoints" / str(step) / "meta" / "metadata") as f:
      saved[step] = json.load(f)["membership"]
  assert [(saved[s]["epoch"], saved[s]["num_workers"], saved[s]["num_actors"])
          for s in (4, 6)] == [(0, 4, 2), (1, 6, 3)]

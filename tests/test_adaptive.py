"""Adaptive PS (PROTOCOL.md §10): placement keeps exactness and learns persistent slowness."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgc
from jaxgc import adaptive, assignments, protocols, timing


def test_placement_keeps_exactness():
  asg = assignments.cyclic(8, 3)
  proto = jaxgc.PartialStraggler(asg, 2)
  ps = adaptive.AdaptivePS(proto)
  rng = np.random.default_rng(0)
  state = ps.init()
  model = timing.FixedSlowdown(timing.ShiftedExponential(), (0, 1), 5.0)

  @jax.jit
  def step(key, state, g):
    tau = model.sample(key, asg)                                     # physical workers
    perm = ps.placement(state)
    logical = adaptive.apply_placement(tau, perm, asg)
    stop = proto.completion_time(logical)
    counts = timing.progress(logical, stop)
    # Chunk identity follows the logical list, whoever computes it.
    enc, dec = proto.coefficients(counts)
    est = protocols.decode(protocols.encode(g[jnp.maximum(asg.order, 0)], enc), dec, 6)
    return tau, perm, logical, est, ps.observe(state, counts, stop)

  for i in range(4):
    g = rng.standard_normal((8, 6)).astype(np.float32)
    tau, perm, logical, est, state = step(jax.random.PRNGKey(i), state, g)
    assert sorted(np.asarray(perm).tolist()) == list(range(8))
    np.testing.assert_array_equal(np.asarray(logical), np.asarray(tau)[np.asarray(perm)])
    np.testing.assert_allclose(est, g.sum(0), rtol=1e-4, atol=1e-4)     # exact: Σ g_i
  assert int(state.num_obs) == 4


def test_observe_maps_counts_to_physical_workers_and_censors():
  asg = assignments.cyclic(4, 2)
  ps = adaptive.AdaptivePS(jaxgc.PartialStraggler(asg, 1), decay=0.5)
  state = ps.init()._replace(perm=jnp.array([2, 0, 3, 1], jnp.int32))
  new = jax.jit(ps.observe)(state, jnp.array([0, 1, 2, 1]), 2.0)
  # logical j ran on physical perm[j]: physical k = [1, 1, 0, 2]; physical 3 finished
  # its whole list (censored), so its estimate may only rise: max(1, 0.5 + 0.5).
  np.testing.assert_allclose(np.asarray(new.rate), [0.75, 0.75, 0.5, 1.0])
  assert sorted(np.asarray(new.perm).tolist()) == [0, 1, 2, 3]


def test_spread_positions():
  pos = adaptive.spread_positions(20)
  for s in range(1, 21):
    row = pos[s - 1]
    assert sorted(row.tolist()) == list(range(20))
    gaps = np.diff(np.r_[row[:s], row[0] + 20])
    assert gaps.max() - gaps.min() <= 1


def test_adaptive_beats_static_under_fixed_adjacent_slow_workers():
  asg = assignments.cyclic(20, 6)
  proto = jaxgc.PartialStraggler(asg, 2)
  model = timing.FixedSlowdown(timing.ShiftedExponential(1.0, 1.0), (0, 1, 2, 3), 5.0)
  run = jax.jit(lambda k: (adaptive.simulate(proto, model, k, 60),
                           adaptive.simulate(proto, model, k, 60, adaptive.AdaptivePS(proto))))
  static, ada = run(jax.random.PRNGKey(0))
  s = np.asarray(static["time"] / static["oracle"])[10:]
  a = np.asarray(ada["time"] / ada["oracle"])[10:]
  assert np.mean(a) < 0.75 * np.mean(s)
  assert np.all(np.asarray(ada["time"]) >= np.asarray(ada["oracle"]) - 1e-5)
  # the slow workers end up spread out, not adjacent
  slow_at = np.sort(np.flatnonzero(np.isin(np.asarray(ada["perm"][-1]), [0, 1, 2, 3])))
  assert np.min(np.diff(np.r_[slow_at, slow_at[0] + 20])) >= 3


def test_speed_assignment_and_its_completion_time():
  asg = assignments.cyclic(6, 3)
  tau = np.asarray(timing.ShiftedExponential().sample(jax.random.PRNGKey(0), asg, (5,)))
  for ell in (1, 2, 3):
    ref = np.asarray(jaxgc.PartialStraggler(asg, ell).completion_time(tau))
    mine = [adaptive.completion_time_of(asg.order, t, ell) for t in tau]
    np.testing.assert_allclose(mine, ref, rtol=1e-6)
  order = adaptive.speed_assignment(np.ones(6), 6, 18, 6)
  assert np.all((order >= 0).sum(1) == 3)                       # equal speeds: equal loads
  order = adaptive.speed_assignment(np.array([5.0, 5, 1, 1, 1, 1]), 6, 18, 6)
  loads = (order >= 0).sum(1)
  assert loads.sum() == 18 and loads[:2].max() < loads[2:].min() and loads.min() >= 1
  cov = np.bincount(order[order >= 0], minlength=6)
  assert cov.min() >= 2 and cov.max() - cov.min() <= 1
  for row in order:                                             # a chunk at most once per list
    row = row[row >= 0]
    assert len(set(row.tolist())) == len(row)
  with pytest.raises(ValueError, match="num_workers"):
    adaptive.AdaptivePS(jaxgc.PartialStraggler(asg, 1)).init(7)


def test_order_completion_time_matches_the_protocol_on_padded_unequal_lists():
  """The traced-lists t* (used for unequal loads under jit) equals PartialStraggler's."""
  asg = assignments.by_speed(np.array([0.2, 1, 1, 0.5, 1, 2, 1, 1, 0.3, 1]), 4)
  width = 10
  order = np.full((10, width), -1, np.int32)
  order[:, : asg.max_load] = asg.order
  model = timing.ShiftedExponential()
  tau = np.asarray(model.sample(jax.random.PRNGKey(0), assignments.cyclic(10, width), (64,)))
  for ell in (1, 2, 4):
    got = adaptive.order_completion_time(order, np.where(order >= 0, tau, np.inf), ell)
    d = np.where(asg.slot_mask, tau[..., : asg.max_load], np.inf)
    np.testing.assert_allclose(got, jaxgc.PartialStraggler(asg, ell).completion_time(d))
  assert np.isinf(adaptive.order_completion_time(order, np.where(order >= 0, tau, np.inf),
                                                 5)).all()


def test_busy_times_by_hand():
  tau = jnp.array([[1.0, 2.0, jnp.inf], [1.0, 1.0, 1.0], [4.0, 1.0, 1.0]])
  e, busy = adaptive.busy_times(tau, jnp.array([2, 2, 0]), 3.5)
  # worker 0 ran out of work at 3 (idle after); 1 and 2 were busy until the stop.
  np.testing.assert_allclose(np.asarray(e), [3.0, 3.5, 3.5])
  np.testing.assert_array_equal(np.asarray(busy), [False, True, True])


def test_default_adaptive_ps_state_is_unchanged():
  """Without a detector or reassign the state carries no new arrays (the SPMD step's
  TrainState and its checkpoints keep their leaves)."""
  ps = adaptive.AdaptivePS(jaxgc.PartialStraggler(assignments.cyclic(6, 3), 1))
  assert len(jax.tree.leaves(ps.init())) == 3
  assert not np.asarray(ps.slow_workers(ps.init())).any()
  with pytest.raises(ValueError, match="reassign"):
    adaptive.AdaptivePS(jaxgc.Original(assignments.cyclic(6, 3), 1), reassign=True).init()

"""Loads matched to speeds (PROTOCOL.md §17): jaxgc.assignments.by_speed."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxgc
from jaxgc import assignments, protocols, timing
from jaxgc.errors import ParamError


@st.composite
def speeds_and_load(draw):
  m = draw(st.integers(1, 16))
  speeds = draw(st.lists(st.floats(0.01, 100.0), min_size=m, max_size=m))
  load = draw(st.integers(1, m))
  load_min = draw(st.one_of(st.none(), st.integers(1, load)))
  return np.asarray(speeds), load, load_min


@settings(max_examples=80, deadline=None)
@given(speeds_and_load())
def test_invariants(case):
  speeds, load, load_min = case
  a = assignments.by_speed(speeds, load, load_min)
  m = len(speeds)
  loads = a.loads.astype(int)
  assert a.num_workers == a.num_chunks == m
  assert loads.sum() == m * load                                     # total work N·load
  assert (loads >= 1).all() and (loads <= m).all()                   # at least 1, capped at N
  want = load if load_min is None else load_min
  assert (a.replication >= want).all()                               # every chunk >= load_min
  for row in a.lists():                                              # nobody holds a chunk twice
    assert len(set(row)) == len(row)
  # Monotone in the speed: a strictly faster worker never has a smaller load.
  faster = speeds[:, None] > speeds[None, :]
  assert not (faster & (loads[:, None] < loads[None, :])).any()
  # Proportional up to rounding: one λ with |δ_j − λ s_j| < 1 for every unclipped worker
  # (δ_j >= 3 rules out the clip at 1, δ_j < N the cap), i.e. the intervals
  # ((δ_j − 1)/s_j, (δ_j + 1)/s_j) share a point.
  free = (loads >= 3) & (loads < m)
  if free.any():
    assert ((loads[free] - 1) / speeds[free]).max() < ((loads[free] + 1) / speeds[free]).min()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 14), st.data())
def test_equal_speeds_is_cyclic(m, data):
  load = data.draw(st.integers(1, m))
  a = assignments.by_speed(np.full(m, 3.0), load)
  np.testing.assert_array_equal(a.order, assignments.cyclic(m, load).order)


def test_loads_follow_the_speeds_exactly_when_they_divide():
  speeds = np.array([1, 1, 2, 2, 4, 4, 2, 2, 1, 1], float)        # Σ = 20, N·load = 40
  a = assignments.by_speed(speeds, 4)
  np.testing.assert_array_equal(a.loads, 2 * speeds)
  assert (a.replication == 4).all()


def test_load_min_below_load_and_max_load():
  speeds = np.r_[np.full(4, 0.2), np.ones(16)]
  a = assignments.by_speed(speeds, 6, load_min=3, max_load=8)
  assert (a.replication >= 3).all() and a.max_load <= 8 and a.loads.sum() == 120
  capped = assignments.by_speed(np.r_[100.0, np.ones(9)], 5)
  assert capped.loads[0] == 10 and capped.loads.sum() == 50      # capped at N, rest spread


@pytest.mark.parametrize("kwargs,param", [
    (dict(speeds=[1.0, 0.0, 1.0], load=2), "speeds"),
    (dict(speeds=[1.0, np.nan], load=1), "speeds"),
    (dict(speeds=[1.0, -2.0], load=1), "speeds"),
    (dict(speeds=[[1.0, 2.0]], load=1), "speeds"),
    (dict(speeds=[], load=1), "speeds"),
    (dict(speeds=["a", "b"], load=1), "speeds"),
    (dict(speeds=[1.0, 2.0], load=3), "load"),
    (dict(speeds=[1.0, 2.0], load=0), "load"),
    (dict(speeds=[1.0, 2.0], load=1.5), "load"),
    (dict(speeds=[1.0, 2.0, 3.0], load=2, load_min=3), "load_min"),
    (dict(speeds=[1.0, 2.0, 3.0], load=2, load_min=0), "load_min"),
    (dict(speeds=[1.0, 2.0, 3.0], load=2, max_load=1), "max_load"),
    (dict(speeds=[1.0, 2.0, 3.0], load=2, max_load=4), "max_load"),
])
def test_bad_inputs_name_the_parameter(kwargs, param):
  with pytest.raises(ParamError) as e:
    assignments.by_speed(**kwargs)
  assert e.value.param == param and param in str(e.value)


def test_registry_entry():
  a = assignments.ASSIGNMENTS.build("by_speed", 8, 4)
  np.testing.assert_array_equal(a.order, assignments.cyclic(8, 4).order)
  b = assignments.ASSIGNMENTS.build("by_speed", 4, 2, speeds=(1.0, 1.0, 0.25, 1.0))
  assert b.loads[2] == 1 and b.loads.sum() == 8
  with pytest.raises(ParamError, match="speeds") as e:
    assignments.ASSIGNMENTS.build("by_speed", 4, 2, speeds=(1.0, 1.0))
  assert e.value.param == "speeds"


@pytest.mark.parametrize("ell", [1, 2, 3])
def test_partial_straggler_decodes_exactly_on_by_speed(ell):
  speeds = np.array([0.2, 0.2, 1, 1, 1, 0.5, 1, 1, 2, 1, 1, 1])
  asg = assignments.by_speed(speeds, 4)
  assert asg.kind == "by_speed" and len(set(asg.loads.tolist())) > 1
  proto = jaxgc.PartialStraggler(asg, ell)
  model = timing.FixedSlowdown(timing.ShiftedExponential(), (0, 1), 5.0)
  rng = np.random.default_rng(ell)
  for i in range(3):
    tau = model.sample(jax.random.PRNGKey(i), asg)
    stop = proto.completion_time(tau)
    counts = timing.progress(tau, stop)
    assert (np.asarray(asg.coverage(counts)) >= ell).all()
    g = rng.standard_normal((asg.num_chunks, 10)).astype(np.float32)
    enc, dec = proto.coefficients(counts)
    est = protocols.decode(protocols.encode(jnp.asarray(g)[np.maximum(asg.order, 0)], enc),
                           dec, 10)
    np.testing.assert_allclose(est, g.sum(0), rtol=1e-4, atol=1e-4)


def test_by_speed_beats_cyclic_under_fixed_slow_workers():
  """The issue's target, on a smaller sample: at most 0.85x cyclic's time at ℓ = 1, 2."""
  model = timing.FixedSlowdown(timing.ShiftedExponential(1.0, 1.0), (0, 1, 2, 3), 5.0)
  carrier = assignments.cyclic(20, 20)
  tau = np.asarray(model.sample(jax.random.PRNGKey(0), carrier, (400,)))
  speeds = np.r_[np.full(4, 0.2), np.ones(16)]
  for ell in (1, 2):
    med = {}
    for a in (assignments.cyclic(20, 6), assignments.by_speed(speeds, 6)):
      d = np.where(a.slot_mask, tau[..., : a.max_load], np.inf)
      med[a.kind] = float(np.median(jaxgc.PartialStraggler(a, ell).completion_time(d)))
    oracle = float(np.median(timing.oracle_time(tau, carrier, ell)))
    assert med["by_speed"] <= 0.85 * med["cyclic"]
    assert oracle <= med["by_speed"] <= 1.6 * oracle


def test_by_speed_from_the_config_and_its_one_line_error():
  from configs import default as default_config
  from jaxgc import experiment
  speeds = (1.0,) * 4 + (5.0,) * 16
  cfg = experiment.apply_overrides(default_config.get_config(), [
      ("assignment.name", "by_speed"), ("assignment.by_speed.speeds", str(speeds))])
  a = experiment.make_assignment(cfg)
  assert a.lists() == assignments.by_speed(speeds, cfg.assignment.load).lists()
  assert a.loads[:4].max() < a.loads[4:].min()
  cfg = experiment.apply_overrides(cfg, [("assignment.by_speed.speeds", "(1, 2)")])
  with pytest.raises(experiment.ConfigError, match=r"^--config.assignment.by_speed.speeds="
                     r".*one entry per worker"):
    experiment.make_assignment(cfg)

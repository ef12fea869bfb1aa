"""Straggler detector (jaxgc.detector) and the adaptive PS that uses it (PROTOCOL.md §10, §17)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgc
from jaxgc import adaptive, assignments, timing
from jaxgc.detector import MAX_SEGMENT, Detector, observation
from jaxgc.errors import ParamError

SIGMA = 0.4          # noise of one step's x, the detector's default scale
SHIFT = np.log(5.0)  # a 5x slowdown


def run(det, xs):
  """Feeds ``xs`` ``[T, m]`` (all valid); returns alarms and slow flags, each ``[T, m]``."""
  def body(state, x):
    state, alarm = det.update(state, x, jnp.ones(x.shape, bool))
    return state, (alarm, det.slow(state))
  state, (alarms, slow) = jax.lax.scan(body, det.init(xs.shape[1]), jnp.asarray(xs, jnp.float32))
  return state, np.asarray(alarms), np.asarray(slow)


def test_detection_delay_is_bounded():
  """500 independent workers, Gaussian noise σ = 0.4, a 5x slowdown at step 40 and a
  recovery at step 80: each is declared within 2 steps (theory: (h + 1.17)/(Δ/σ − κ)
  = 1.5 steps), and never before it happens by more than the false-alarm rate allows."""
  rng = np.random.default_rng(0)
  m, t = 500, 120
  xs = rng.normal(0.0, SIGMA, (t, m))
  xs[40:80, :] += SHIFT
  _, alarms, _ = run(Detector(), xs)
  for start in (40, 80):
    # A false alarm one step early also starts the new segment there (and absorbs it).
    window = alarms[start - 1:start + 10]
    assert window.any(axis=0).all()
    delay = np.argmax(window, axis=0) - 1
    assert np.mean(delay <= 1) >= 0.98              # declared at the 1st or 2nd step
    assert delay.max() <= 4
  # The level follows at once: right after the change it is the new level.
  state, _, _ = run(Detector(), xs[:42])
  assert np.abs(np.asarray(state.level) - SHIFT).mean() < 2 * SIGMA


def test_false_alarms_are_rare_on_stationary_data():
  """No change: with κ = 0.5, h = 4 Siegmund's approximation gives one alarm per ~340
  steps per side; allow 1 per 100 worker-steps (measured ~1/250 with this seed)."""
  rng = np.random.default_rng(1)
  xs = rng.normal(0.0, SIGMA, (400, 200))
  state, alarms, slow = run(Detector(), xs)
  assert alarms.mean() < 1 / 100
  assert slow[10:].mean() < 1 / 100                 # nobody is 2x slower than the median
  assert int(np.asarray(state.changes).sum()) == alarms.sum()


def test_slow_from_the_start_is_flagged_and_precision_tracks_persistence():
  rng = np.random.default_rng(2)
  m, t = 20, 200
  fixed = rng.normal(0.0, SIGMA, (t, m))
  fixed[:, :4] += SHIFT                             # workers 0-3 slow at every step
  state, _, slow = run(Detector(), fixed)
  assert slow[0, :4].sum() >= 3                     # flagged from the first observation
  assert slow[5:, :4].mean() > 0.99 and slow[5:, 4:].mean() < 0.01
  assert float(state.precision) > 0.9
  fresh = rng.normal(0.0, SIGMA, (t, m))            # 4 random workers slow, drawn afresh
  pick = np.argsort(rng.random((t, m)), axis=1)[:, :4]
  np.put_along_axis(fresh, pick, np.take_along_axis(fresh, pick, 1) + SHIFT, 1)
  state, _, _ = run(Detector(), fresh)
  assert float(state.precision) < 0.5               # flags do not predict the next step


def test_observation_by_hand():
  # k = [2, 0, 3, 1], busy time e = [4, 4, 3, 0], busy = [1, 1, 0, 0]: the last worker
  # was idle the whole step (e = 0) and gives nothing.
  x, ok = observation(jnp.array([2, 0, 3, 1]), jnp.array([4.0, 4.0, 3.0, 0.0]),
                      jnp.array([True, True, False, False]))
  raw = np.log([4 / 2.5, 4 / 0.5, 3 / 3])
  np.testing.assert_array_equal(np.asarray(ok), [True, True, True, False])
  np.testing.assert_allclose(np.asarray(x)[:3], raw - np.median(raw), rtol=1e-6)


def test_segment_level_is_a_running_mean_then_an_ewma():
  det = Detector(threshold=1e9)                     # no change points: one segment
  xs = np.arange(1, 31, dtype=np.float32)[:, None] * 0.01
  state, _, _ = run(det, xs)
  n = MAX_SEGMENT
  want = xs[:n, 0].mean()
  for x in xs[n:, 0]:
    want += (x - want) / n
  np.testing.assert_allclose(float(state.level[0]), want, rtol=1e-5)


@pytest.mark.parametrize("field,value", [("drift", 0.0), ("threshold", -1.0), ("scale", 0.0),
                                         ("slow_factor", 1.0), ("jump", 0.0)])
def test_bad_parameters(field, value):
  with pytest.raises(ParamError) as e:
    Detector(**{field: value}).init(4)
  assert e.value.param == field


def test_adaptive_ps_with_detector_and_unequal_loads_under_fixed_slow_workers():
  """4 adjacent workers 5x slower: the detector flags exactly them, the PS moves to
  unequal loads, and its median time / oracle is below the placement-only PS's and the
  static PS's on the same durations."""
  asg = assignments.cyclic(20, 6)
  ps = jaxgc.PartialStraggler(asg, 1)
  model = timing.FixedSlowdown(timing.ShiftedExponential(1.0, 1.0), (0, 1, 2, 3), 5.0)
  ada = adaptive.AdaptivePS(ps, detector=Detector(), reassign=True)

  @jax.jit
  def go(key):
    return (adaptive.simulate(ps, model, key, 150, width=12),
            adaptive.simulate(ps, model, key, 150, adaptive.AdaptivePS(ps), width=12),
            adaptive.simulate(ps, model, key, 150, ada))

  static, place, full = jax.tree.map(np.asarray, go(jax.random.PRNGKey(3)))
  np.testing.assert_array_equal(static["oracle"], full["oracle"])   # the same durations
  ratio = {k: float(np.median(r["time"][30:] / r["oracle"][30:]))
           for k, r in (("static", static), ("place", place), ("full", full))}
  assert ratio["full"] <= ratio["place"] <= ratio["static"]
  assert ratio["full"] < 1.5 and ratio["static"] > 2.0
  slow = full["slow_workers"][10:]
  assert slow[:, :4].mean() > 0.95 and slow[:, 4:].mean() < 0.05
  assert full["unequal"][30:].mean() > 0.8
  loads = full["loads"][30:][full["unequal"][30:]]
  assert (loads.sum(-1) == 120).all()
  assert np.mean(loads[:, :4].max(-1) < loads[:, 4:].min(-1)) > 0.9   # less work for 0-3

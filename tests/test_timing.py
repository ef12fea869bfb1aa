"""Straggler models, state at time t, completion times against an event loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_lists

import jaxgc
from jaxgc import assignments, timing


def test_models_shapes_and_empty_slots():
  asg = assignments.from_lists([[0, 1, 2], [1], [2, 0]], 3)
  key = jax.random.PRNGKey(0)
  for model in [timing.ShiftedExponential(), timing.Pareto(), timing.Slowdown(),
                timing.Failures(timing.Pareto(), 0.5)]:
    tau = model.sample(key, asg, shape=(7,))
    assert tau.shape == (7, 3, 3) and tau.dtype == jnp.float32
    assert np.all(np.isinf(np.asarray(tau)[:, ~asg.slot_mask]))
    assert not np.isnan(np.asarray(tau)).any()


def test_model_statistics():
  asg = assignments.cyclic(50, 4)
  key = jax.random.PRNGKey(1)
  tau = np.asarray(timing.ShiftedExponential(1.0, 2.0).sample(key, asg, (200,)))
  assert tau.min() >= 1.0 and abs(tau.mean() - 1.5) < 0.02
  tau = np.asarray(timing.Pareto(0.5, 3.0).sample(key, asg, (200,)))
  assert tau.min() >= 0.5 and abs(tau.mean() - 0.75) < 0.03   # mean = a·x_m/(a−1)
  fail = np.asarray(timing.Failures(timing.ShiftedExponential(), 0.3).sample(key, asg, (200,)))
  failed = np.isinf(fail).all(-1)
  assert abs(failed.mean() - 0.3) < 0.02
  assert np.all(np.isinf(fail).any(-1) == failed)              # a worker fails as a whole
  base = timing.ShiftedExponential()
  slow = np.asarray(timing.Slowdown(base, 0.2, 10.0).sample(key, asg, (50,)))
  assert np.all((slow.min(-1) >= 10.0).sum(-1) == 10)          # exactly 20% of 50 workers


def test_models_run_under_jit_and_vmap():
  asg = assignments.cyclic(6, 2)
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  f = jax.jit(jax.vmap(lambda k: timing.Slowdown().sample(k, asg)))
  assert f(keys).shape == (3, 6, 2)


def test_trace_and_get_model():
  asg = assignments.cyclic(3, 2)
  tr = np.arange(6, dtype=np.float32).reshape(3, 2)
  np.testing.assert_array_equal(timing.RecordedDurations(tr).sample(None, asg), tr)
  with pytest.raises(ValueError, match="trailing shape"):
    timing.RecordedDurations(np.ones((2, 2))).sample(None, asg)
  assert isinstance(timing.get_model("pareto", failure_prob=0.1), timing.Failures)
  assert timing.get_model("slowdown", shift=2.0, factor=3.0).base.shift == 2.0
  with pytest.raises(ValueError, match="unknown straggler model"):
    timing.get_model("gamma")
  with pytest.raises(ValueError, match="failure_prob"):
    timing.get_model("pareto", failure_prob=1.5)


def test_nan_durations_rejected():
  asg = assignments.cyclic(3, 2)
  bad = np.ones((3, 2))
  bad[1, 1] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    timing.progress(bad, 1.0)
  with pytest.raises(ValueError, match="NaN"):
    jaxgc.PartialStraggler(asg, 1).completion_time(bad)
  with pytest.raises(ValueError, match="NaN"):
    timing.RecordedDurations(bad)
  with pytest.raises(ValueError, match="non-negative"):
    timing.progress(-np.ones((3, 2)), 1.0)


def test_progress_matches_brute_force():
  rng = np.random.default_rng(0)
  tau = rng.exponential(size=(4, 5, 3))
  tau[0, 1, 1] = np.inf
  t = rng.uniform(0, 4, size=4)
  k = np.asarray(timing.progress(tau, t))
  for b in range(4):
    for j in range(5):
      acc, n = 0.0, 0
      for u in range(3):
        acc += tau[b, j, u]
        n += acc <= t[b]
      assert k[b, j] == n


def _protocols(asg, ell):
  out = [jaxgc.PartialStraggler(asg, ell), jaxgc.Uncoded(asg)]
  if asg.replication.min() == asg.replication.max():
    out.append(jaxgc.Original(asg, ell))
  return out


@pytest.mark.parametrize("seed", range(6))
def test_completion_times_equal_event_loop(seed):
  rng = np.random.default_rng(seed)
  kind = seed % 3
  if kind == 0:
    asg = assignments.cyclic(int(rng.integers(3, 9)), 3)
  elif kind == 1:
    asg = assignments.fractional_repetition(6, 3)
  else:
    asg = random_lists(rng, 6, 5, min_rep=2)
  ell = int(rng.integers(1, asg.replication.min() + 1))
  key = jax.random.PRNGKey(seed)
  model = timing.Failures(timing.ShiftedExponential(), p=0.25)
  tau = np.asarray(model.sample(key, asg, (40,)), np.float64)
  for proto in _protocols(asg, ell):
    fast = np.asarray(proto.completion_time(tau))
    decodable = lambda k, p=proto: bool(p.is_decodable(k))
    ref = np.array([timing.event_loop_completion_time(t, decodable) for t in tau])
    np.testing.assert_allclose(fast, ref, rtol=1e-5, err_msg=proto.name)
    # the oracle bound (at the protocol's own ell) is below every protocol
    oracle = np.asarray(timing.oracle_time(tau, asg, proto.ell))
    assert np.all(oracle <= fast + 1e-6), proto.name


def test_completion_time_inf_when_never_decodable():
  asg = assignments.cyclic(4, 2)
  tau = np.ones((4, 2))
  tau[0] = tau[1] = np.inf        # chunk 1 is held by workers 0 and 1 only
  assert np.isinf(float(jaxgc.PartialStraggler(asg, 1).completion_time(tau)))
  assert float(jaxgc.PartialStraggler(asg, 1).completion_time(np.ones((4, 2)))) == 1.0


def test_state_at_completion_time_is_decodable():
  asg = assignments.random_regular(12, 4, seed=0)
  tau = timing.Pareto().sample(jax.random.PRNGKey(3), asg, (30,))
  for proto in _protocols(asg, 2):
    t = proto.completion_time(tau)
    assert np.all(np.asarray(jax.vmap(proto.is_decodable)(timing.progress(tau, t))))
    before = timing.progress(tau, t * (1 - 1e-6))
    assert not np.any(np.asarray(jax.vmap(proto.is_decodable)(before)))


def test_oracle_bound_formula():
  asg = assignments.cyclic(3, 2)
  tau = np.array([[1.0, 1.0], [2.0, 2.0], [5.0, 5.0]])
  # finish times 1,2 | 2,4 | 5,10 ; N·ℓ = 3 → third smallest = 2
  assert float(timing.oracle_time(tau, asg, 1)) == 2.0
  assert float(timing.oracle_time(tau, asg, 2)) == 10.0


@pytest.mark.parametrize("name,params,match", [
    ("shifted_exponential", dict(shift=-1.0), "shift=-1.0 is negative; use shift >= 0"),
    ("shifted_exponential", dict(rate=0.0), "rate=0.0 must be > 0"),
    ("pareto", dict(alpha=0.0), "alpha=0.0 must be > 0; use a positive alpha"),
    ("pareto", dict(scale=-2.0), "scale=-2.0 must be > 0"),
    ("slowdown", dict(fraction=1.5), r"fraction=1.5 is outside \[0, 1\]"),
    ("slowdown", dict(factor=0.5), "factor=0.5 is below 1.*use factor >= 1"),
    ("slowdown", dict(rate=-1.0), "rate=-1.0 must be > 0"),
    ("gilbert_elliott", dict(p_slow=1.2), r"p_slow=1.2 is outside \[0, 1\]"),
    ("gilbert_elliott", dict(p_recover=-0.1), r"p_recover=-0.1 is outside \[0, 1\]"),
    ("gilbert_elliott", dict(p_slow=0.0, p_recover=0.0), "no stationary law"),
    ("gilbert_elliott", dict(factor=float("inf")), "factor=inf must be finite"),
    ("slowdown", dict(alpha=2.0), r"takes no parameter\(s\) \['alpha'\]"),
])
def test_straggler_parameter_ranges(name, params, match):
  with pytest.raises(ValueError, match=match):
    timing.get_straggler_model(name, **params)


def test_straggler_model_registry_names():
  assert timing.get_model is timing.get_straggler_model
  for name, params in timing.MODEL_PARAMS.items():
    assert timing.get_straggler_model(name) is not None, name
    assert set(params) >= ({"shift", "rate"} if name != "pareto" else {"alpha"})
  ge = timing.get_straggler_model("gilbert_elliott", shift=2.0, p_slow=0.1, p_recover=0.3)
  assert ge.base.shift == 2.0 and ge.slow_fraction == pytest.approx(0.25) and ge.stateful


# -- construction-time validation (models are checked when built) ------------------

import math  # noqa: E402
import pickle  # noqa: E402
import warnings  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from jaxgc.errors import ParamError  # noqa: E402

HYP = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ASG4 = assignments.from_lists([[0, 1, 2], [1], [2, 3], [3, 0]], 4)
finite = st.floats(allow_nan=False, allow_infinity=False, width=32)


@pytest.mark.parametrize("build,param", [
    (lambda: timing.ShiftedExponential(float("nan"), 1.0), "shift"),
    (lambda: timing.ShiftedExponential(1.0, float("inf")), "rate"),
    (lambda: timing.Failures(p=1.5), "p"),
    (lambda: timing.GilbertElliott(p_slow=2.0), "p_slow"),
    (lambda: timing.GilbertElliott(p_slow=0.0, p_recover=0.0), "p_recover"),
    (lambda: timing.Slowdown(fraction=-0.1), "fraction"),
    (lambda: timing.Slowdown(base=3.0), "base"),
    (lambda: timing.FixedSlowdown(workers=(0, -1)), "workers"),
    (lambda: timing.Pareto(alpha=0.0), "alpha"),
    (lambda: timing.TraceReplay("alibaba_pai_job1", noise=timing.Pareto(1.0, 0.5)), "alpha"),
    (lambda: timing.get_model("slowdown", bogus=1.0), "bogus"),
    (lambda: timing.get_model("weibull"), "name"),
    (lambda: timing.get_model("pareto", failure_prob=-0.5), "failure_prob"),
])
def test_bad_model_fails_when_built_naming_the_param(build, param):
  with pytest.raises(ParamError) as e:
    build()
  assert e.value.param == param and isinstance(e.value, ValueError)


def test_param_error_survives_pickling():
  e = pickle.loads(pickle.dumps(ParamError("rate=0 must be > 0.", "rate")))
  assert isinstance(e, ParamError) and e.param == "rate" and str(e) == "rate=0 must be > 0."


@HYP
@given(shift=st.floats(0, 1e3), rate=st.floats(1e-3, 1e3), fraction=st.floats(0, 1),
       factor=st.floats(1, 1e3), p=st.floats(0, 1), p_slow=st.floats(0, 1),
       p_recover=st.floats(1e-6, 1))
def test_any_valid_parameters_build_and_sample_times(shift, rate, fraction, factor, p, p_slow,
                                                     p_recover):
  base = timing.ShiftedExponential(shift, rate)
  key = jax.random.PRNGKey(0)
  for model in [base, timing.Slowdown(base, fraction, factor), timing.Failures(base, p),
                timing.GilbertElliott(base, p_slow, p_recover, factor),
                timing.FixedSlowdown(base, (1, 3), factor)]:
    tau = np.asarray(model.sample(key, ASG4, (2,)))
    assert tau.shape == (2, 4, 3) and not np.isnan(tau).any() and (tau >= 0).all(), model
    assert np.isinf(tau[:, ~ASG4.slot_mask]).all()


_VALID = dict(shift=1.0, rate=1.0, fraction=0.2, factor=5.0, p=0.1, p_slow=0.1, p_recover=0.1)
_OK = dict(shift=lambda v: v >= 0, rate=lambda v: v > 0, fraction=lambda v: 0 <= v <= 1,
           factor=lambda v: v >= 1, p=lambda v: 0 <= v <= 1, p_slow=lambda v: 0 <= v <= 1,
           p_recover=lambda v: 0 <= v <= 1)


def _build(params):
  base = timing.ShiftedExponential(params["shift"], params["rate"])
  return [timing.Slowdown(base, params["fraction"], params["factor"]),
          timing.Failures(base, params["p"]),
          timing.GilbertElliott(base, params["p_slow"], params["p_recover"], params["factor"])]


@HYP
@given(param=st.sampled_from(sorted(_VALID)),
       value=st.one_of(finite, st.sampled_from([math.nan, math.inf, -math.inf])))
def test_any_invalid_parameter_raises_param_error_naming_it(param, value):
  params = dict(_VALID, **{param: value})
  if math.isfinite(value) and _OK[param](value):
    assert len(_build(params)) == 3
    return
  with pytest.raises(ParamError) as e:
    _build(params)
  assert e.value.param == param and param in str(e.value)


def test_models_are_hashable_values_and_static_jit_arguments():
  a, b = timing.get_model("slowdown"), timing.Slowdown(timing.ShiftedExponential(1, 1), 0.2, 5)
  assert a == b and hash(a) == hash(b) and a != timing.Slowdown(fraction=0.3)
  assert hash(timing.FixedSlowdown(workers=[0, 1])) == hash(timing.FixedSlowdown(workers=(0, 1)))
  f = jax.jit(lambda model, key: model.sample(key, ASG4), static_argnums=0)
  np.testing.assert_array_equal(f(a, jax.random.PRNGKey(1)), f(b, jax.random.PRNGKey(1)))
  assert f._cache_size() == 1                   # equal models share one compilation


def test_models_built_inside_jit_skip_the_check_on_tracers():
  @jax.jit
  def draw(rate, key):
    return timing.ShiftedExponential(1.0, rate).sample(key, ASG4)
  assert draw(2.0, jax.random.PRNGKey(0)).shape == (4, 3)


def test_old_names_still_importable():
  old = ["ShiftedExponential", "Pareto", "Slowdown", "Failures", "FixedSlowdown",
         "GilbertElliott", "TraceReplay", "TRACES", "load_trace", "get_straggler_model",
         "get_model", "MODEL_PARAMS", "check_model", "finish_times", "progress",
         "worker_finish_times", "oracle_time", "kth_smallest", "check_durations",
         "event_loop_completion_time", "init_state", "sample_step", "sample_steps"]
  assert all(hasattr(timing, n) for n in old)
  with pytest.warns(DeprecationWarning, match="RecordedDurations"):
    assert timing.Trace is timing.RecordedDurations
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    from jaxgc.timing import RecordedDurations, ShiftedExponential  # noqa: F401
  assert timing.ShiftedExponential(2.0, 4.0).mean == 2.25
  assert timing.check_model(timing.get_model("gilbert_elliott")) is not None


def test_every_registered_model_builds_from_its_defaults():
  assert set(timing.MODEL_PARAMS) == set(timing.STRAGGLER_MODELS.names())
  for name in timing.STRAGGLER_MODELS:
    model = timing.get_straggler_model(name)
    assert isinstance(model, timing.StragglerModel), name
    assert timing.check_model(model) is model

"""GraphCode: optimal least-squares decoding, the spectral bound, exactness, completion time."""
import functools

import hypothesis.strategies as st
import jax
import numpy as np
import pytest
from helpers import random_lists
from hypothesis import HealthCheck, given, settings

import jaxgc
from jaxgc import assignments, spectral, timing
from jaxgc.protocols import GraphCode, get_protocol
from jaxgc.protocols.graph_code import decoding_error

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def numpy_optimum(asg, done):
  """``α = B_F w`` with numpy's float64 least squares, and ``‖α − 1‖²``."""
  b = asg.biadjacency.T.astype(np.float64)[:, done]
  w = np.linalg.lstsq(b, np.ones(asg.num_chunks), rcond=None)[0] if done.any() else np.zeros(0)
  alpha = b @ w
  return alpha, float(np.sum((alpha - 1) ** 2))


# A few fixed assignments, so that each compiles once and hypothesis varies the state.
ASSIGNMENTS = [assignments.cyclic(7, 3), assignments.random_regular(10, 3, seed=2),
               assignments.fractional_repetition(6, 2),
               random_lists(np.random.default_rng(3), 6, 9, min_rep=1)]


@functools.cache
def checked(index):
  """The protocol and one jitted function returning everything the property test compares."""
  proto = GraphCode(ASSIGNMENTS[index])
  asg = proto.assignment

  @jax.jit
  def run(counts, g):
    c = proto.solve(counts)
    est = jaxgc.decode(jaxgc.encode(g[np.maximum(asg.order, 0)], c.enc), c.dec, g.shape[1])
    return dict(alpha=proto.chunk_weights(counts), err=proto.optimal_error(counts), est=est,
                metric=decoding_error(proto, counts), fast=proto.decoding_error(counts),
                decodable=proto.is_decodable(counts), senders=c.senders, enc=c.enc, dec=c.dec,
                condition=c.condition)
  return proto, run


@SETTINGS
@given(st.integers(0, len(ASSIGNMENTS) - 1), st.integers(0, 2**31 - 1))
def test_decode_is_numpys_least_squares_optimum(index, seed):
  proto, run = checked(index)
  asg, rng = proto.assignment, np.random.default_rng(seed)
  counts = np.where(rng.random(asg.num_workers) < rng.random(), asg.loads,
                    rng.integers(0, asg.loads + 1))
  done = counts >= asg.loads
  alpha, err = numpy_optimum(asg, done)
  g = rng.standard_normal((asg.num_chunks, 3)).astype(np.float32)
  out = jax.tree.map(np.asarray, run(counts, g))
  np.testing.assert_allclose(out["alpha"], alpha, atol=2e-5)
  np.testing.assert_allclose(out["err"], err, atol=1e-5, rtol=1e-5)
  # Encoding and decoding actual gradients gives Σ α_i g_i, and the generic metric
  # from the coefficients equals the closed form.
  np.testing.assert_allclose(out["est"], alpha @ g, atol=1e-4 * (1 + np.abs(g).sum()))
  np.testing.assert_allclose(out["metric"], out["fast"], atol=1e-6, rtol=1e-4)
  np.testing.assert_allclose(out["fast"], err / asg.num_chunks, atol=1e-6, rtol=1e-4)
  assert bool(out["decodable"]) == (err < 1e-9)
  assert np.array_equal(out["senders"], done) and np.isfinite(out["condition"])
  assert np.all(out["dec"][0, ~done] == 0)      # exactly: a silent worker's message is never used
  assert np.all(out["enc"][~done] == 0) and np.all(out["enc"][done][asg.slot_mask[done]] == 1)


@pytest.mark.parametrize("m,load", [(12, 3), (20, 4), (40, 6)])
def test_optimal_error_obeys_raviv_bound(m, load):
  asg = assignments.random_regular(m, load, seed=m)
  proto = GraphCode(asg)
  rng = np.random.default_rng(m)
  stragglers = rng.integers(1, m // 2 + 1, size=32)
  counts = np.full((32, m), load)
  for row, s in zip(counts, stragglers, strict=True):
    row[rng.choice(m, s, replace=False)] = 0
  err = np.sqrt(np.asarray(jax.jit(proto.optimal_error)(counts)))
  bound = spectral.raviv_bound(asg, stragglers)
  assert np.all(err <= bound + 1e-5), (err - bound).max()
  assert spectral.second_singular_ratio(asg) < 1


def test_raviv_bound_matches_issue_case():
  # n = 60, load 8, 20 stragglers: the bound quoted in issue #15 is 3.41.
  asg = assignments.random_regular(60, 8, seed=0)
  assert abs(float(spectral.raviv_bound(asg, 20)) - 3.41) < 0.05


def test_expander_is_ramanujan_and_regular():
  asg = assignments.expander(20, 4, seed=0)
  assert (asg.loads == 4).all() and (asg.replication == 4).all()
  assert spectral.second_singular_ratio(asg) < 2 * np.sqrt(3) / 4
  with pytest.raises(ValueError, match="even load"):
    assignments.expander(20, 3)


def test_frc_exact_with_one_finisher_per_group():
  asg = assignments.fractional_repetition(12, 3)
  proto = GraphCode(asg)
  rng = np.random.default_rng(0)
  g = rng.standard_normal((12, 5)).astype(np.float32)

  @jax.jit
  def run(counts):
    est = jaxgc.protocols.estimate(proto, g[asg.order], counts)
    return est, proto.is_decodable(counts), proto.optimal_error(counts)
  for _ in range(5):
    counts = rng.integers(0, 3, size=12)          # nobody finished ...
    for grp in range(4):                          # ... except one worker per group
      counts[grp * 3 + rng.integers(3)] = 3
    est, ok, _ = run(counts)
    assert bool(ok)
    np.testing.assert_allclose(np.asarray(est), g.sum(0), rtol=1e-5, atol=1e-5)
  counts[:3] = 0                                  # group 0 lost: its 3 chunks get weight 0
  _, ok, err = run(counts)
  assert not bool(ok)
  np.testing.assert_allclose(float(err), 3.0, rtol=1e-5)


@pytest.mark.parametrize("asg", [assignments.cyclic(8, 3), assignments.random_regular(9, 2, seed=1),
                                 assignments.fractional_repetition(8, 2),
                                 assignments.from_lists([[0, 1], [1, 2], [2], [0]], 3)],
                         ids=["cyclic", "regular", "frc", "lists"])
def test_completion_time_equals_event_loop(asg):
  proto = GraphCode(asg)
  rng = np.random.default_rng(asg.num_workers)
  tau = 1 + rng.exponential(size=(25, *asg.order.shape))       # 1 + Exp(1), 25% of workers fail
  tau = np.where(asg.slot_mask & (rng.random((25, asg.num_workers, 1)) > 0.25), tau, np.inf)
  fast = np.asarray(jax.jit(proto.completion_time)(tau))
  # Brute force on both sides: every chunk event, and numpy's float64 least squares.
  is_dec = lambda k: numpy_optimum(asg, k >= asg.loads)[1] < 1e-9
  slow = np.array([timing.event_loop_completion_time(t, is_dec) for t in np.asarray(tau)])
  np.testing.assert_array_equal(np.isinf(fast), np.isinf(slow))
  np.testing.assert_allclose(fast[np.isfinite(fast)], slow[np.isfinite(slow)], rtol=1e-6)
  assert np.isinf(slow).any() and np.isfinite(slow).any()


def test_solve_is_jittable_and_registered():
  asg = assignments.cyclic(6, 2)
  proto = get_protocol("graph_code", asg)
  assert isinstance(proto, GraphCode) and getattr(proto, "has_exact_mode", True)
  counts = np.array([2, 2, 0, 2, 1, 2])
  c = jax.jit(proto.solve)(counts)
  b = asg.biadjacency.T.astype(np.float64)
  done = counts == 2
  w = np.linalg.lstsq(b[:, done], np.ones(6), rcond=None)[0]   # the minimum-norm weights
  np.testing.assert_allclose(np.asarray(c.dec)[0, done], w, atol=1e-5)
  assert np.all(np.asarray(c.dec)[0, ~done] == 0)
  assert c.enc.shape == (6, 2, 1) and c.dec.shape == (1, 6)


@pytest.mark.parametrize("ell", [2, 3])
def test_ell_above_one_names_the_alternatives(ell):
  with pytest.raises(ValueError, match="partial_straggler.*original"):
    GraphCode(assignments.cyclic(6, 3), ell)
  with pytest.raises(ValueError, match="ell must be 1"):
    get_protocol("graph_code", assignments.cyclic(6, 3), ell=ell)


def test_unknown_option_is_refused():
  with pytest.raises(ValueError, match="unknown option"):
    get_protocol("graph_code", assignments.cyclic(6, 3), construction="frc")

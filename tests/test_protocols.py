"""Exactness, deadline-mode error, baselines and bad inputs of the protocols."""
import functools
import itertools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_lists
from hypothesis import HealthCheck, given, settings

import jaxgc
from jaxgc import assignments

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rel_err(est, g):
  return float(np.linalg.norm(np.asarray(est) - g) / np.linalg.norm(g))


def roundtrip(proto, chunk_grads, counts, d):
  enc, dec = proto.coefficients(counts)
  return jaxgc.decode(jaxgc.encode(chunk_grads, enc), dec, d)


def make_decodable(proto, counts, rng):
  """Raises random workers' counts until the state is decodable."""
  counts = counts.copy()
  loads = proto.assignment.loads
  while not bool(proto.is_decodable(counts)):
    j = rng.choice(np.nonzero(counts < loads)[0])
    counts[j] += 1
  return counts


def edge_loads(m):
  """Loads 1, 2, m - 1 and m of m workers: the extremes and their neighbours."""
  return st.sampled_from(sorted({1, min(2, m), max(m - 1, 1), m}))


@functools.cache
def assignment(kind, m, k, seed, n_chunks=0):
  """The assignment of a drawn spec, built once per spec."""
  if kind == "cyclic":
    return assignments.cyclic(m, k)
  if kind == "frc":
    return assignments.fractional_repetition(m, k)
  if kind == "regular":
    return assignments.random_regular(m, k, seed=seed)
  return random_lists(np.random.default_rng(seed), m, n_chunks, min_rep=k)


@functools.cache
def partial_straggler(spec, ell):
  """One protocol per (spec, ell): each instance compiles its solve once (about a second)."""
  return jaxgc.PartialStraggler(assignment(*spec), ell)


@st.composite
def instances(draw):
  """A protocol, a gradient width and a random generator for the data and the state.

  Every new protocol instance or shape is a JIT compile, so assignment sizes and seeds
  come from small sets that include the edge cases (load 1, full replication) and
  repeat across examples, where a cached protocol is reused; data and states vary freely."""
  kind = draw(st.sampled_from(["cyclic", "frc", "regular", "lists"]))
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  seed = draw(st.integers(0, 2))
  if kind == "cyclic":
    m = draw(st.sampled_from([2, 3, 5, 12]))
    spec = (kind, m, draw(edge_loads(m)), 0)
  elif kind == "frc":
    load = draw(st.integers(1, 4))
    spec = (kind, load * draw(st.integers(1, 3)), load, 0)
  elif kind == "regular":
    m = draw(st.sampled_from([3, 5, 12]))
    spec = (kind, m, draw(edge_loads(m)), seed)
  else:
    m = draw(st.sampled_from([2, 5, 8]))
    spec = (kind, m, draw(edge_loads(m)), seed, draw(st.sampled_from([1, 3, 8])))
  ell = draw(st.integers(1, int(assignment(*spec).replication.min())))
  d = draw(st.sampled_from([1, 7, 40]))
  return partial_straggler(spec, ell), d, rng


@SETTINGS
@given(instances())
def test_partial_straggler_exact_whenever_coverage_reaches_ell(inst):
  proto, d, rng = inst
  asg = proto.assignment
  g = rng.standard_normal((asg.num_chunks, d)).astype(np.float32)
  chunk_grads = g[np.maximum(asg.order, 0)]
  counts = make_decodable(proto, rng.integers(0, asg.loads + 1), rng)
  enc, dec = proto.coefficients(counts)
  est = encode_decode(jnp.asarray(chunk_grads), enc, dec, d)
  assert rel_err(est, g.sum(0)) < 1e-4


@functools.partial(jax.jit, static_argnums=3)
def encode_decode(chunk_grads, enc, dec, d):
  """One compiled program per shape: eagerly, each of encode's many small ops compiles."""
  return jaxgc.decode(jaxgc.encode(chunk_grads, enc), dec, d)


@SETTINGS
@given(instances())
def test_encoding_zero_on_unfinished_slots(inst):
  proto, _, rng = inst
  asg, ell = proto.assignment, proto.ell
  counts = rng.integers(0, asg.loads + 1)
  enc = np.asarray(proto.encoding(counts))
  assert enc.shape == (asg.num_workers, asg.max_load, ell)
  unfinished = np.arange(asg.max_load)[None] >= counts[:, None]
  assert np.all(enc[unfinished] == 0)
  assert np.asarray(proto.decoding(counts)).shape == (ell, asg.num_workers)


def test_unfinished_nan_gradients_do_not_leak():
  asg = assignments.cyclic(4, 2)
  proto = jaxgc.PartialStraggler(asg, 1)
  counts = np.array([2, 1, 2, 1])
  g = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
  chunk_grads = g[asg.order].copy()
  chunk_grads[1, 1] = np.nan                      # unfinished slot
  est = roundtrip(proto, chunk_grads, counts, 5)
  np.testing.assert_allclose(est, g.sum(0), rtol=1e-5, atol=1e-5)


@st.composite
def two_row_states(draw):
  """A ∈ R^{2×m} (generic, nearly parallel rows, equal-norm orthogonal rows) and a state."""
  m = draw(st.sampled_from([1, 2, 3, 7, 24]))    # a few shapes: each new one compiles
  n = draw(st.sampled_from([1, 12]))
  seed = draw(st.integers(0, 2**31 - 1))
  kind = draw(st.sampled_from(["generic", "near_parallel", "orthogonal", "parallel"]))
  rng = np.random.default_rng(seed)
  a = rng.standard_normal((2, m))
  if kind == "near_parallel":
    a[1] = a[0] + 10.0 ** rng.uniform(-3, -1) * rng.standard_normal(m)
  elif kind == "parallel":
    a[1] = 2 * a[0]
  elif kind == "orthogonal" and m >= 2:
    q, _ = np.linalg.qr(rng.standard_normal((m, 2)))
    a = q.T * 3.0                                  # equal norms, zero inner product
  fin = rng.random((m, n)) < rng.uniform(0, 1)
  return a.astype(np.float32), fin


@SETTINGS
@given(two_row_states())
def test_two_column_closed_form_matches_lapack(inst):
  """ℓ = 2 solves by one Jacobi rotation; it must agree with numpy's SVD / pinv."""
  from jaxgc.protocols import partial_straggler
  a, fin = inst
  a64 = a.astype(np.float64)
  rcond = 1e-4
  b, cond = partial_straggler.min_norm_solve(jnp.asarray(a), jnp.asarray(fin), rcond)
  got_cond = np.asarray(partial_straggler.condition_numbers(jnp.asarray(a), jnp.asarray(fin)))
  b = np.asarray(b, np.float64)
  for i in range(fin.shape[1]):
    a_s = a64 * fin[:, i]
    sv = np.pad(np.linalg.svd(a_s, compute_uv=False), (0, 1))[:2]   # m = 1 has one
    if sv[0] > 0 and 1e-5 < sv[1] / sv[0] < 1e-3:
      continue                                     # rank depends on the rounding near rcond
    rank = int(np.sum(sv > rcond * sv[0]))
    if rank == 0:
      np.testing.assert_array_equal(b[i], 0)
      continue
    want = sv[0] / sv[min(fin[:, i].sum(), 2) - 1]
    if rank == 2:
      # Exact recovery A_S B_i = I, to within round-off amplified by cond (as LAPACK's).
      eps = np.finfo(np.float32).eps
      assert np.abs(a_s @ b[i] - np.eye(2)).max() < 50 * eps * want
      np.testing.assert_allclose([got_cond[i], float(cond[i])], want, rtol=1e-5 + 10 * eps * want)
    else:
      # Rank one: B_i = pinv(A_S), and A_S B_i is the projector onto A_S's range.
      want_b = np.linalg.pinv(a_s, rcond=rcond)
      np.testing.assert_allclose(b[i], want_b, atol=1e-5 * np.abs(want_b).max() + 1e-7)


@pytest.mark.parametrize("unroll", [64, 0])   # the fused unrolled sum and the masked einsum
@pytest.mark.parametrize("ell,d", [(1, 7), (2, 7), (3, 10)])
def test_encode_matches_direct_sum(monkeypatch, unroll, ell, d):
  """z_j = Σ_t Σ_k enc[j,t,k] g_{order[j,t]}^(k), computed directly; NaN in unused slots
  stays out."""
  from jaxgc.protocols import base
  monkeypatch.setattr(base, "UNROLL_LIMIT", unroll)
  rng = np.random.default_rng(ell * 100 + d)
  m, load = 5, 3
  grads = rng.standard_normal((m, load, d)).astype(np.float32)
  enc = rng.standard_normal((m, load, ell)).astype(np.float32)
  enc[:, -1] = 0                                  # last slot unused by every worker
  grads[:, -1] = np.nan
  b = -(-d // ell)
  padded = np.zeros((m, load, ell * b), np.float32)
  padded[..., :d] = np.nan_to_num(grads)
  want = np.einsum("jtk,jtkb->jb", enc, padded.reshape(m, load, ell, b))
  got = np.asarray(jaxgc.encode(grads, enc))
  assert got.shape == (m, b)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ell,lost", [(2, 1), (3, 2), (4, 3)])
def test_deadline_mse_matches_formula(ell, lost):
  """E‖ĝ − g‖² = σ² (d/ℓ) Σ_i max(0, ℓ − c_i) for isotropic chunk gradients."""
  m, load, d, trials, sigma = 8, 4, 4000, 30, 1.5
  asg = assignments.cyclic(m, load)
  proto = jaxgc.PartialStraggler(asg, ell)
  counts = np.array([4, 4, 4, 4, 4, 4, 4, 4])
  # worker 0..lost-1 stop early: some chunks end below ell
  counts[:4] = [1, 0, 2, 1]
  cov = np.asarray(proto.coverage(counts))
  expected = float(jaxgc.expected_mse(cov, ell, d, sigma**2))
  assert expected > 0
  f = jax.jit(lambda gr: roundtrip(proto, gr[asg.order], counts, d))
  key = jax.random.PRNGKey(0)
  errs = []
  for t in range(trials):
    g = sigma * jax.random.normal(jax.random.fold_in(key, t), (m, d))
    errs.append(float(jnp.sum((f(g) - g.sum(0)) ** 2)))
  errs = np.array(errs)
  stderr = errs.std(ddof=1) / np.sqrt(trials)
  assert abs(errs.mean() - expected) < 4 * stderr + 1e-3 * expected, (errs.mean(), expected)


def test_deadline_loses_uncovered_chunks_entirely():
  asg = assignments.cyclic(4, 2)
  proto = jaxgc.PartialStraggler(asg, 1)
  counts = np.array([0, 2, 0, 1])   # chunk 0: held by 0 (slot0) and 3 (slot1) -> c=0
  assert int(proto.coverage(counts)[0]) == 0
  g = np.eye(4, dtype=np.float32)
  est = np.asarray(roundtrip(proto, g[asg.order], counts, 4))
  np.testing.assert_allclose(est, [0, 1, 1, 1], atol=1e-6)


@pytest.mark.parametrize("ell", [1, 2])
def test_condition_number_reported(ell):
  asg = assignments.cyclic(10, 4)
  proto = jaxgc.PartialStraggler(asg, ell)
  kappa = float(proto.condition_number(np.full(10, 4)))
  assert 1.0 <= kappa < 1e3
  if ell == 1:
    assert kappa == pytest.approx(1.0)


def test_candidates_pick_best_conditioned():
  asg = assignments.cyclic(16, 4)
  counts = make_decodable(jaxgc.PartialStraggler(asg, 3), np.zeros(16, int),
                          np.random.default_rng(1))
  one = jaxgc.PartialStraggler(asg, 3, num_candidates=1, decoding_matrix="gaussian")
  many = jaxgc.PartialStraggler(asg, 3, num_candidates=16, decoding_matrix="gaussian")
  assert float(many.condition_number(counts)) <= float(one.condition_number(counts)) + 1e-3


# -- the original class -------------------------------------------------------

@pytest.mark.parametrize("asg,ell,construction", [
    (assignments.cyclic(6, 3), 1, "tandon"),
    (assignments.cyclic(6, 3), 2, "polynomial"),
    (assignments.cyclic(6, 3), 3, "polynomial"),
    (assignments.cyclic(7, 4), 1, "polynomial"),
    (assignments.fractional_repetition(6, 3), 1, "frc"),
    (assignments.random_regular(7, 3, seed=2), 1, "tandon"),
    (assignments.random_regular(7, 3, seed=2), 2, "polynomial"),
])
def test_original_decodes_from_every_set_of_m_minus_s(asg, ell, construction):
  proto = jaxgc.Original(asg, ell, construction=construction)
  assert proto.construction == construction
  m, d = asg.num_workers, 7
  g = np.random.default_rng(0).standard_normal((asg.num_chunks, d)).astype(np.float32)
  f = jax.jit(lambda c: roundtrip(proto, g[asg.order], c, d))
  n = proto.threshold
  for done in itertools.combinations(range(m), n):
    counts = np.zeros(m, int)
    counts[list(done)] = asg.loads[list(done)]
    assert bool(proto.is_decodable(counts)) or construction == "frc"
    if construction == "frc" and not bool(proto.is_decodable(counts)):
      continue
    assert rel_err(f(counts), g.sum(0)) < 1e-3, done


def test_tandon_float32_is_exact_at_paper_scale():
  """m = 20, load 4, s = 3: every one of the C(20, 3) finisher sets decodes in float32.

  Regression: pinv's default cutoff dropped a genuine singular value of B_F and
  turned exact decodes into O(1) errors, and an unlucky random H had cond(B_F) ~ 3e7.
  """
  asg = assignments.cyclic(20, 4)
  proto = jaxgc.Original(asg, 1, construction="tandon")
  d = 8
  g = np.random.default_rng(0).standard_normal((20, d)).astype(np.float32)
  sets = np.array(list(itertools.combinations(range(20), 3)))
  counts = np.tile(asg.loads, (len(sets), 1))
  counts[np.arange(len(sets))[:, None], sets] = 0
  out = jax.jit(jax.vmap(lambda c: roundtrip(proto, g[asg.order], c, d)))(counts)
  err = np.linalg.norm(np.asarray(out) - g.sum(0), axis=-1) / np.linalg.norm(g.sum(0))
  assert err.max() < 1e-3, (err.max(), sets[err.argmax()])


def test_frc_needs_one_worker_per_group():
  asg = assignments.fractional_repetition(6, 3)
  proto = jaxgc.Original(asg, 1)
  assert proto.construction == "frc"
  assert bool(proto.is_decodable(np.array([3, 0, 0, 0, 0, 3])))
  assert not bool(proto.is_decodable(np.array([3, 3, 0, 0, 0, 0])))


def test_original_deadline_is_optimal_least_squares():
  """Below the threshold the decoder minimises ‖dec·M_F − E‖ over all decoders."""
  asg = assignments.cyclic(6, 3)
  proto = jaxgc.Original(asg, 2)
  counts = np.array([3, 0, 0, 3, 3, 0])
  enc, dec = map(np.asarray, proto.coefficients(counts))
  m_f = np.zeros((6, 6, 2))
  for j in range(6):
    for t, i in enumerate(asg.order[j]):
      m_f[j, i] = enc[j, t]
  target = np.tile(np.eye(2)[:, None, :], (1, 6, 1)).reshape(2, -1)
  best = target @ np.linalg.pinv(m_f.reshape(6, -1))
  resid = lambda a: np.linalg.norm(a @ m_f.reshape(6, -1) - target)
  assert resid(dec) <= resid(best) + 1e-4


def test_polynomial_code_is_unstable_partial_straggler_is_not():
  """PROTOCOL.md §8: the Vandermonde decode breaks down with m; ours does not."""
  asg = assignments.cyclic(32, 4)
  g = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)
  poly = jaxgc.Original(asg, 2)
  counts = np.full(32, 4)
  counts[:poly.straggler_tolerance] = 0
  assert rel_err(roundtrip(poly, g[asg.order], counts, 16), g.sum(0)) > 1e-2
  partial = jaxgc.PartialStraggler(asg, 2)
  assert rel_err(roundtrip(partial, g[asg.order], counts, 16), g.sum(0)) < 1e-5


# -- uncoded references --------------------------------------------------------

def test_uncoded_computes_each_chunk_once():
  asg = assignments.cyclic(5, 3)
  proto = jaxgc.Uncoded(asg)
  assert proto.designated[:, 0].all() and not proto.designated[:, 1:].any()
  g = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
  np.testing.assert_allclose(roundtrip(proto, g[asg.order], np.ones(5, int), 4), g.sum(0),
                             rtol=1e-5)
  assert not bool(proto.is_decodable(np.array([1, 1, 0, 1, 1])))


def test_ignore_stragglers_rescales():
  asg = assignments.cyclic(4, 1)
  g = np.ones((4, 3), np.float32)
  counts = np.array([1, 0, 1, 1])
  np.testing.assert_allclose(roundtrip(jaxgc.IgnoreStragglers(asg), g[asg.order], counts, 3),
                             4.0, rtol=1e-6)
  np.testing.assert_allclose(
      roundtrip(jaxgc.IgnoreStragglers(asg, rescale=False), g[asg.order], counts, 3), 3.0,
      rtol=1e-6)


# -- bad input -----------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
  asg = assignments.cyclic(4, 2)
  proto = jaxgc.PartialStraggler(asg, 2)
  with pytest.raises(ValueError, match="0 <= k_j <= load_j"):
    proto.encoding(np.array([3, 0, 0, 0]))
  with pytest.raises(ValueError, match=r"must have shape \[num_workers\] = \[4\]"):
    proto.encoding(np.array([1, 1, 1]))
  with pytest.raises(ValueError, match="do not match"):
    jaxgc.encode(np.zeros((4, 2, 5)), np.zeros((4, 3, 2)))
  with pytest.raises(ValueError, match="ceil"):
    jaxgc.decode(np.zeros((4, 3)), np.zeros((2, 4)), 10)
  with pytest.raises(ValueError, match="do not match"):
    jaxgc.decode(np.zeros((4, 3)), np.zeros((2, 5)), 6)
  with pytest.raises(ValueError, match="decoding_matrix"):
    jaxgc.PartialStraggler(asg, 2, decoding_matrix="hadamard")
  with pytest.raises(ValueError, match="only works for ell=1"):
    jaxgc.PartialStraggler(asg, 2, decoding_matrix="ones")
  with pytest.raises(ValueError, match=r"\[ell, m\]"):
    jaxgc.PartialStraggler(asg, 2, decoding_matrix=np.ones((3, 4)))
  with pytest.raises(ValueError, match="x64"):
    jaxgc.PartialStraggler(asg, 1, dtype=jnp.float64)
  with pytest.raises(ValueError, match="same number of workers"):
    jaxgc.Original(assignments.from_lists([[0, 1], [1], [1]], 2), 1)
  with pytest.raises(ValueError, match="polynomial"):
    jaxgc.Original(asg, 2, construction="tandon")
  with pytest.raises(ValueError, match="construction"):
    jaxgc.Original(asg, 1, construction="lagrange")
  with pytest.raises(ValueError, match="unknown protocol"):
    jaxgc.get_protocol("partial", asg)
  with pytest.raises(TypeError, match="Assignment"):
    jaxgc.PartialStraggler(np.zeros((4, 2), int), 1)


def test_protocols_jit_and_vmap_over_states():
  asg = assignments.cyclic(6, 3)
  proto = jaxgc.PartialStraggler(asg, 2)
  states = jnp.array([[3] * 6, [1, 2, 3, 1, 2, 3]])
  enc, dec = jax.jit(jax.vmap(proto.coefficients))(states)
  assert enc.shape == (2, 6, 3, 2) and dec.shape == (2, 2, 6)
  np.testing.assert_allclose(enc[0], proto.encoding(np.array([3] * 6)), rtol=1e-5, atol=1e-6)


def test_condition_number_counts_nearly_singular_subsets():
  """A small singular value shows in the condition number (regression); one below
  the solve's rank threshold is refused at construction (tests/test_validation.py)."""
  asg = assignments.cyclic(3, 2)        # chunk 1 is held by workers 0 and 1
  a = np.array([[1.0, 1.0, 0.0], [0.0, 1e-5, 1.0]])
  proto = jaxgc.PartialStraggler(asg, 2, decoding_matrix=a)
  counts = np.array([2, 1, 0])          # S_1 = {0, 1}: nearly parallel columns, cond ≈ 2e5
  assert float(proto.condition_number(counts)) > 1e5
  assert float(proto.solve(counts).condition) > 1e5


# -- the shared interface: one solve, the stop rule, the estimate --------------

def test_stop_time_rule():
  asg = assignments.cyclic(4, 2)          # chunk i held by workers i-1, i
  proto = jaxgc.PartialStraggler(asg, 2)
  ok = np.array([[1.0, 2.0], [1.0, 1.0], [3.0, 1.0], [2.0, 2.0]])
  t_ok = float(proto.completion_time(ok))
  assert t_ok == 4.0                       # worker 3 finishes chunk 0 (its slot 1) last
  dead = ok.copy()
  dead[0] = np.inf                         # chunks 0 and 1 can never reach coverage 2
  everything_dead = np.full((4, 2), np.inf)
  tau = np.stack([ok, dead, everything_dead])
  stop = np.asarray(jaxgc.stop_time(proto, tau))
  # Never decodable: the last finite finish time (worker 2: 3 + 1), else 0.
  np.testing.assert_array_equal(stop, [t_ok, 4.0, 0.0])
  np.testing.assert_array_equal(jaxgc.stop_time(proto, tau, timeout=9.0), [t_ok, 9.0, 9.0])
  np.testing.assert_array_equal(jaxgc.stop_time(proto, tau, "deadline", deadline=2.5),
                                [2.5, 2.5, 2.5])
  np.testing.assert_array_equal(jaxgc.stop_time(proto, tau, "deadline", deadline=7.0),
                                [t_ok, 7.0, 7.0])
  jitted = jax.jit(lambda t: jaxgc.stop_time(proto, t, timeout=9.0))(tau)
  np.testing.assert_array_equal(jitted, [t_ok, 9.0, 9.0])


@pytest.mark.parametrize("name,ell,tol", [("partial_straggler", 2, 1e-5), ("original", 1, 1e-4),
                                          ("uncoded", 2, 1e-6)])
def test_estimate_at_the_stop_time_is_the_gradient_sum(name, ell, tol):
  asg = assignments.cyclic(6, 3)
  proto = jaxgc.get_protocol(name, asg, ell)
  rng = np.random.default_rng(3)
  g = rng.standard_normal((6, 11)).astype(np.float32)
  tau = rng.exponential(size=(6, 3)) + 1.0
  counts = timing_progress(tau, jaxgc.stop_time(proto, tau))
  assert bool(proto.is_decodable(counts))
  chunk_grads = np.where(asg.finished_slots(counts)[..., None], g[asg.order], np.nan)
  est = jax.jit(lambda x, k: jaxgc.estimate(proto, x, k))(chunk_grads, counts)
  assert rel_err(est, g.sum(0)) < tol


def timing_progress(tau, t):
  return np.asarray(jaxgc.timing.progress(tau, t))


@pytest.mark.parametrize("name", sorted(jaxgc.protocols.PROTOCOLS))
def test_solve_is_the_one_source_of_coefficients(name):
  asg = assignments.cyclic(6, 3)
  proto = jaxgc.get_protocol(name, asg, 2 if name in ("partial_straggler", "original") else 1)
  assert proto.has_exact_mode == (name != "ignore_stragglers")
  assert proto.reports_condition == (name in ("partial_straggler", "graph_code"))
  states = np.random.default_rng(0).integers(0, 4, (8, 6))
  c = jax.jit(jax.vmap(proto.solve))(states)
  assert isinstance(c, jaxgc.Coefficients) and c.senders.dtype == jnp.bool_
  # Whoever has a coefficient sends (so a non-sender's garbage cannot leak into
  # the decode); nobody sends before finishing a chunk.
  sends = np.asarray(c.senders)
  assert not np.any(np.any(np.asarray(c.enc) != 0, axis=(2, 3)) & ~sends)
  assert not np.any(np.any(np.asarray(c.dec) != 0, axis=1) & ~sends)
  assert not np.any(sends & (states == 0))
  if not proto.reports_condition:
    np.testing.assert_array_equal(c.condition, 1.0)


@pytest.mark.parametrize("make", [
    lambda a: jaxgc.PartialStraggler(a, 2), lambda a: jaxgc.Original(a, 2),
    lambda a: jaxgc.Uncoded(a), lambda a: jaxgc.GraphCode(a)])
def test_protocols_of_one_shape_share_one_compiled_solve(make):
  """The assignment's and the protocol's arrays are arguments of the compiled solve, not
  constants: a second protocol of the same class and shape (another order) reuses the first
  one's program, and its coefficients equal those of a program compiled for it alone."""
  from jaxgc.protocols import base
  asg = assignments.cyclic(7, 3)
  other = asg.with_order(np.array([np.roll(row, 1) for row in asg.order]))
  first, second = make(asg), make(other)
  counts = np.array([3, 1, 2, 0, 3, 2, 1])
  first.coefficients(counts), first.condition_number(counts)
  compiled = base._shared_call._cache_size()
  for proto in (first, second):
    enc, dec = proto.coefficients(counts)
    own = jax.jit(proto.solve)(jnp.asarray(counts, jnp.int32))
    np.testing.assert_array_equal(enc, own.enc)
    np.testing.assert_array_equal(dec, own.dec)
    assert float(proto.condition_number(counts)) > 0
  assert base._shared_call._cache_size() == compiled     # nothing compiled for `second`

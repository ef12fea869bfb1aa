"""Tests for jaxgc.ordering: Q_max, its bounds, and ordering optimisers (PROTOCOL.md §5, §8)."""
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxgc import assignments, ordering
from jaxgc.ordering import milp
from jaxgc.ordering.optimizer import _resolve_method
from jaxgc.ordering.qmax import orderings_count

# -- strategies ------------------------------------------------------------------

@st.composite
def small_assignments(draw, max_workers=4, max_chunks=5, max_load=3):
  """A random valid assignment (any loads, workers may be empty) and a valid ell."""
  m = draw(st.integers(1, max_workers))
  n = draw(st.integers(1, max_chunks))
  lists = []
  for _ in range(m):
    load = draw(st.integers(0, min(n, max_load)))
    lists.append(list(draw(st.permutations(range(n))))[:load])
  held = set().union(*map(set, lists))
  for i in range(n):
    if i not in held:  # every chunk needs a holder
      lists[draw(st.integers(0, m - 1))].append(i)
  a = assignments.from_lists(lists, n)
  ell = draw(st.integers(1, int(a.replication.min())))
  return a, ell


def _closed_form_l1(m, d):
  return 1 + (m - d) * d + d * (d - 1) // 2


def _random_biadjacency(rng, m, n, p, max_load, min_rep=1):
  for _ in range(100_000):
    b = rng.random((m, n)) < p
    if b.sum(0).min() >= min_rep and b.any(1).all() and b.sum(1).max() <= max_load:
      return b
  raise RuntimeError("no such biadjacency found; loosen the constraints")


# -- Q_max closed form ----------------------------------------------------------

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_assignments())
def test_q_max_matches_brute_force_random(case):
  a, ell = case
  assert ordering.q_max(a, ell) == ordering.q_max_brute_force(a, ell)


@pytest.mark.parametrize("make", [
    lambda: assignments.cyclic(4, 3),
    lambda: assignments.cyclic(5, 2),
    lambda: assignments.cyclic(6, 3),
    lambda: assignments.fractional_repetition(6, 3),
    lambda: assignments.fractional_repetition(6, 2),
    lambda: assignments.random_regular(6, 3, seed=1),
])
@pytest.mark.parametrize("shuffle", [False, True])
def test_q_max_matches_brute_force_structured(make, shuffle):
  a = make()
  if shuffle:
    a = ordering.shuffled(a, seed=3)
  for ell in range(1, int(a.replication.min()) + 1):
    assert ordering.q_max(a, ell) == ordering.q_max_brute_force(a, ell)


def test_known_numbers_cyclic_4_3():
  """PROTOCOL.md §8: natural order 7, 10, 12; all 1296 orderings: best = those, worst 10, 11, 12."""
  a = assignments.cyclic(4, 3)
  for ell, natural, worst in [(1, 7, 10), (2, 10, 11), (3, 12, 12)]:
    assert ordering.q_max(a, ell) == natural
    qs = ordering.q_max_all_orderings(a, ell)
    assert qs.shape == (1296,)
    assert qs.min() == natural == ordering.exhaustive_optimum(a, ell)
    assert qs.max() == worst
    assert ordering.q_lower_bound(a, ell) == natural


def test_q_max_frc_closed_form():
  # FRC as built puts every chunk at each position once: same value as the colouring.
  a = assignments.fractional_repetition(12, 4)
  assert ordering.q_max(a) == _closed_form_l1(12, 4)


# -- colouring --------------------------------------------------------------------

@pytest.mark.parametrize("m,d,seed", [
    (5, 2, 0), (10, 3, 1), (20, 4, 0), (20, 6, 2), (50, 8, 3), (100, 12, 4),
    (200, 16, 5), (200, 4, 6), (64, 1, 0), (7, 7, 0)])
def test_coloring_optimal_on_random_regular(m, d, seed):
  a = ordering.shuffled(assignments.random_regular(m, d, seed), seed)
  t0 = time.perf_counter()
  result, info = ordering.optimize_with_info(a, ell=1)
  elapsed = time.perf_counter() - t0
  assert info.method == "coloring"
  assert info.q == ordering.q_max(result) == _closed_form_l1(m, d)
  assert info.optimal and info.gap == 0 and info.lower_bound == info.q
  assert np.array_equal(result.biadjacency, a.biadjacency)
  pos = result.positions
  for i in range(m):  # every chunk sits at each position exactly once
    assert sorted(pos[:, i][pos[:, i] >= 0].tolist()) == list(range(d))
  assert elapsed < 5.0  # loose; benchmarks/ordering.py measures it (well under 1 s)


def test_lower_bound_exact_for_regular_ell1():
  for m, d in [(9, 3), (30, 5), (40, 10)]:
    a = assignments.random_regular(m, d, seed=m)
    assert ordering.q_lower_bound(a, 1) == _closed_form_l1(m, d)


def test_coloring_general_graph_is_valid():
  rng = np.random.default_rng(0)
  b = _random_biadjacency(rng, 9, 13, 0.35, max_load=13)
  a = assignments.from_biadjacency(b)
  c = ordering.coloring(a)
  assert np.array_equal(c.biadjacency, a.biadjacency)


# -- lower bounds -------------------------------------------------------------------

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_assignments(max_workers=4, max_chunks=5, max_load=3))
def test_lower_bound_le_exhaustive_random(case):
  a, ell = case
  best = ordering.exhaustive_optimum(a, ell)
  assert ordering.q_lower_bound(a, ell) <= best
  assert ordering.q_lower_bound(a, ell, lp=True) <= best


@pytest.mark.parametrize("m,d,seed", [(5, 3, 0), (6, 3, 1), (4, 4, 0), (5, 2, 2)])
def test_lower_bound_le_exhaustive_regular(m, d, seed):
  # Regular instances exercise the configuration bound (ell > 1).
  a = assignments.random_regular(m, d, seed)
  for ell in range(1, d + 1):
    best = ordering.exhaustive_optimum(a, ell, max_orderings=400_000)
    lb = ordering.q_lower_bound(a, ell)
    assert lb <= best
    assert ordering.optimize_with_info(a, ell)[1].q == best


# -- MILP and local search -------------------------------------------------------------

def _small_general_cases(seed, count):
  rng = np.random.default_rng(seed)
  cases = []
  while len(cases) < count:
    m = int(rng.integers(2, 7))
    n = int(rng.integers(2, min(8, 2 * m + 1)))  # loads <= 3 must cover every chunk
    b = _random_biadjacency(rng, m, n, 0.5, max_load=3)
    a = ordering.shuffled(assignments.from_biadjacency(b), len(cases))
    for ell in (1, 2):
      if ell <= a.replication.min() and orderings_count(a) <= 50_000:
        cases.append((a, ell))
  return cases


@pytest.mark.parametrize("a,ell", _small_general_cases(0, 24))
def test_milp_matches_exhaustive(a, ell):
  best = ordering.exhaustive_optimum(a, ell)
  # The bare MILP (no heuristic upper bound, no lower bound) must find it alone.
  res = milp.solve(a, ell - 1, lb=0, ub=None, time_limit=20.0)
  assert res.status == 0
  assert ordering.q_max(a.with_order(res.decode(res.x)), ell) == round(res.fun) == best
  result, info = ordering.optimize_with_info(a, ell, method="milp")
  assert info.q == ordering.q_max(result, ell) == best
  assert info.optimal and info.gap == 0 and info.lower_bound == best
  assert np.array_equal(result.biadjacency, a.biadjacency)


def test_milp_certifies_medium_nonregular():
  rng = np.random.default_rng(2)
  a = assignments.from_biadjacency(_random_biadjacency(rng, 12, 12, 0.35, 12, min_rep=3))
  for ell in (1, 2):
    result, info = ordering.optimize_with_info(a, ell, method="milp", time_limit=20.0)
    assert info.optimal
    assert info.q == ordering.q_max(result, ell) <= ordering.q_max(a, ell)


def test_local_search_beats_coloring_when_ell_gt_1():
  """K_{6,6}, ell = 2: every colouring gives 22; 21 is reachable and certified."""
  a = assignments.cyclic(6, 6)
  assert ordering.q_max(ordering.coloring(a), 2) == 22
  result, info = ordering.optimize_with_info(a, 2, method="local_search", time_limit=5.0)
  assert info.q == ordering.q_max(result, 2) == 21
  assert info.optimal and info.lower_bound == 21


def test_local_search_reaches_milp_on_nonregular():
  rng = np.random.default_rng(5)
  a = assignments.from_biadjacency(_random_biadjacency(rng, 16, 20, 0.3, 20, min_rep=2))
  for ell in (1, 2):
    _, ls = ordering.optimize_with_info(a, ell, method="local_search", time_limit=3.0)
    _, mi = ordering.optimize_with_info(a, ell, method="milp", time_limit=20.0)
    assert mi.optimal
    assert ls.q == mi.q


@pytest.mark.parametrize("method", ordering.METHODS)
@pytest.mark.parametrize("ell", [1, 2])
def test_optimize_preserves_chunk_sets(method, ell):
  rng = np.random.default_rng(ell)
  a = ordering.shuffled(
      assignments.from_biadjacency(_random_biadjacency(rng, 10, 12, 0.35, 12, min_rep=2)), 1)
  result, info = ordering.optimize_with_info(a, ell, method=method, time_limit=3.0)
  assert np.array_equal(result.biadjacency, a.biadjacency)
  assert info.method in ("coloring", "milp", "local_search", "input")
  if method == "coloring":
    assert info.method == "coloring"
  assert info.q == ordering.q_max(result, ell)
  assert info.gap == info.q - info.lower_bound >= 0
  assert info.optimal == (info.gap == 0)
  assert info.lower_bound >= ordering.q_lower_bound(a, ell)
  if method != "coloring":
    assert info.q <= ordering.q_max(a, ell)
  assert np.array_equal(ordering.optimize(a, ell, method=method, time_limit=3.0).biadjacency,
                        a.biadjacency)


def test_auto_picks_methods():
  resolve = _resolve_method  # pylint: disable=protected-access
  assert resolve(assignments.cyclic(8, 3), 1, "auto") == "coloring"
  assert resolve(assignments.cyclic(8, 3), 2, "auto") == "milp"
  assert resolve(assignments.cyclic(8, 3), 1, "milp") == "milp"
  big = assignments.from_biadjacency(
      _random_biadjacency(np.random.default_rng(0), 40, 40, 0.3, 40, min_rep=2))
  assert (big.loads.astype(int) ** 2).sum() > ordering.MILP_MAX_BINARIES
  assert resolve(big, 2, "auto") == "local_search"
  # The colouring already meets the lower bound here, so it is what gets returned.
  _, info = ordering.optimize_with_info(ordering.shuffled(assignments.cyclic(8, 3), 1), 2)
  assert info.method == "coloring" and info.optimal
  _, info = ordering.optimize_with_info(assignments.cyclic(8, 3), 2)
  assert info.method == "input" and info.optimal  # the cyclic order is a colouring
  _, info = ordering.optimize_with_info(big, 2, time_limit=1.0)
  assert info.method in ("coloring", "local_search") and info.gap >= 0


# -- shuffled and errors ---------------------------------------------------------------

def test_shuffled():
  a = assignments.random_regular(20, 5, seed=0)
  s1, s2 = ordering.shuffled(a, 7), ordering.shuffled(a, 7)
  assert np.array_equal(s1.order, s2.order)
  assert np.array_equal(s1.biadjacency, a.biadjacency)
  assert not np.array_equal(s1.order, a.order)
  assert not np.array_equal(ordering.shuffled(a, 8).order, s1.order)


def test_errors():
  a = assignments.cyclic(4, 3)
  for fn in (ordering.q_max, ordering.q_max_brute_force, ordering.q_lower_bound,
             ordering.optimize, ordering.exhaustive_optimum, ordering.chunk_terms):
    with pytest.raises(ValueError, match="larger than the replication"):
      fn(a, 4)
    with pytest.raises(ValueError, match="positive integer"):
      fn(a, 0)
  with pytest.raises(ValueError, match="auto, coloring, milp, local_search"):
    ordering.optimize(a, 1, method="greedy")
  with pytest.raises(ValueError, match="max_states"):
    ordering.q_max_brute_force(assignments.cyclic(20, 5), 1)
  with pytest.raises(ValueError, match="max_orderings"):
    ordering.exhaustive_optimum(assignments.cyclic(10, 5), 1)

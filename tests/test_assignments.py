import networkx as nx
import numpy as np
import pytest

import jaxgc
from jaxgc import assignments


def test_cyclic_contract():
  asg = assignments.cyclic(num_workers=5, load=3)
  assert asg.num_workers == 5 and asg.num_chunks == 5
  np.testing.assert_array_equal(asg.order[3], [3, 4, 0])
  np.testing.assert_array_equal(asg.replication, 3)
  np.testing.assert_array_equal(asg.loads, 3)


def test_from_order_with_empty_slots():
  asg = assignments.from_order(np.array([[0, 1, -1], [1, 2, 0], [2, -1, -1]]), num_chunks=3)
  np.testing.assert_array_equal(asg.loads, [2, 3, 1])
  np.testing.assert_array_equal(asg.replication, [2, 2, 2])
  assert asg.positions[1, 0] == 2 and asg.positions[2, 0] == -1


def test_fractional_repetition_groups():
  asg = assignments.fractional_repetition(6, 3)
  for j in range(6):
    assert set(asg.order[j]) == set(range(3 * (j // 3), 3 * (j // 3) + 3))
  # every chunk sits at each position once within its group
  for i in range(6):
    assert sorted(asg.positions[:, i][asg.positions[:, i] >= 0]) == [0, 1, 2]


@pytest.mark.parametrize("m,load", [(10, 3), (20, 6), (50, 4)])
def test_random_regular_is_regular(m, load):
  asg = assignments.random_regular(m, load, seed=3)
  np.testing.assert_array_equal(asg.loads, load)
  np.testing.assert_array_equal(asg.replication, load)
  assert not np.array_equal(asg.biadjacency, assignments.cyclic(m, load).biadjacency)


def test_from_graph_roundtrip():
  g = nx.Graph()
  g.add_nodes_from([("w", j) for j in range(3)], bipartite=0)
  g.add_nodes_from([("c", i) for i in range(3)], bipartite=1)
  g.add_edges_from([(("w", 0), ("c", 0)), (("w", 0), ("c", 1)), (("w", 1), ("c", 1)),
                    (("w", 1), ("c", 2)), (("w", 2), ("c", 2)), (("w", 2), ("c", 0))])
  asg = assignments.from_graph(g)
  assert asg.lists() == [[0, 1], [1, 2], [0, 2]]


@pytest.mark.parametrize("order,n,match", [
    ([[0, 5]], 3, "out of range"),
    ([[0, 0]], 1, "more than once"),
    ([[0, -1, 1]], 2, "empty slot"),
    ([[0], [1]], 3, "held by no worker"),
    ([[-2, 0]], 1, "out of range"),
    ([0, 1], 2, "shape"),
])
def test_bad_assignments(order, n, match):
  with pytest.raises(ValueError, match=match):
    assignments.from_order(np.array(order), num_chunks=n)


def test_bad_sizes():
  with pytest.raises(ValueError, match="load"):
    assignments.cyclic(4, 5)
  with pytest.raises(ValueError, match="divide"):
    assignments.fractional_repetition(7, 3)
  with pytest.raises(ValueError, match="num_workers"):
    assignments.cyclic(0, 1)


def test_ell_larger_than_replication():
  asg = assignments.from_lists([[0, 1], [1, 2], [2, 0], [1]], 3)
  with pytest.raises(ValueError, match="chunk 0.*ell <= 2"):
    jaxgc.PartialStraggler(asg, ell=3)
  with pytest.raises(ValueError, match="ell"):
    asg.check_ell(0)


def test_with_order_only_permutes():
  asg = assignments.cyclic(4, 2)
  swapped = asg.with_order(asg.order[:, ::-1])
  np.testing.assert_array_equal(swapped.biadjacency, asg.biadjacency)
  with pytest.raises(ValueError, match="different chunks"):
    asg.with_order(np.array([[0, 2], [1, 2], [2, 3], [3, 0]]))


def test_coverage_matches_definition():
  asg = assignments.cyclic(5, 3)
  counts = np.array([0, 1, 2, 3, 1])
  cov = np.asarray(asg.coverage(counts))
  brute = [sum(1 for j in range(5) if i in asg.lists()[j][: counts[j]]) for i in range(5)]
  np.testing.assert_array_equal(cov, brute)


def test_finished_views_agree_with_the_lists():
  """finished (per chunk), finished_slots (per slot), finished_workers: one concept."""
  asg = assignments.from_order(np.array([[0, 1, -1], [1, 2, 0], [2, -1, -1]]), num_chunks=3)
  for counts in ([0, 0, 0], [1, 2, 1], [2, 3, 0], [2, 3, 1]):
    lists = [asg.lists()[j][: counts[j]] for j in range(3)]
    fin = np.asarray(asg.finished(counts))
    slots = np.asarray(asg.finished_slots(counts))
    whole = np.asarray(asg.finished_workers(counts))
    np.testing.assert_array_equal(fin, [[i in lst for i in range(3)] for lst in lists])
    np.testing.assert_array_equal(slots, [[t < len(lst) for t in range(3)] for lst in lists])
    np.testing.assert_array_equal(
        whole, [len(lst) == len(asg.lists()[j]) for j, lst in enumerate(lists)])
  # Batched states work the same way.
  batch = np.array([[1, 2, 1], [2, 3, 1]])
  np.testing.assert_array_equal(asg.coverage(batch)[1], asg.coverage(batch[1]))

"""Backup workers (PROTOCOL.md §10): stop at the (m-b)-th finish, rescaled sum of what arrived."""
import jax
import numpy as np
import pytest

from jaxgc import assignments, protocols, timing


@pytest.mark.parametrize("m,load,b", [(7, 3, 0), (7, 3, 2), (10, 1, 4)])
def test_stops_at_the_m_minus_b_th_finish_and_rescales(m, load, b):
  asg = assignments.cyclic(m, load)
  proto = protocols.get_protocol("backup_workers", asg, 2, num_backup=b)   # ell is ignored
  tau = np.asarray(timing.Failures(timing.Pareto(), 0.0).sample(jax.random.PRNGKey(m + b),
                                                                 asg, (20,)), np.float64)
  fast = np.asarray(proto.completion_time(tau))
  rng = np.random.default_rng(b)
  for trial in range(20):
    # brute force: the event loop stops once m - b workers have their chunk (slot 0) done
    ref = timing.event_loop_completion_time(tau[trial], lambda k: (k >= 1).sum() >= m - b)
    assert fast[trial] == pytest.approx(ref, rel=1e-6)
    assert fast[trial] == pytest.approx(np.sort(tau[trial, :, 0])[m - b - 1], rel=1e-6)
    counts = np.asarray(timing.progress(tau[trial], fast[trial]))
    got = counts >= 1
    assert got.sum() == m - b
    assert bool(proto.is_decodable(counts)) == (b == 0)
    grads = rng.standard_normal((m, load, 5))           # slot t of worker j: chunk (j+t) mod m
    grads[~got, 0] = np.nan                             # what has not arrived must not leak
    want = m / (m - b) * grads[got, 0].sum(0)
    np.testing.assert_allclose(protocols.estimate(proto, grads.astype(np.float32), counts),
                               want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(proto.dropped_share(counts)), b / m, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(proto.coverage(counts)),
                                  got[np.argsort(asg.order[:, 0])].astype(int))


def test_validation():
  asg = assignments.cyclic(5, 2)
  for b in (-1, 5, 1.5):
    with pytest.raises(ValueError, match="0 <= num_backup < num_workers=5"):
      protocols.BackupWorkers(asg, num_backup=b)
  with pytest.raises(ValueError, match="exactly one chunk per worker"):
    protocols.BackupWorkers(assignments.from_lists([[0, 1], [2, 3], [1, 0]], 4), num_backup=1)
  assert protocols.PROTOCOLS["backup_workers"] is protocols.BackupWorkers

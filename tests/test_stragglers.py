"""Persistent (Gilbert-Elliott) stragglers and trace replay by step (PROTOCOL.md §10)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgc import assignments, timing


def test_gilbert_elliott_stationary_fraction_and_spell_length():
  model = timing.GilbertElliott(timing.ShiftedExponential(1.0, 1.0), p_slow=0.05,
                                p_recover=0.2, factor=5.0)
  asg = assignments.cyclic(20, 6)

  @jax.jit
  def run(key):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    # The chain alone, long: 400 workers x 400 steps from the stationary start.
    chain = jax.lax.scan(lambda s, k: (model.advance(k, s),) * 2, model.init_state(k1, 400),
                         jax.random.split(k2, 400))[1]
    state = model.init_state(k3, 20)
    tau, _ = timing.sample_step(model, k4, state, asg)
    return chain, state, tau, model.sample(k4, asg, (300,))

  slow, state, tau, one = map(np.asarray, run(jax.random.PRNGKey(0)))
  assert abs(slow.mean() - 0.05 / 0.25) < 0.01
  # Persistence: a slow worker stays slow with probability 1 - p_recover.
  assert abs((slow[1:] & slow[:-1]).sum() / slow[:-1].sum() - 0.8) < 0.01
  # Durations follow the state: a slow worker's every chunk is >= factor * shift (a
  # fast one's minimum over 6 slots gets there with probability (e^-4)^6).
  np.testing.assert_array_equal(tau.min(-1) >= 5.0, state)
  # The stateless sample draws each trial from the stationary law.
  assert abs((one.min(-1) >= 5.0).mean() - 0.2) < 0.03


def test_gilbert_elliott_state_is_carried_and_jits():
  model = timing.get_straggler_model("gilbert_elliott", p_slow=0.0, p_recover=0.0 + 1e-9,
                                     factor=3.0)
  asg = assignments.cyclic(6, 2)
  state = jnp.array([True, False, True, False, False, False])
  step = jax.jit(lambda k, s: timing.sample_step(model, k, s, asg))
  tau, nxt = step(jax.random.PRNGKey(0), state)
  np.testing.assert_array_equal(np.asarray(nxt), np.asarray(state))   # p ≈ 0: no move
  assert np.all(np.asarray(tau)[np.asarray(state)] >= 3.0)
  assert np.all(np.asarray(tau)[~np.asarray(state)] < 3.0 + 20)
  # Failures keep the base model's memory.
  failing = timing.get_straggler_model("gilbert_elliott", failure_prob=0.5)
  assert failing.stateful and timing.init_state(failing, jax.random.PRNGKey(0), 6).shape == (6,)
  tau, s = timing.sample_step(failing, jax.random.PRNGKey(2), state, asg)
  assert s.shape == (6,) and tau.shape == (6, 2)


def _write(path, rows, header="worker,time,batch_time_norm"):
  path.write_text(header + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
  return str(path)


def test_trace_replay_returns_the_traced_times(tmp_path):
  rng = np.random.default_rng(0)
  times = rng.uniform(100, 900, size=(5, 4)).round()
  rows = [(w, 1 + 10 * r, times[r, w]) for r in range(5) for w in range(4)]
  model = timing.TraceReplay(_write(tmp_path / "t.csv", rows), mapping="none")
  want = times / np.median(times)
  np.testing.assert_allclose(model.times, want)
  asg = assignments.from_lists([[0, 1], [1, 2, 3], [3]], 4)
  tau = np.asarray(timing.sample_steps(model, jax.random.PRNGKey(0), asg, 7, jnp.int32(0)))
  for t in range(7):
    for j, load in enumerate(asg.loads):
      np.testing.assert_allclose(tau[t, j, :load], want[t % 5, j] / load, rtol=1e-6)
      assert np.all(np.isinf(tau[t, j, load:]))
  # wrap: worker j plays traced worker j mod W
  wrap = timing.TraceReplay(_write(tmp_path / "t.csv", rows), mapping="wrap")
  tau = np.asarray(timing.sample_step(wrap, None, jnp.int32(3), assignments.cyclic(9, 1))[0])
  np.testing.assert_allclose(tau[:, 0], want[3, np.arange(9) % 4], rtol=1e-6)
  perm = timing.TraceReplay(_write(tmp_path / "t.csv", rows), mapping="permutation", seed=3)
  w = perm.worker_map(3)
  assert len(set(w.tolist())) == 3 and np.all(w < 4)


def test_shipped_traces_and_registry():
  for name in timing.TRACES:
    t = timing.load_trace(name)
    assert t.shape[1] == 10 and t.shape[0] > 200 and np.median(t) == pytest.approx(1.0)
  model = timing.get_straggler_model("trace", trace="alibaba_pai_job4", noise=True)
  asg = assignments.cyclic(20, 6)
  tau = model.sample(jax.random.PRNGKey(0), asg, (3,))
  assert tau.shape == (3, 20, 6) and np.all(np.isfinite(np.asarray(tau)))
  assert model.stateful and int(timing.init_state(model, None, 20)) == 0


def test_bad_traces_are_one_clear_error(tmp_path):
  with pytest.raises(ValueError, match="no column 'batch_time_norm'"):
    timing.TraceReplay(_write(tmp_path / "a.csv", [(0, 1, 5)], header="worker,time,t"))
  with pytest.raises(ValueError, match="positive and finite, row 1"):
    timing.TraceReplay(_write(tmp_path / "b.csv", [(0, 1, 5), (1, 1, 0)]))
  with pytest.raises(ValueError, match="non-numeric"):
    timing.TraceReplay(_write(tmp_path / "c.csv", [(0, 1, "x")]))
  small = timing.TraceReplay(_write(tmp_path / "d.csv", [(0, 1, 5), (1, 1, 6)]), mapping="none")
  with pytest.raises(ValueError, match="has 2 workers but 3 are simulated.*mapping='wrap'"):
    timing.sample_step(small, None, jnp.int32(0), assignments.cyclic(3, 1))
  with pytest.raises(ValueError, match="unknown trace 'job9'"):
    timing.TraceReplay("job9")
  with pytest.raises(ValueError, match="unknown trace mapping"):
    timing.TraceReplay("alibaba_pai_job1", mapping="modulo")

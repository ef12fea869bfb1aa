"""train.py: config checks, end-to-end runs, resume, protocol comparison."""
import json
import os

import jax
import numpy as np
import pytest

import train
from configs import default as default_config


def small_config(**overrides):
  config = default_config.get_config()
  config.num_steps = 12
  config.eval_every = 6
  config.checkpoint_every = 4
  config.hidden = (32,)
  for k, v in overrides.items():
    if isinstance(v, dict):
      config[k].update(v)
    else:
      config[k] = v
  return config


def read(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


def final_params(workdir):
  with np.load(os.path.join(workdir, "final_params.npz")) as z:
    return {k: z[k] for k in z.files}


# -- config errors ----------------------------------------------------------------

@pytest.mark.parametrize("overrides,match", [
    (dict(ell=5, load=4), r"ell=5 > load=4.*--config.ell<=4"),
    (dict(protocol="partial_stragler"), r"unknown protocol.*partial_straggler"),
    (dict(mode="deadline"), r"--config.deadline=T"),
    (dict(protocol="ignore_stragglers"), r"no exact mode.*--config.mode=deadline"),
    (dict(mode="approx"), r"unknown mode"),
    (dict(batch_size=333), r"multiple of num_workers=20"),
    (dict(failure_prob=2.0), r"failure_prob"),
    (dict(straggler=dict(name="weibull")), r"unknown name"),
    (dict(protocol="original", ell=4, load=4), r"tolerates s = load - ell = 0"),
    (dict(num_devices=6, num_processes=4), r"split evenly"),
])
def test_bad_configs_fail_at_startup(overrides, match):
  with pytest.raises(ValueError, match=match):
    train.validate_config(small_config(**overrides), num_train=1437)


def test_more_workers_than_examples():
  config = small_config(num_workers=2000, batch_size=2000)
  with pytest.raises(ValueError, match=r"num_workers=2000 exceeds the 1437"):
    train.validate_config(config, num_train=1437)


def test_config_typo_is_named(tmp_path):
  config = small_config()
  config.num_step = 5   # typo: the real field is num_steps
  with pytest.raises(ValueError, match=r"unknown config field 'num_step'.*'num_steps'"):
    train.train_and_evaluate(config, str(tmp_path))


# -- end to end -----------------------------------------------------------------------

def test_metrics_and_outputs(tmp_path):
  state = train.train_and_evaluate(small_config(), str(tmp_path))
  recs = read(tmp_path)
  steps = [r for r in recs if "loss" in r]
  evals = [r for r in recs if "test_accuracy" in r]
  assert [r["step"] for r in steps] == list(range(1, 13))
  assert [r["step"] for r in evals] == [0, 6, 12]
  times = [r["sim_time"] for r in steps]
  assert all(b > a for a, b in zip(times, times[1:]))          # cumulative
  assert times[-1] == pytest.approx(float(state.sim_time))
  assert all(r["exact"] and r["decodable"] and not r["skipped"] for r in steps)
  for key in ("min_coverage", "chunks_below_ell", "erasures", "condition_number",
              "step_sim_time"):
    assert key in steps[0]
  summary = json.load(open(tmp_path / "summary.json"))
  assert summary["steps"] == 12 and summary["test_accuracy"] == evals[-1]["test_accuracy"]


def test_exact_partial_straggler_and_uncoded_same_losses(tmp_path):
  """Exact mode rebuilds the true gradient: same losses, different simulated times."""
  runs = {}
  for name in ("partial_straggler", "uncoded"):
    train.train_and_evaluate(small_config(protocol=name, checkpoint_every=0, num_steps=15,
                                          optimizer="sgd", learning_rate=0.5),
                             str(tmp_path / name))
    runs[name] = [r for r in read(tmp_path / name) if "loss" in r]
  a = np.array([r["loss"] for r in runs["partial_straggler"]])
  b = np.array([r["loss"] for r in runs["uncoded"]])
  np.testing.assert_allclose(a, b, rtol=2e-5)
  ta = runs["partial_straggler"][-1]["sim_time"]
  tb = runs["uncoded"][-1]["sim_time"]
  assert ta < tb   # slowdown stragglers: partial work beats waiting for everyone


def test_resume_reproduces_uninterrupted_run(tmp_path, monkeypatch):
  config = small_config(num_steps=14, eval_every=7, message_loss_prob=0.2)
  train.train_and_evaluate(config, str(tmp_path / "straight"))

  # Crash after step 10 (checkpoints at 4 and 8), then rerun the same command.
  calls = {"n": 0}
  real = train._to_python  # pylint: disable=protected-access

  def crash(tree):
    calls["n"] += 1
    if calls["n"] == 10:
      raise KeyboardInterrupt("simulated kill")
    return real(tree)

  monkeypatch.setattr(train, "_to_python", crash)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path / "resumed"))
  monkeypatch.setattr(train, "_to_python", real)
  state = train.train_and_evaluate(config, str(tmp_path / "resumed"))

  summary = json.load(open(tmp_path / "resumed" / "summary.json"))
  assert 0 < summary["resumed_from"] < 14
  a, b = final_params(tmp_path / "straight"), final_params(tmp_path / "resumed")
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert read(tmp_path / "straight") == read(tmp_path / "resumed")
  assert int(state.step) == 14


def test_faults_through_config_never_reach_params(tmp_path):
  config = small_config(mode="deadline", deadline=2.5, failure_prob=0.4,
                        message_loss_prob=0.3, nan_message_prob=0.3, checkpoint_every=0)
  state = train.train_and_evaluate(config, str(tmp_path))
  for p in jax.tree.leaves(state.params):
    assert np.isfinite(np.asarray(p)).all()
  steps = [r for r in read(tmp_path) if "loss" in r]
  assert sum(r["erasures"] for r in steps) == int(state.num_erasures) > 0
  assert sum(r["skipped"] for r in steps) == int(state.num_skipped)
  assert all(r["step_sim_time"] <= 2.5 for r in steps)


def test_default_config_reaches_95_percent(tmp_path):
  config = default_config.get_config()
  config.num_steps = 120
  config.eval_every = 40
  config.checkpoint_every = 0
  train.train_and_evaluate(config, str(tmp_path))
  summary = json.load(open(tmp_path / "summary.json"))
  assert summary["test_accuracy"] >= 0.95, summary


def test_compare_writes_plot(tmp_path):
  config = small_config(num_steps=10, eval_every=5, checkpoint_every=0)
  out = train.compare_protocols(config, str(tmp_path), ("partial_straggler", "uncoded"))
  assert set(out) == {"partial_straggler", "uncoded"}
  assert (tmp_path / "accuracy_vs_time.png").stat().st_size > 1000
  assert json.load(open(tmp_path / "comparison.json"))["target_accuracy"] == 0.95


def test_synthetic_config_runs(tmp_path):
  from configs import synthetic  # pylint: disable=import-outside-toplevel
  config = synthetic.get_config()
  config.num_steps = 30
  config.eval_every = 30
  config.checkpoint_every = 0
  train.train_and_evaluate(config, str(tmp_path))
  summary = json.load(open(tmp_path / "summary.json"))
  assert summary["test_accuracy"] > 0.7, summary


def test_pod_config_validates():
  from configs import pod  # pylint: disable=import-outside-toplevel
  train.validate_config(pod.get_config())


def test_command_line_defaults_from_any_directory(tmp_path):
  """`python train.py` needs no flags: configs/default.py is found beside train.py."""
  import subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")
  run = lambda *flags: subprocess.run(
      [sys.executable, script, *flags], cwd=tmp_path, capture_output=True, text=True,
      timeout=300)
  out = run("--config.num_steps=4", "--config.eval_every=2", "--config.checkpoint_every=0",
            "--config.hidden=(16,)")
  assert out.returncode == 0, out.stderr[-2000:]
  lines = read(tmp_path / "workdir")
  train_lines = [r for r in lines if "loss" in r]
  assert [r["step"] for r in train_lines] == [1, 2, 3, 4]
  assert all({"step", "loss", "sim_time"} <= set(r) for r in train_lines)
  assert sum("test_accuracy" in r for r in lines) == 3          # steps 0, 2, 4
  assert (tmp_path / "workdir" / "accuracy_vs_time.png").exists()
  bad = run("--config.nm_steps=4")
  assert bad.returncode != 0 and "num_steps" in bad.stderr


def test_epoch_permutations_draw_each_epoch_once():
  """perm_for(step) is that step's epoch permutation, and one array per epoch."""
  num_train, batch = 100, 30                         # 3 steps per epoch
  perm_for = train.epoch_permutations(7, num_train, batch, None)
  for step in range(7):
    np.testing.assert_array_equal(perm_for(step), train.epoch_permutation(7, step // 3, num_train))
  assert perm_for(6) is perm_for(8)
  assert not np.array_equal(perm_for(0), perm_for(3))
  with pytest.raises(ValueError, match="batch_size must be in 1..100"):
    train.epoch_permutations(7, num_train, 0, None)

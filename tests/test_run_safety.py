"""Run safety (issue #29): unsealed checkpoints are never restored silently, results
without a checkpoint are never overwritten, repeated signals never cut the save short;
and the paths an audit left untested: a damaged manifest, a truncated file, a partly
deleted checkpoint, a second Ctrl-C, and a 2-D mesh change (mesh.model 2 -> 1 -> 2)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from jaxgc import experiment
from jaxgc.experiment import checkpoints, resilience
from tests import test_resilience as tr
from tests import warm

# Checkpoints at steps 2, 4 and 6 of a 6-step run.
FLAGS = ("num_steps=6", "checkpoint_every=2", "max_checkpoints=3")


@pytest.fixture(scope="module")
def built():
  """Built experiments per (device count, mesh.model): train() compiles nothing new."""
  exps = {}

  def make(*flags, devices=2, model=1):
    key = (devices, model)
    if key not in exps:
      exps[key] = experiment.build(tr.config("num_steps=4", f"num_devices={devices}",
                                              f"mesh.model={model}"))
    return exps[key]._replace(config=tr.config(f"num_devices={devices}",
                                                f"mesh.model={model}", *flags))
  return make


@pytest.fixture(scope="module")
def straight(built, tmp_path_factory):
  """The uninterrupted 6-step run, without checkpoints."""
  wd = str(tmp_path_factory.mktemp("straight"))
  experiment.train(built(*FLAGS[:1], "checkpoint_every=0"), wd)
  return wd


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """One JAX compilation cache for this file's train.py processes: they compile alike."""
  return tmp_path_factory.mktemp("jax_cache")


def _run(built, wd, capsys):
  capsys.readouterr()
  experiment.train(built(*FLAGS), wd)
  return capsys.readouterr().err


def _flip_a_bit(checkpoint):
  path = tr._data_file(checkpoint)
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 1
  open(path, "wb").write(bytes(data))


def test_a_completed_save_is_sealed_in_its_commit(tmp_path):
  """The manifest is written inside orbax's commit: there as soon as the save is done,
  before any later save or close() could write it."""
  ckpt = checkpoints.Checkpoints(str(tmp_path), every=1, keep=2)
  ckpt.save(1, {"w": jnp.arange(1000.0)}, {"format": 2})
  ckpt.manager.wait_until_finished()
  where = tmp_path / "1"
  assert checkpoints.check_manifest(str(where)) is None
  listed = [line.split("  ", 1)[1] for line in (where / checkpoints.MANIFEST).read_text()
            .splitlines()]
  assert any(name.startswith("state/") for name in listed), listed
  assert any(name.startswith("meta/") for name in listed), listed
  assert not [p for p in os.listdir(tmp_path) if "tmp" in p]
  ckpt.close()


def test_unsealed_damaged_checkpoint_is_set_aside_and_unverified_only_as_last_resort(
    built, straight, tmp_path, capsys):
  wd = str(tmp_path / "run")
  experiment.train(built(*FLAGS), wd)
  ck = os.path.join(wd, "checkpoints")
  # The audit's case: the newest checkpoint loses its manifest and one bit of its data.
  os.remove(os.path.join(ck, "6", checkpoints.MANIFEST))
  _flip_a_bit(os.path.join(ck, "6"))
  err = _run(built, wd, capsys)
  assert "set aside checkpoint 6" in err and "unsealed" in err, err
  assert f"resuming {wd} from step 4" in err, err
  assert os.path.isdir(os.path.join(wd, "broken_checkpoints", "6"))
  tr.assert_same_params(wd, straight)
  assert experiment.read_metrics(wd) == experiment.read_metrics(straight)

  # No sealed checkpoint at all: the newest unsealed one restores, named as unverified.
  for step in os.listdir(ck):
    os.remove(os.path.join(ck, step, checkpoints.MANIFEST))
  err = _run(built, wd, capsys)
  assert "restoring checkpoint 6 UNVERIFIED" in err and "set aside" not in err, err
  assert json.loads(open(os.path.join(wd, "summary.json")).read())["resumed_from"] == 6
  tr.assert_same_params(wd, straight)


@pytest.mark.parametrize("damage", ["manifest", "truncated", "deleted"])
def test_damaged_manifest_truncated_or_partly_deleted_checkpoint(
    built, straight, tmp_path, capsys, damage):
  wd = str(tmp_path / "run")
  experiment.train(built(*FLAGS), wd)
  newest = os.path.join(wd, "checkpoints", "6")
  data = tr._data_file(newest)
  if damage == "manifest":
    open(os.path.join(newest, checkpoints.MANIFEST), "wb").write(os.urandom(300))
    reason = "SHA256SUMS"
  elif damage == "truncated":
    with open(data, "r+b") as f:
      f.truncate(os.path.getsize(data) // 2)
    reason = "does not match its sha256"
  else:
    os.remove(data)
    reason = "is missing"
  err = _run(built, wd, capsys)
  assert "set aside checkpoint 6" in err and "corrupt" in err and reason in err, err
  assert f"resuming {wd} from step 4" in err, err
  tr.assert_same_params(wd, straight)


def test_results_without_a_checkpoint_are_never_overwritten(built, tmp_path, cache):
  wd = str(tmp_path / "run")
  experiment.train(built(*FLAGS), wd)
  shutil.rmtree(os.path.join(wd, "checkpoints"))
  os.remove(os.path.join(wd, "summary.json"))         # as a killed run leaves it
  before = open(os.path.join(wd, "metrics.jsonl"), "rb").read()
  with pytest.raises(experiment.ConfigError, match=r"no checkpoint restores \(checkpoints/ "
                     r"was deleted.*it holds metrics.jsonl with 6 training step\(s\).*--restart"):
    experiment.train(built(*FLAGS), wd)
  assert open(os.path.join(wd, "metrics.jsonl"), "rb").read() == before
  assert not os.path.exists(os.path.join(wd, "summary.json"))

  # Never a checkpoint committed (checkpoints off, or killed before the first one):
  # starting over loses nothing, and says so; once finished (summary.json), it refuses.
  off = str(tmp_path / "off")
  experiment.train(built(*FLAGS[:1], "checkpoint_every=0"), off)
  finished = open(os.path.join(off, "metrics.jsonl"), "rb").read()
  with pytest.raises(experiment.ConfigError, match=r"no checkpoint restores, but it holds "
                     r"summary.json.*--restart"):
    experiment.train(built(*FLAGS[:1], "checkpoint_every=0"), off)
  os.remove(os.path.join(off, "summary.json"))
  experiment.train(built(*FLAGS[:1], "checkpoint_every=0"), off)
  assert open(os.path.join(off, "metrics.jsonl"), "rb").read() == finished

  # The command line: one line, and the workdir untouched.
  cmd = [sys.executable, tr.TRAIN, f"--workdir={wd}",
         *[f"--config.{f}" for f in (*tr.TINY, "num_devices=2", *FLAGS)]]
  out = warm.run(cmd, env=tr.env(cache), capture_output=True, text=True, timeout=300)
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 1 and len(lines) == 1, out.stderr[-2000:]
  assert lines[0].startswith(f"train.py: error: --workdir={wd}: holds a run that cannot "
                             "resume") and "--restart" in lines[0], lines
  assert open(os.path.join(wd, "metrics.jsonl"), "rb").read() == before


def _start(tmp_path, cache, wd, *flags):
  cmd = [sys.executable, tr.TRAIN, f"--workdir={wd}",
         *[f"--config.{f}" for f in (*tr.TINY, "num_devices=2", *flags)]]
  popen = warm.Popen(cmd, cwd=tmp_path, env=tr.env(cache),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  return cmd, popen


def _signal_burst(pid, first, then, count, gap=0.002):
  os.kill(pid, first)
  for _ in range(count):
    time.sleep(gap)
    try:
      os.kill(pid, then)
    except ProcessLookupError:      # already gone: exactly what must not happen early
      return


def test_repeated_sigterm_does_not_cut_the_save_short(tmp_path, cache):
  wd = str(tmp_path / "run")
  _, proc = _start(tmp_path, cache, wd, "num_steps=300", "checkpoint_every=100")
  tr.wait_for(lambda: tr.step_lines(wd) >= 5, proc)
  _signal_burst(proc.pid, signal.SIGTERM, signal.SIGTERM, count=50)   # 100 ms of SIGTERMs
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
  assert "Traceback" not in err, err[-3000:]
  stop = [line for line in err.splitlines() if "stopped at step" in line]
  logged = tr.step_lines(wd)
  assert stop == [f"stopped at step {logged} (SIGTERM); rerun the same command to resume"]
  ck = os.path.join(wd, "checkpoints")
  assert str(logged) in os.listdir(ck) and not [p for p in os.listdir(ck) if "tmp" in p]
  assert checkpoints.check_manifest(os.path.join(ck, str(logged))) is None
  assert json.loads(open(os.path.join(wd, "summary.json")).read())["stopped_by"] == "SIGTERM"


def test_second_ctrl_c_aborts_with_one_line_and_the_rerun_resumes(built, tmp_path, cache):
  n = 40
  straight = str(tmp_path / "straight")
  experiment.train(built(f"num_steps={n}", "checkpoint_every=0"), straight)
  wd = str(tmp_path / "run")
  cmd, proc = _start(tmp_path, cache, wd, f"num_steps={n}", "checkpoint_every=2",
                     "max_checkpoints=3")
  tr.wait_for(lambda: tr.step_lines(wd) >= 5, proc)
  # Signals that arrive together are handled once: keep pressing until it is gone.
  _signal_burst(proc.pid, signal.SIGINT, signal.SIGINT, count=500)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
  assert "Traceback" not in err and "stopped at step" not in err, err[-3000:]
  assert [line for line in err.splitlines() if "SIGINT" in line] == [resilience.ABORT_LINE]
  out = warm.run(cmd, cwd=tmp_path, env=tr.env(cache), capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resuming" in out.stderr, out.stderr[-3000:]
  assert experiment.read_metrics(wd) == experiment.read_metrics(straight)
  tr.assert_same_params(wd, straight)


def test_mesh_model_2_to_1_and_back_resumes(built, tmp_path, capsys):
  """A 2-D mesh (4 worker groups of 2 devices) -> 1-D (8 devices) -> 2-D again."""
  flags = ("checkpoint_every=2", "max_checkpoints=2")
  straight, wd = str(tmp_path / "straight"), str(tmp_path / "run")
  experiment.train(built("num_steps=9", *flags, devices=8, model=2), straight)
  experiment.train(built("num_steps=4", *flags, devices=8, model=2), wd)
  experiment.train(built("num_steps=7", *flags, devices=8, model=1), wd)
  experiment.train(built("num_steps=9", *flags, devices=8, model=2), wd)
  summary = json.loads(open(os.path.join(wd, "summary.json")).read())
  assert summary["resumed_from"] == 7 and summary["steps"] == 9
  assert not os.path.exists(os.path.join(wd, "broken_checkpoints"))
  ours, theirs = [[r for r in experiment.read_metrics(d) if "loss" in r]
                  for d in (wd, straight)]
  assert [r["step"] for r in ours] == [r["step"] for r in theirs] == list(range(1, 10))
  assert [r["sim_time"] for r in ours] == [r["sim_time"] for r in theirs]
  np.testing.assert_allclose([r["loss"] for r in ours], [r["loss"] for r in theirs],
                             rtol=1e-5)
  pa, pb = tr.params(wd), tr.params(straight)
  for k in pa:
    np.testing.assert_allclose(pa[k], pb[k], rtol=1e-5, atol=1e-6)

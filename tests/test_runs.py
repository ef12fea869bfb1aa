"""Runs on disk and the command line (issue #12): one run per workdir, crash safety under
kill -9, one-line errors, honest time for total failure, complete summaries, aliases."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import default as default_config
from jaxgc import experiment, protocols
from jaxgc.backends import StepBackend
from tests import warm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
# A small fast run: 4 workers on 2 CPU devices, a linear model.
TINY = ("num_devices=2", "num_workers=4", "load=2", "ell=1", "batch_size=64", "model=linear",
        "eval_every=3", "checkpoint_every=1", "max_checkpoints=3")


def tiny_config(*flags):
  # In-process: keep the 8 CPU devices conftest.py asks for (the mesh uses 2 of them),
  # so that tests running later in this process still find 8.
  return experiment.apply_overrides(default_config.get_config(),
                                    [f.split("=", 1) for f in (*TINY, "num_cpu_devices=8", *flags)])


@pytest.fixture(scope="module")
def tiny():
  """One built tiny experiment: train() on it again compiles nothing new."""
  exp = experiment.build(tiny_config("num_steps=4"))
  return lambda *flags: exp._replace(config=tiny_config(*flags))


def env(cache_dir=None):
  e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  e["PYTHONPATH"] = ROOT
  if cache_dir:   # every subprocess compiles the same programs: compile them once
    e.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache_dir))   # (conftest: the session's)
    e.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return e


def command(workdir, *flags):
  return [sys.executable, TRAIN, f"--workdir={workdir}", *flags]


def read(workdir):
  return experiment.read_metrics(str(workdir))


# -- one-line errors, through the real command line -----------------------------------

def test_bad_flags_give_one_line(tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("not a directory")
  taken = tmp_path / "taken"
  taken.mkdir()
  (taken / "config.json").write_text(default_config.get_config().to_json())
  broken = tmp_path / "broken_config.py"
  broken.write_text("def get_config():\n  raise RuntimeError('boom inside the config file')\n")
  cases = {   # flags -> the flag the message must name
      ("--config.protocol=partial_stragler",): "--config.protocol.name",
      ("--config.ell=9",): "--config.protocol.ell",
      ("--config.num_steps=-3",): "--config.num_steps",
      (f"--config={tmp_path / 'missing.py'}",): "--config",
      (f"--workdir={a_file}",): f"--workdir={a_file}",
      ("--config.straggler.name=bogus",): "--config.straggler.name",
      ("--config.protocl=partial_straggler",): "--config.protocol",
      ("--config.protocol=__no_such_protocol__",): "--config.protocol.name",
      ("--compare=partial_straggler,orignal",): "--compare",
      (f"--workdir={taken}", "--config.seed=7"): "--restart",
      ("--config.protocol=graph_code", "--config.mode=deadline", "--config.deadline=8"):
          "--config.protocol.ell",
  }
  procs = {}
  for i, flags in enumerate([*cases, (f"--config={broken}",)]):
    wd = [f for f in flags if f.startswith("--workdir=")] or [f"--workdir={tmp_path / str(i)}"]
    procs[flags] = warm.Popen(
        [sys.executable, TRAIN, *wd, *[f for f in flags if not f.startswith("--workdir=")]],
        cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for flags, proc in procs.items():
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, flags
    if flags not in cases:   # an unexpected error keeps its traceback
      assert "Traceback" in err and "boom inside the config file" in err, err
      continue
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, (flags, err)
    assert cases[flags] in lines[0] and "\\n" not in lines[0], (flags, err)
    if "--config.seed=7" in flags:
      assert "seed (0 there, 7 asked)" in lines[0], err
  for i in range(len(cases)):
    assert not (tmp_path / str(i)).exists()       # a bad command leaves no folder behind


def test_lm_settings_fail_at_build_naming_the_flags():
  """The LM's sequence length has one source (the data), and the memory estimate is
  checked against --config.memory_budget_gb before any training."""
  lm = experiment.load_config(os.path.join(ROOT, "configs", "lm.py"))
  cases = {
      "model.transformer_lm.seq_len=32": r"^--config.model.transformer_lm.seq_len=32: differs "
                                         r"from --config.data.pystdlib.seq_len=64",
      "memory_budget_gb=0.001": r"^--config.assignment.load=3: .*estimated [\d.]+ GiB per "
                                r"device \(params .*exceeds the memory budget of 0.001 GiB",
      "batch_size=60": r"^--config.batch_size=60: batch_size=60 sequences of seq_len=64",
  }
  for flag, match in cases.items():
    config = experiment.apply_overrides(
        lm.copy_and_resolve_references(), [("num_cpu_devices", "8"), flag.split("=", 1)])
    with pytest.raises(experiment.ConfigError, match=match):
      experiment.build(config)


# -- crash safety: kill -9 at chosen moments ----------------------------------------------

def _run_until(cmd, cwd, env_, moment, timeout=300):
  """Starts ``cmd`` and SIGKILLs it as soon as ``moment()`` is true; returns its stderr."""
  proc = warm.Popen(cmd, cwd=cwd, env=env_, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + timeout
  while proc.poll() is None and time.time() < deadline:
    if moment():
      os.kill(proc.pid, signal.SIGKILL)
      break
    time.sleep(0.002)
  _, err = proc.communicate(timeout=60)
  return proc.returncode, err


def _step_lines(workdir):
  path = workdir / "metrics.jsonl"
  return path.read_text().count('"loss"') if path.exists() else 0


def _writing_checkpoint(workdir):
  ck = workdir / "checkpoints"
  return ck.is_dir() and any("tmp" in p.name for p in ck.iterdir())


def _finalized(workdir):
  ck = workdir / "checkpoints"
  return sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit()) if ck.is_dir() else []


def test_kill_9_at_any_moment_then_resume_matches_straight_run(tmp_path, tiny):
  flags = [f"--config.{f}" for f in (*TINY, "num_steps=9")]
  straight = tmp_path / "straight"
  experiment.train(tiny("num_steps=9"), str(straight))

  wd, e = tmp_path / "killed", env(tmp_path / "jax_cache")
  cmd = command(wd, *flags)
  # 1. while starting up, as soon as config.json exists;
  rc, _ = _run_until(cmd, tmp_path, e, lambda: (wd / "config.json").exists())
  assert rc == -signal.SIGKILL
  # 2. between a step's metrics line and its checkpoint;
  rc, _ = _run_until(cmd, tmp_path, e, lambda: _step_lines(wd) >= 2)
  assert rc == -signal.SIGKILL
  # 3. in the middle of writing a checkpoint (orbax's temporary folder exists).
  rc, _ = _run_until(cmd, tmp_path, e, lambda: _step_lines(wd) >= 5 and _writing_checkpoint(wd))
  assert rc == -signal.SIGKILL
  # Then break the newest finished checkpoint and cut the log's last line in half.
  steps = _finalized(wd)
  assert len(steps) >= 2, steps
  newest = wd / "checkpoints" / str(steps[-1])
  for root, _, files in os.walk(newest):
    for name in files:
      if name == "_METADATA" or "manifest" in name or name.endswith(".ocdbt"):
        open(os.path.join(root, name), "w").write("garbage{")
  text = (wd / "metrics.jsonl").read_text()
  (wd / "metrics.jsonl").write_text(text[:-len(text.splitlines()[-1]) // 2 - 1])

  out = warm.run(cmd, cwd=tmp_path, env=e, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"set aside checkpoint {steps[-1]}" in out.stderr, out.stderr[-3000:]
  assert "compiling…" in out.stderr
  assert read(wd) == read(straight)
  for name in ("final_params.npz",):
    with np.load(wd / name) as a, np.load(straight / name) as b:
      for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])
  summary = json.loads((wd / "summary.json").read_text())
  assert summary["steps"] == 9 and 0 < summary["resumed_from"] < 9
  assert summary["test_accuracy"] == json.loads((straight / "summary.json").read_text())[
      "test_accuracy"]


# -- a workdir is one run -----------------------------------------------------------------

def test_workdir_is_one_run(tmp_path, tiny):
  wd = str(tmp_path)
  experiment.train(tiny("num_steps=4"), wd)
  first = json.loads((tmp_path / "summary.json").read_text())
  with pytest.raises(experiment.ConfigError, match=r"seed \(0 there, 7 asked\).*--restart"):
    experiment.train_and_evaluate(tiny_config("num_steps=4", "seed=7"), wd)
  with pytest.raises(experiment.ConfigError, match=r"protocol.name \('partial_straggler' "
                     r"there, 'uncoded' asked\), straggler.failure_prob"):
    experiment.train_and_evaluate(
        tiny_config("num_steps=4", "failure_prob=1.0", "protocol=uncoded"), wd)
  assert (tmp_path / "config.json").read_text().count('"seed": 0') == 1

  # Resuming at the final step, and asking for fewer steps: nothing to train, full summary.
  for n in (4, 2):
    experiment.open_workdir(tiny_config(f"num_steps={n}"), wd)     # accepted
    experiment.train(tiny(f"num_steps={n}"), wd)
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("test_accuracy", "test_loss", "sim_time_to_target", "sim_time"):
      assert summary[key] == first[key], key
    assert summary["steps"] == 4 and summary["resumed_from"] == 4
    # Wall time counts every invocation (up to the checkpoint), not just this one.
    assert summary["wall_time_s"] > summary["session_wall_time_s"] > 0
    assert summary["wall_time_s"] > 0.5 * first["wall_time_s"]
  # Broken newest checkpoints (emptied data files; a removed item folder): the run falls
  # back to the newest one that restores, and replays to the same result.
  ck = tmp_path / "checkpoints"
  assert _finalized(tmp_path) == [2, 3, 4]
  for root, _, files in os.walk(ck / "4" / "state" / "d"):
    for name in files:
      open(os.path.join(root, name), "w").close()
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.rmtree(ck / "3" / "state")
  experiment.train(tiny("num_steps=4"), wd)
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["resumed_from"] == 2 and summary["test_accuracy"] == first["test_accuracy"]
  assert summary["sim_time"] == first["sim_time"]
  assert [r["step"] for r in read(wd) if "loss" in r] == [1, 2, 3, 4]
  assert sorted(p.name for p in (tmp_path / "broken_checkpoints").iterdir()) == ["3", "4"]
  # --restart accepts another config and starts over.
  assert experiment.open_workdir(tiny_config("seed=7"), wd, restart=True) is None
  experiment.train(tiny("num_steps=2"), wd, restart=True)
  assert [r["step"] for r in read(wd) if "loss" in r] == [1, 2]
  assert not (tmp_path / "broken_checkpoints").exists()
  assert json.loads((tmp_path / "summary.json").read_text())["resumed_from"] == 0


def test_compare_checks_every_protocol_before_training(tmp_path):
  with pytest.raises(experiment.ConfigError, match=r"--compare=.*'orignal'.*Did you mean original"):
    experiment.compare_protocols(tiny_config("num_steps=2"), str(tmp_path / "cmp"),
                                 ("uncoded", "orignal"))
  assert not (tmp_path / "cmp").exists()


# -- simulated time, summary, plots ---------------------------------------------------------

def test_total_failure_costs_the_time_the_ps_waits(tmp_path):
  """Every worker fails: every step is skipped and costs the timeout (exact mode) or the
  deadline (deadline mode), not zero."""
  exact = experiment.train_and_evaluate(
      tiny_config("num_steps=2", "failure_prob=1.0", "checkpoint_every=0"), str(tmp_path / "e"))
  summary = json.loads((tmp_path / "e" / "summary.json").read_text())
  assert int(exact.num_skipped) == 2
  assert summary["timeout"] > 0
  assert float(exact.sim_time) > 0
  assert float(exact.sim_time) == pytest.approx(2 * summary["timeout"], rel=1e-5)
  dl = experiment.train_and_evaluate(
      tiny_config("num_steps=2", "failure_prob=1.0", "checkpoint_every=0", "mode=deadline",
                  "deadline=4.5"), str(tmp_path / "d"))
  assert float(dl.sim_time) == pytest.approx(9.0)


def test_default_timeout_is_three_median_uncoded_step_times():
  """Near-constant chunk times of 1: the uncoded step takes 1 (one chunk per worker)."""
  config = tiny_config("straggler.name=shifted_exponential", "straggler.rate=1e6")
  asg = experiment.make_assignment(config)
  model = experiment.make_straggler_model(config, failure_prob=0.0)
  import jax  # pylint: disable=import-outside-toplevel
  t = experiment.default_timeout(asg, model, jax.random.key(0))
  assert t == pytest.approx(experiment.TIMEOUT_FACTOR * 1.0, rel=1e-4)


def test_plot_marks_time_to_target_in_the_legend(tmp_path):
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
      {"step": 0, "sim_time": 0.0, "test_accuracy": 0.1},
      {"step": 5, "sim_time": 20.0, "test_accuracy": 0.97},
  ]) + '{"step": 6, "sim')                              # a line cut off by a crash
  fig = experiment.plot_accuracy_vs_time({"ps": str(tmp_path)}, str(tmp_path / "p.png"), 0.95)
  ax = fig.axes[0]
  labels = [t.get_text() for t in ax.get_legend().get_texts()]
  assert any("reaches 95%" in s and "20" in s for s in labels), labels
  assert ax.get_title()
  assert experiment.time_to_target(read(tmp_path), 0.95) == 20.0


# -- config: aliases, registries ----------------------------------------------------------

ALIAS_CASES = [   # old flag -> (new path, value)
    ("num_steps=7", "num_steps", 7),
    ("seed=3", "seed", 3),
    ("protocol=original", "protocol.name", "original"),
    ("mode=deadline", "step.mode", "deadline"),
    ("deadline=2.5", "step.deadline", 2.5),
    ("ell=3", "protocol.ell", 3),
    ("load=5", "assignment.load", 5),
    ("num_workers=10", "assignment.num_workers", 10),
    ("straggler.name=pareto", "straggler.name", "pareto"),
    ("straggler.shift=2.0", "straggler.slowdown.shift", 2.0),
    ("straggler.factor=3.0", "straggler.slowdown.factor", 3.0),
    ("failure_prob=0.1", "straggler.failure_prob", 0.1),
    ("message_loss_prob=0.2", "step.message_loss_prob", 0.2),
    ("nan_message_prob=0.3", "step.nan_message_prob", 0.3),
    ("checkpoint_every=5", "checkpoint_every", 5),
    ("timeout=40", "step.timeout", 40.0),
    ("hidden=(8,)", "model.mlp.hidden", (8,)),
    ("optimizer=sgd", "optimizer.name", "sgd"),
    ("learning_rate=0.5", "optimizer.learning_rate", 0.5),
    ("dataset=synthetic_linear", "data.name", "synthetic_linear"),
    ("num_backup=2", "protocol.backup_workers.num_backup", 2),
    ("seq_len=32", "data.pystdlib.seq_len", 32),
    ("corpus_bytes=5000", "data.pystdlib.max_bytes", 5000),
    ("d_model=32", "model.transformer_lm.d_model", 32),
]


@pytest.mark.parametrize("flag,path,value", ALIAS_CASES, ids=[c[0] for c in ALIAS_CASES])
def test_old_flags_are_aliases(flag, path, value):
  config = experiment.apply_overrides(default_config.get_config(), [flag.split("=", 1)])
  node = config
  for key in path.split("."):
    node = node[key]
  assert node == value


def test_straggler_params_follow_the_chosen_model():
  config = experiment.apply_overrides(default_config.get_config(), [
      ("straggler.alpha", "1.5"), ("straggler.name", "pareto")])
  assert config.straggler.pareto.alpha == 1.5 and config.straggler.slowdown.fraction == 0.2
  assert experiment.make_straggler_model(config).alpha == 1.5


def test_new_library_protocol_needs_no_edit(monkeypatch):
  """A protocol registered in the library is a --config.protocol.name with its options."""
  class Scaled(protocols.Uncoded):
    name = "scaled_uncoded"

    def __init__(self, assignment, ell=1, *, factor=1.0, **kwargs):
      super().__init__(assignment, **kwargs)
      self.factor = factor

  monkeypatch.setitem(protocols.PROTOCOLS, "scaled_uncoded", Scaled)
  config = experiment.apply_overrides(default_config.get_config(), [
      ("protocol", "scaled_uncoded"), ("protocol.scaled_uncoded.factor", "2.5")])
  proto = experiment.make_protocol(config, experiment.make_assignment(config))
  assert isinstance(proto, Scaled) and proto.factor == 2.5
  config.protocol.scaled_uncoded.fctor = 1.0
  with pytest.raises(experiment.ConfigError, match=r"--config.protocol.scaled_uncoded.fctor"):
    experiment.make_protocol(config, experiment.make_assignment(config))


def test_ray_backend_without_ray_is_one_line(monkeypatch):
  monkeypatch.setitem(sys.modules, "ray", None)          # as if Ray were not installed
  monkeypatch.delitem(sys.modules, "jaxgc.ray_backend", raising=False)
  config = tiny_config("backend=ray")
  proto = experiment.make_protocol(config, experiment.make_assignment(config))
  with pytest.raises(experiment.ConfigError, match=r"--config.backend.*needs Ray: pip install "
                                                   r"'jaxgc\[ray\]'"):
    experiment.make_step(config, proto, experiment.make_straggler_model(config),
                         lambda params, chunk: 0.0, experiment.make_optimizer(config), None)


class HostStep:
  """A step on the host (``traced=False``, as Ray's) wrapping the SPMD step; reports wall time."""
  traced, layout = False, None

  def __init__(self, step):
    self.step, self.assignment = step, step.assignment
    self._update = jax.jit(step.update)

  def init_state(self, params, key):
    return self.step.init_state(params, key)

  def update(self, state, chunks, key):
    state, metrics = self._update(state, chunks, key)
    return state, dict(metrics, wall_time=0.25)

  def gradient(self, params, chunks, key):
    return self.step.gradient(params, chunks, key)

  def placement(self, params):
    return None

  def state_sharding(self, state):
    return None

  def close(self):
    pass


def test_loop_drives_a_host_step_and_logs_wall_time(tmp_path, tiny):
  exp = tiny("num_steps=2", "checkpoint_every=0")
  assert isinstance(HostStep(exp.step), StepBackend)   # what any backend declares
  straight = experiment.train(exp, str(tmp_path / "spmd"))
  config = tiny_config("num_steps=2", "checkpoint_every=0", "backend=ray")
  state = experiment.train(exp._replace(config=config, step=HostStep(exp.step)),
                           str(tmp_path / "host"))
  steps = [r for r in read(tmp_path / "host") if "loss" in r]
  assert [r["wall_time"] for r in steps] == [0.25, 0.5]
  assert [r["loss"] for r in steps] == [r["loss"] for r in read(tmp_path / "spmd") if "loss" in r]
  assert float(state.sim_time) == float(straight.sim_time)

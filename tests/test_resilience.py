"""Runs that survive the real world (issue #21): preemption by SIGTERM/SIGINT, a second
process on a workdir, a new device count, corrupt checkpoints, a damaged log, a full or
read-only disk, non-finite inputs, and a deterministic fault schedule."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

from configs import default as default_config
from jaxgc import assignments, experiment, parallel, protocols, timing
from jaxgc.experiment import checkpoints, runs
from tests import warm
from tests.helpers import digits_mlp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
# 4 workers, a linear model: fast. num_devices=8 pads the 4 workers to 8, 4 does not.
TINY = ("num_workers=4", "load=2", "ell=1", "batch_size=64", "model=linear", "eval_every=3")


def config(*flags):
  return experiment.apply_overrides(default_config.get_config(), [
      f.split("=", 1) for f in (*TINY, "num_cpu_devices=8", *flags)])


@pytest.fixture(scope="module")
def tiny():
  """Built experiments per device count: train() on one again compiles nothing new."""
  built = {}

  def make(*flags, devices=2):
    if devices not in built:
      built[devices] = experiment.build(config("num_steps=4", f"num_devices={devices}"))
    return built[devices]._replace(config=config(f"num_devices={devices}", *flags))
  return make


def env(cache_dir):
  e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  e.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache_dir))   # (conftest: the session's)
  e.update(PYTHONPATH=ROOT, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return e


def params(workdir):
  with np.load(os.path.join(workdir, "final_params.npz")) as z:
    return {k: z[k] for k in z.files}


def assert_same_params(a, b):
  pa, pb = params(a), params(b)
  assert pa.keys() == pb.keys()
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k])


def step_lines(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  return open(path).read().count('"loss"') if os.path.exists(path) else 0


def wait_for(cond, proc, timeout=300):
  deadline = time.time() + timeout
  while not cond():
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline, "timed out"
    time.sleep(0.005)


def strict_lines(workdir):
  """metrics.jsonl parsed as strict JSON (a bare NaN token fails)."""
  def bad(token):
    raise ValueError(f"not JSON: {token}")
  return [json.loads(line, parse_constant=bad) for line in
          open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()]


# -- preemption and the workdir lock, with real processes and signals ------------------

def test_sigterm_and_sigint_save_and_resume_bit_identical_and_lock(tmp_path, tiny):
  n = 300
  flags = [f"--config.{f}" for f in (*TINY, "num_devices=2", f"num_steps={n}",
                                     "checkpoint_every=100", "eval_every=7")]
  straight = str(tmp_path / "straight")
  experiment.train(tiny(f"num_steps={n}", "checkpoint_every=0", "eval_every=7"), straight)
  wd, e = str(tmp_path / "run"), env(tmp_path / "cache")
  cmd = [sys.executable, TRAIN, f"--workdir={wd}", *flags]
  popen = lambda: warm.Popen(cmd, cwd=tmp_path, env=e, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)

  # 1. SIGTERM: the run is frozen (SIGSTOP) mid-training with the signal pending, while a
  #    second process on the same workdir is refused at once, naming the holder.
  a = popen()
  wait_for(lambda: step_lines(wd) >= 5, a)
  os.kill(a.pid, signal.SIGSTOP)
  os.kill(a.pid, signal.SIGTERM)
  try:
    b = warm.run(cmd, cwd=tmp_path, env=e, capture_output=True, text=True, timeout=300)
  finally:
    os.kill(a.pid, signal.SIGCONT)
  lines = b.stderr.strip().splitlines()
  assert b.returncode == 1 and len(lines) == 1, b.stderr[-2000:]
  assert f"is in use by pid {a.pid} on host " in lines[0] and wd in lines[0], lines
  _, err = a.communicate(timeout=300)
  stop = [line for line in err.splitlines() if "stopped at step" in line]
  assert a.returncode == 128 + signal.SIGTERM, err[-2000:]
  assert "Traceback" not in err and "cannot schedule" not in err, err[-3000:]
  logged = step_lines(wd)
  assert 5 <= logged < n and logged % 100, logged     # not a regular checkpoint step
  assert stop == [f"stopped at step {logged} (SIGTERM); rerun the same command to resume"]
  summary = json.loads(open(os.path.join(wd, "summary.json")).read())
  assert summary["steps"] == logged and summary["stopped_by"] == "SIGTERM"
  ck = os.path.join(wd, "checkpoints")
  assert str(logged) in os.listdir(ck) and not [p for p in os.listdir(ck) if "tmp" in p]
  assert checkpoints.check_manifest(os.path.join(ck, str(logged))) is None

  # 2. SIGINT (Ctrl-C) later in the resumed run.
  c = popen()
  wait_for(lambda: step_lines(wd) >= logged + 5, c)
  os.kill(c.pid, signal.SIGINT)
  _, err = c.communicate(timeout=300)
  assert c.returncode == 128 + signal.SIGINT, err[-2000:]
  assert f"resuming {wd} from step {logged}" in err
  assert "Traceback" not in err and "cannot schedule" not in err, err[-3000:]
  second = step_lines(wd)
  assert [line for line in err.splitlines() if "stopped at step" in line] == [
      f"stopped at step {second} (SIGINT); rerun the same command to resume"]

  # 3. A holder killed with SIGKILL leaves its lock behind; the next run takes it over.
  holder = warm.Popen([sys.executable, "-c", "import sys, time; from jaxgc.experiment "
                             "import runs; runs.WorkdirLock(sys.argv[1]).acquire(); "
                             "print('held', flush=True); time.sleep(600)", wd],
                            env=e, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  holder.kill()
  holder.wait()
  d = warm.run(cmd, cwd=tmp_path, env=e, capture_output=True, text=True, timeout=300)
  assert d.returncode == 0, d.stderr[-3000:]
  assert f"took over the lock of pid {holder.pid} on host" in d.stderr
  assert experiment.read_metrics(wd) == experiment.read_metrics(straight)
  assert_same_params(wd, straight)


# -- checkpoints free of the device layout ----------------------------------------------

def test_device_count_8_to_4_and_back_resumes(tmp_path, tiny, capsys):
  flags = ("checkpoint_every=2", "max_checkpoints=2")
  straight, wd = str(tmp_path / "straight"), str(tmp_path / "run")
  experiment.train(tiny("num_steps=9", *flags, devices=8), straight)
  experiment.train(tiny("num_steps=4", *flags, devices=8), wd)
  experiment.train(tiny("num_steps=7", *flags, devices=4), wd)       # 8 workers' rows -> 4
  assert json.loads(open(os.path.join(wd, "summary.json")).read())["resumed_from"] == 4
  experiment.train(tiny("num_steps=9", *flags, devices=8), wd)       # and back
  summary = json.loads(open(os.path.join(wd, "summary.json")).read())
  assert summary["resumed_from"] == 7 and summary["steps"] == 9
  assert not os.path.exists(os.path.join(wd, "broken_checkpoints"))
  assert "skipped" not in capsys.readouterr().err
  # (The shorter invocations add their final evaluations, at steps 4 and 7.)
  ours, theirs = [[r for r in experiment.read_metrics(d) if "loss" in r] for d in (wd, straight)]
  assert [r["step"] for r in ours] == [r["step"] for r in theirs] == list(range(1, 10))
  # The plans (durations, stop times) do not depend on the layout: simulated time is exact.
  assert [r["sim_time"] for r in ours] == [r["sim_time"] for r in theirs]
  pa, pb = params(wd), params(straight)     # the decode's psum order differs: round-off only
  for k in pa:
    np.testing.assert_allclose(pa[k], pb[k], rtol=1e-5, atol=1e-6)


# -- integrity -----------------------------------------------------------------------------

def _data_file(checkpoint):
  files = [os.path.join(r, f) for r, _, fs in os.walk(checkpoint) for f in fs
           if os.path.basename(r) == "d"]
  return max(files, key=os.path.getsize)


def test_corrupt_checkpoints_are_named_moved_aside_and_never_restart_over_results(
    tmp_path, tiny, capsys):
  flags = ("num_steps=6", "checkpoint_every=2", "max_checkpoints=3")
  straight, wd = str(tmp_path / "straight"), str(tmp_path / "run")
  experiment.train(tiny(*flags, "checkpoint_every=0"), straight)
  experiment.train(tiny(*flags), wd)
  ck = os.path.join(wd, "checkpoints")
  damage = {   # a flipped bit; 64 overwritten bytes
      "flip": lambda b: b[:len(b) // 2] + bytes([b[len(b) // 2] ^ 1]) + b[len(b) // 2 + 1:],
      "overwrite": lambda b: b[:16] + bytes(range(64)) + b[80:],
  }
  for i, (name, fn) in enumerate(damage.items()):
    path = _data_file(os.path.join(ck, "6"))
    with open(path, "rb") as f:
      data = f.read()
    with open(path, "wb") as f:
      f.write(fn(data))
    capsys.readouterr()
    experiment.train(tiny(*flags), wd)
    err = capsys.readouterr().err
    assert "set aside checkpoint 6" in err and "corrupt" in err, (name, err)
    assert "resuming" in err and "from step 4" in err, err
    aside = os.path.join(wd, "broken_checkpoints", "6" if i == 0 else "6.1")
    assert os.path.isdir(aside)
    assert json.loads(open(os.path.join(wd, "summary.json")).read())["resumed_from"] == 4
    assert_same_params(wd, straight)
  # Every checkpoint corrupt: one line naming why and the fix, and nothing overwritten.
  for step in os.listdir(ck):
    path = _data_file(os.path.join(ck, step))
    with open(path, "r+b") as f:
      f.write(b"\0" * 64)
  before = {n: open(os.path.join(wd, n), "rb").read()
            for n in ("metrics.jsonl", "summary.json", "final_params.npz")}
  with pytest.raises(experiment.ConfigError, match=r"cannot resume: no checkpoint restores.*"
                     r"--restart"):
    experiment.train(tiny(*flags), wd)
  with pytest.raises(experiment.ConfigError, match=r"cannot resume"):   # and again
    experiment.train(tiny(*flags), wd)
  for n, content in before.items():
    assert open(os.path.join(wd, n), "rb").read() == content, n


# -- the metrics log ---------------------------------------------------------------------

def test_damaged_log_lines_are_dropped_and_evaluations_rewritten(tmp_path, tiny, capsys):
  flags = ("num_steps=6", "checkpoint_every=3")
  straight, wd = str(tmp_path / "straight"), str(tmp_path / "run")
  experiment.train(tiny(*flags), straight)
  experiment.train(tiny(*flags), wd)
  path = os.path.join(wd, "metrics.jsonl")
  lines = open(path).read().splitlines()
  assert json.loads(lines[-1])["step"] == 6 and "test_accuracy" in lines[-1]
  lines[3] = lines[3][:10] + "\x00garbage"                  # a broken line in the middle
  open(path, "w").write("\n".join(lines[:-1]) + "\n" + lines[-1][:20])   # final eval cut
  capsys.readouterr()
  experiment.train(tiny(*flags), wd)
  err = capsys.readouterr().err
  assert "dropped 2 line(s) that do not parse (line 4, 9)" in err, err
  expect = [r for i, r in enumerate(experiment.read_metrics(straight)) if i != 3]
  assert experiment.read_metrics(wd) == expect      # the step-6 evaluation is written again


def test_nonfinite_inputs_warn_once_and_log_valid_json(tmp_path, tiny, capsys):
  exp = tiny("num_steps=3", "checkpoint_every=0")
  x = exp.dataset.x_train.copy()
  x[:, 0] = np.nan                                      # every example: every chunk
  exp = exp._replace(dataset=exp.dataset._replace(x_train=x))
  capsys.readouterr()
  state = experiment.train(exp, str(tmp_path))
  err = capsys.readouterr().err
  warnings = [line for line in err.splitlines() if "warning:" in line]
  assert len(warnings) == 1 and "NaN/Inf" in warnings[0] and "step 1" in warnings[0], err
  assert int(state.num_skipped) == 3
  records = strict_lines(tmp_path)
  assert [r["loss"] for r in records if "loss" in r] == [None] * 3
  assert runs.json_line({"a": float("inf"), "b": [1.0, float("nan")]}) == \
      '{"a": null, "b": [1.0, null]}\n'


# -- a full or read-only disk --------------------------------------------------------------

def _mount(path, options):
  out = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                       capture_output=True, text=True)
  if out.returncode:
    pytest.skip(f"cannot mount a tmpfs here (needs root): {out.stderr.strip()}")


def _tree_digest(path):
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for f in sorted(files):
      h.update(f.encode())
      with open(os.path.join(root, f), "rb") as fh:
        h.update(fh.read())
  return h.hexdigest()


def test_full_and_read_only_workdir_is_one_line_and_keeps_what_is_saved(tmp_path, tiny):
  """A real small file system (tmpfs, mounted as root): filled up, then read-only."""
  mnt = tmp_path / "mnt"
  mnt.mkdir()
  _mount(mnt, "size=200k")
  try:
    wd, straight = str(mnt / "run"), str(tmp_path / "straight")
    flags = ("checkpoint_every=1", "max_checkpoints=2")
    experiment.train(tiny("num_steps=40", *flags[:1]), straight)
    with pytest.raises(experiment.ConfigError, match=r"^--workdir=.*/mnt/run: cannot be "
                       r"written: the disk is full"):
      experiment.train(tiny("num_steps=40", *flags), wd)
    saved = [int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit()]
    assert saved and 0 < max(saved) < 40
    subprocess.run(["mount", "-o", "remount,size=20m", str(mnt)], check=True)
    experiment.train(tiny("num_steps=40", *flags), wd)       # resumes from what was saved
    assert json.loads(open(os.path.join(wd, "summary.json")).read())["resumed_from"] > 0
    assert_same_params(wd, straight)

    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    before = _tree_digest(wd)
    with pytest.raises(experiment.ConfigError, match=r"^--workdir=.*/mnt/run: cannot be "
                       r"written: it is on a read-only file system"):
      experiment.train_and_evaluate(config("num_devices=2", "num_steps=50", *flags), wd)
    assert _tree_digest(wd) == before
  finally:
    subprocess.run(["umount", "-l", str(mnt)], check=False)


# -- a deterministic fault schedule --------------------------------------------------------

def test_fail_at_in_the_spmd_step_and_the_config(tiny):
  ds, _, params, loss_fn, train = digits_mlp((16,), 120)
  asg = assignments.cyclic(6, 3)
  proto = protocols.get_protocol("partial_straggler", asg, 1)
  mesh = parallel.make_mesh(3)
  tx = optax.sgd(1.0)
  fail_at = [(0, 1), (2, 1), (5, 2), (1, 2), (3, 2), (4, 2)]   # step 2: 5 of 6 fail
  model = timing.get_model("shifted_exponential", shift=1.0, rate=1.0)
  coded = parallel.make_coded_step(proto, model, loss_fn, tx, mesh, fail_at=fail_at)
  free = parallel.make_coded_step(proto, model, loss_fn, tx, mesh)
  key = jax.random.key(0)
  for step in range(4):
    counts = np.asarray(coded.plan_step(key, step)[0].counts)
    free_counts = np.asarray(free.plan_step(key, step)[0].counts)
    failed = [w for w, s in fail_at if s == step]
    assert (counts[failed] == 0).all(), (step, counts)
    if not failed:
      np.testing.assert_array_equal(counts, free_counts)
  # Step 1 (workers 0 and 2 fail) still decodes the exact gradient; step 2 (only 0 and 2
  # left: chunk 5 uncovered) cannot.
  chunks = jax.tree.map(lambda a: a[:120].reshape((asg.num_chunks, -1) + a.shape[1:]), train)
  state = coded.init_state(params, key)
  update = coded.jit()
  state, m0 = update(state, chunks, key)
  exact = parallel.make_plain_step(asg, loss_fn, tx, mesh).gradient(state.params, chunks)[0]
  before = state.params
  state, m1 = update(state, chunks, key)
  assert bool(m1["exact"]) and not bool(m1["skipped"])
  jax.tree.map(lambda p, q, g: np.testing.assert_allclose(q, p - g, rtol=1e-5, atol=1e-6),
               before, state.params, exact)
  state, m2 = update(state, chunks, key)
  assert not bool(m2["decodable"]) and not bool(m2["exact"]) and int(m2["senders"]) == 2
  # The config: --config.step.fail_at, a one-line error naming the flag.
  exp = experiment.build(config("num_steps=2", "num_devices=2", "step.fail_at=[(1, 0)]"))
  assert exp.step.fail_at.pairs == ((1, 0),)
  for bad, match in (("[(9, 0)]", "worker 9 is not one of the 4 workers"),
                     ("(1, 0)", "each entry is a .worker, step. pair")):
    with pytest.raises(experiment.ConfigError, match=rf"^--config.step.fail_at=.*{match}"):
      experiment.build(config("num_steps=2", "num_devices=2", f"step.fail_at={bad}"))

"""grain input pipelines (issue #27): the built-in datasets' batches unchanged, a
checkpointable chunked iterator, a user's own data through train.py (SIGTERM, resume
bit for bit) and the bad-input lines."""
import hashlib
import json
import os
import signal
import subprocess
import sys

import grain
import numpy as np
import pytest

from configs import default as default_config
from jaxgc import data, experiment
from jaxgc.errors import ParamError
from tests import custom_source, warm
from tests.test_resilience import assert_same_params, env, step_lines, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
SOURCE = "tests.custom_source:splits"
CUSTOM = ("data.name=custom", f"data.custom.source={SOURCE}", "num_workers=4", "load=2",
          "ell=1", "batch_size=64", "model=linear", "num_devices=2")

# sha256 of the chunks (x, then y) of steps 0, 1, 2, 3, 4, 5, 9 of digits (1438 training
# examples: steps 4, 5, 9 are in later epochs), drawn by the StepInput of before the grain
# pipeline (jaxgc.experiment.inputs at the commit before issue #27).
BEFORE = {(0, 320, 20): "0a32611b686e97fec0e797320b0baecf09a28231317b0ffa3b50c17ed4e8cead",
          (3, 640, 8): "f141bb1e0f53db640317d4a9db97d36a1053488a7e5e9bea5216f1aaed72a023"}
STEPS = (0, 1, 2, 3, 4, 5, 9)


def digest(chunks_per_step):
  h = hashlib.sha256()
  for x, y in chunks_per_step:
    h.update(np.ascontiguousarray(x).tobytes())
    h.update(np.ascontiguousarray(y).tobytes())
  return h.hexdigest()


@pytest.fixture(scope="module")
def digits():
  return data.load("digits")


def test_builtin_pipeline_reproduces_the_batches_of_before(digits):
  train = (digits.x_train, digits.y_train)
  for (seed, batch, n), want in BEFORE.items():
    inputs = experiment.StepInput(train, seed=seed, batch_size=batch, num_chunks=n)
    assert isinstance(inputs.chunks, grain.MapDataset)
    assert digest(inputs.host_chunks(s) for s in STEPS) == want
    # The library's iterator with the int seed reads train.py's batches, in order.
    it = data.chunked(train, n, batch, seed)
    assert isinstance(it, grain.DatasetIterator)
    got = [next(it) for _ in range(max(STEPS) + 1)]
    assert digest(got[s] for s in STEPS) == want
    # ... and they are the ones drawn in the graph from the data key.
    for s in (0, 5):
      direct = data.step_chunks(train, experiment.keys(seed)[1], s, batch, n)
      for a, b in zip(got[s], direct, strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_iterator_state_resumes_exactly_over_any_grain_source():
  x, y = custom_source.arrays()
  train, _ = custom_source.splits()       # a MapDataset of {"x", "y"}, read one by one
  n, batch, seed = 4, 64, 11
  lazy, held = data.chunked(train, n, batch, seed), data.chunked({"x": x, "y": y}, n, batch,
                                                                 seed)
  straight = [next(lazy) for _ in range(9)]            # 300 // 64 = 4 steps per epoch
  for a, b in zip(straight, [next(held) for _ in range(9)], strict=True):
    assert a.keys() == {"x", "y"} and a["x"].shape == (n, batch // n, 6)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  # Stop after 5 steps, resume from the JSON state in a new iterator: the same steps 5..8.
  first = data.chunked(train, n, batch, seed)
  for _ in range(5):
    next(first)
  state = json.loads(json.dumps(first.get_state()))
  assert state["step"] == 5
  resumed = data.chunked(train, n, batch, seed)
  resumed.set_state(state)
  for want in straight[5:]:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  # Another seed's (or batch's) state is refused, naming the parameter.
  for other in (data.chunked(train, n, batch, seed + 1), data.chunked(train, n, 32, seed)):
    with pytest.raises(ParamError, match="another pipeline's") as e:
      other.set_state(state)
    assert e.value.param == "state"


def test_bad_library_inputs_name_the_argument():
  train, _ = custom_source.splits()
  cases = [
      (lambda: data.chunked(train, 3, 64), "batch_size", "not a multiple of the number of "
       "chunks 3"),
      (lambda: data.chunked(5, 4, 64), "dataset", "must be a grain.MapDataset"),
      (lambda: data.chunked(train, 4, 64, seed="0"), "seed", "an int or a PRNG key"),
      (lambda: next(data.chunked(train.map(lambda e: e if e["y"] else (e["x"],)), 4, 64)),
       "dataset", "every example must have one structure"),
      (lambda: data.load("custom", source="tests.no_such_module:splits"), "source",
       "is not importable"),
      (lambda: data.load("custom", source="tests.custom_source"), "source", "MODULE:FUNCTION"),
      (lambda: data.load("custom", source="tests.custom_source:nothing"), "source",
       "has no function 'nothing'"),
      (lambda: data.load("custom", source="tests.custom_source:arrays"), "source",
       "must be a dict {'x': features, 'y': label}"),
      (lambda: data.load("custom", source="tests.custom_source:tuples"), "source",
       "train example 0 is tuple"),
      (lambda: data.load("custom", source=SOURCE, num_classes=2), "num_classes",
       "labels span 0..2"),
  ]
  for call, param, message in cases:
    with pytest.raises(ParamError, match=message.replace("{", r"\{").replace("(", r"\(")) as e:
      call()
    assert e.value.param == param, (param, e.value)


def test_custom_source_matches_its_arrays():
  ds = data.load("custom", source=SOURCE)
  x, y = custom_source.arrays()
  np.testing.assert_array_equal(ds.x_train, x)
  np.testing.assert_array_equal(ds.y_train, y)
  assert ds.num_classes == 3 and ds.x_test.shape == (custom_source.NUM_TEST, 6)


def test_custom_source_through_train_py_survives_sigterm_and_resumes_bit_identical(tmp_path):
  n = 300
  run_flags = (*CUSTOM, f"num_steps={n}", "eval_every=7")
  straight = str(tmp_path / "straight")
  cfg = experiment.apply_overrides(default_config.get_config(), [
      f.split("=", 1) for f in (*run_flags, "checkpoint_every=0", "num_cpu_devices=8")])
  experiment.train(experiment.build(cfg), straight)
  wd, e = str(tmp_path / "run"), env(tmp_path / "cache")
  cmd = [sys.executable, TRAIN, f"--workdir={wd}",
         *[f"--config.{f}" for f in (*run_flags, "checkpoint_every=100")]]
  a = warm.Popen(cmd, cwd=tmp_path, env=e, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
  wait_for(lambda: step_lines(wd) >= 5, a)
  os.kill(a.pid, signal.SIGTERM)
  _, err = a.communicate(timeout=300)
  assert a.returncode == 128 + signal.SIGTERM == 143, err[-2000:]
  assert "Traceback" not in err, err[-3000:]
  logged = step_lines(wd)
  assert 5 <= logged < n and logged % 100, logged     # saved at the stop, not on schedule
  with open(os.path.join(wd, "checkpoints", str(logged), "meta", "metadata")) as f:
    state = json.load(f)["input"]                     # the grain iterator's state
  x, y = custom_source.arrays()
  inputs = experiment.StepInput((x, y), seed=0, batch_size=64, num_chunks=4)
  assert state == inputs.get_state(logged) and state["step"] == logged
  inputs.set_state(state, logged, wd)
  # A checkpoint read from other data, or at another step, does not resume.
  changed = experiment.StepInput((x[::-1], y), seed=0, batch_size=64, num_chunks=4)
  with pytest.raises(experiment.ConfigError, match="data_sha256 differ"):
    changed.set_state(state, logged, wd)
  with pytest.raises(experiment.ConfigError, match=f"input state of step {logged}"):
    inputs.set_state(state, logged + 1, wd)
  b = warm.run(cmd, cwd=tmp_path, env=e, capture_output=True, text=True, timeout=300)
  assert b.returncode == 0, b.stderr[-3000:]
  assert f"resuming {wd} from step {logged}" in b.stderr
  assert experiment.read_metrics(wd) == experiment.read_metrics(straight)
  assert_same_params(wd, straight)


def test_bad_inputs_through_train_py_are_one_line(tmp_path):
  e = env(tmp_path / "cache")
  cases = {
      "data.custom.source=tests.no_such_module:splits":
          "--config.data.custom.source='tests.no_such_module:splits': source "
          "'tests.no_such_module:splits' is not importable",
      "data.custom.source=tests.custom_source:tuples":
          "--config.data.custom.source='tests.custom_source:tuples': source "
          "'tests.custom_source:tuples': train example 0 is tuple; each example must be a dict",
      "batch_size=66": "--config.batch_size=66: batch_size=66 examples is not a multiple of the "
                       "number of chunks 4",
  }
  procs = {flag: warm.Popen(
      [sys.executable, TRAIN, f"--workdir={tmp_path / str(i)}",
       *[f"--config.{f}" for f in (*CUSTOM, flag)]], cwd=tmp_path, env=e,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i, flag in enumerate(cases)}
  for flag, proc in procs.items():
    out, err = proc.communicate(timeout=300)
    lines = err.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, err[-2000:]
    assert lines[0].startswith(f"train.py: error: {cases[flag]}"), lines[0]
    assert not os.path.exists(tmp_path / str(list(cases).index(flag))), flag  # nothing written

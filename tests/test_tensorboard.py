"""TensorBoard events of train.py (issue #27.3): every metric of metrics.jsonl once per step,
read back with TensorBoard's own EventAccumulator, after a resume too; the counts
histogram; the config as text; --config.tensorboard=False."""
import json
import math
import os
import shutil

import ml_collections
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from configs import default as default_config
from jaxgc import experiment
from jaxgc.experiment import tensorboard

# A small fast run: 4 workers on 2 CPU devices, a linear model (as tests/test_runs.py).
TINY = ("num_devices=2", "num_workers=4", "load=2", "ell=1", "batch_size=64", "model=linear",
        "eval_every=3", "checkpoint_every=5", "max_checkpoints=3", "num_cpu_devices=8")


def tiny_config(*flags):
  return experiment.apply_overrides(default_config.get_config(),
                                    [f.split("=", 1) for f in (*TINY, *flags)])


@pytest.fixture(scope="module")
def tiny():
  """One built tiny experiment: train() on it again compiles nothing new."""
  exp = experiment.build(tiny_config("num_steps=4"))
  return lambda *flags: exp._replace(config=tiny_config(*flags))


def read_events(logdir):
  """``{tag: [(step, value), ...]}`` of the scalars, and the accumulator."""
  acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0,
                                                      "tensors": 0})
  acc.Reload()
  return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}, acc


def expected(records):
  """``{tag: [(step, value), ...]}`` that metrics.jsonl's records make (as float32)."""
  out: dict = {}
  for r in records:
    group = "train" if "loss" in r else "eval"
    for k, v in r.items():
      if k != "step" and not isinstance(v, (list, dict, str)):
        out.setdefault(f"{group}/{k}", []).append(
            (r["step"], float(np.float32(math.nan if v is None else v))))
  return out


def assert_events_match_log(workdir):
  scalars, acc = read_events(os.path.join(workdir, "tensorboard"))
  want = expected(experiment.read_metrics(workdir))
  assert set(scalars) == set(want)
  for tag, points in want.items():
    got = scalars[tag]
    assert [s for s, _ in got] == [s for s, _ in points], tag   # once per step, in order
    np.testing.assert_array_equal([v for _, v in got], [v for _, v in points], err_msg=tag)
  # Lists of numbers (the per-worker counts, where the step reports them): one histogram
  # per step record that has one.
  records = experiment.read_metrics(workdir)
  lists = {k for r in records for k, v in r.items() if isinstance(v, list)}
  assert set(acc.Tags()["histograms"]) == {f"train/{k}" for k in lists}
  for k in lists:
    assert [e.step for e in acc.Histograms(f"train/{k}")] == [
        r["step"] for r in records if isinstance(r.get(k), list)], k
  return scalars, acc


def test_events_mirror_metrics_once_per_step_after_resume(tmp_path, tiny):
  wd = str(tmp_path)
  # A run to step 13 that dies after its checkpoint at step 10 (the final checkpoint at 13,
  # forced at the end of a run, is what a kill -9 just before it leaves out).
  experiment.train(tiny("num_steps=13"), wd)
  shutil.rmtree(os.path.join(wd, "checkpoints", "13"))
  scalars, _ = read_events(tmp_path / "tensorboard")
  assert [s for s, _ in scalars["train/loss"]] == list(range(1, 14))

  experiment.train(tiny("num_steps=15"), wd)    # restores step 10; steps 11..13 run again
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["resumed_from"] == 10
  scalars, acc = assert_events_match_log(wd)
  assert [s for s, _ in scalars["train/loss"]] == list(range(1, 16))
  assert [s for s, _ in scalars["eval/test_accuracy"]] == [0, 3, 6, 9, 12, 15]
  for tag in ("step_sim_time", "step_comm_time", "exact", "erasures", "condition_number",
              "sim_time", "skipped", "min_coverage"):
    assert len(scalars[f"train/{tag}"]) == 15, tag
  assert scalars["eval/test_accuracy"][-1][1] == pytest.approx(summary["test_accuracy"])
  assert len(tensorboard.event_files(tmp_path / "tensorboard")) == 1   # the old ones went
  # The config as text: a markdown table with this run's fields.
  [text] = acc.Tensors("config/text_summary")
  table = text.tensor_proto.string_val[0].decode()
  assert "| `assignment.num_workers` | `4` |" in table and "| `num_steps` | `15` |" in table

  # A clean stop (the last step checkpointed) and a longer run: appended, nothing twice.
  experiment.train(tiny("num_steps=17"), wd)
  scalars, _ = assert_events_match_log(wd)
  assert [s for s, _ in scalars["train/loss"]] == list(range(1, 18))

  # Off: nothing is written there (and the field does not change results: same workdir).
  assert experiment.result_fields_differ(tiny_config().to_dict(),
                                         tiny_config("tensorboard=False").to_dict()) == []
  shutil.rmtree(tmp_path / "tensorboard")
  experiment.train(tiny("num_steps=18", "tensorboard=False"), wd)
  assert not (tmp_path / "tensorboard").exists()


def test_counts_histogram_and_non_finite_values(tmp_path):
  """A list of numbers (the per-worker finish counts) is a histogram, integer-binned; a
  non-finite number (null in metrics.jsonl) is NaN, so every step has its point."""
  counts = [[0, 1, 1, 3, 3, 3], [2, 2, 2, 2, 2, 2]]
  records = [{"step": 1, "loss": 0.5, "counts": counts[0], "exact": True},
             {"step": 2, "loss": None, "counts": counts[1], "exact": False}]
  log = tensorboard.EventLog(str(tmp_path), records[:1], {"seed": 0, "data": {"name": "x"}})
  log.write({"step": 2, "loss": math.nan, "counts": np.asarray(counts[1]), "exact": False})
  log.close()
  scalars, acc = read_events(tmp_path)
  assert scalars["train/exact"] == [(1, 1.0), (2, 0.0)]
  assert scalars["train/loss"][0] == (1, 0.5) and math.isnan(scalars["train/loss"][1][1])
  for event, c in zip(acc.Histograms("train/counts"), counts, strict=True):
    h = event.histogram_value
    assert (h.num, h.sum, h.min, h.max) == (len(c), sum(c), min(c), max(c))
    # One bin per integer value v, (v - 1/2, v + 1/2]: the workers that finished v chunks.
    bins = {round(limit - 0.5): n for limit, n in zip(h.bucket_limit, h.bucket, strict=True)}
    assert {v: bins[v] for v in range(min(c), max(c) + 1)} == {
        v: c.count(v) for v in range(min(c), max(c) + 1)}
  # A rebuild from the same records replaces the file: each step once.
  tensorboard.EventLog(str(tmp_path), records).close()
  assert len(tensorboard.event_files(tmp_path)) == 1
  scalars, _ = read_events(tmp_path)
  assert [s for s, _ in scalars["train/loss"]] == [1, 2]


def test_tensorboard_flag_must_be_a_bool():
  config = ml_collections.ConfigDict({**tiny_config().to_dict(), "tensorboard": "yes"})
  with pytest.raises(experiment.ConfigError, match=r"^--config.tensorboard: must be True or "
                     r"False, got 'yes'"):
    experiment.check_config(config)
  with pytest.raises(experiment.ConfigError, match=r"^--config.tensorboard: 'maybe' is not"):
    tiny_config("tensorboard=maybe")

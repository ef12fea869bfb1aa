"""Two processes × 4 CPU devices (gloo) train like one process with 8 devices."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def command(workdir, *extra):
  return [sys.executable, os.path.join(ROOT, "train.py"),
          f"--config={os.path.join(ROOT, 'configs', 'default.py')}", f"--workdir={workdir}",
          "--config.num_steps=6", "--config.eval_every=3", "--config.checkpoint_every=3",
          "--config.hidden=(32,)", "--config.message_loss_prob=0.1",
          # SGD, not Adam: Adam's g/sqrt(v) turns round-off in tiny gradients into
          # lr-sized steps, which would hide real mismatches behind a loose tolerance.
          "--config.optimizer=sgd", "--config.learning_rate=0.5",
          "--config.distributed_timeout=60", *extra]


def run_all(cmds):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # each sets its own count
  env["JAX_PLATFORMS"] = "cpu"
  procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for c in cmds]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=TIMEOUT)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


def params(workdir):
  with np.load(os.path.join(workdir, "final_params.npz")) as z:
    return {k: z[k] for k in z.files}


def test_two_processes_match_one(tmp_path):
  single, multi = tmp_path / "single", tmp_path / "multi"
  port = free_port()
  run_all([command(single)])
  run_all([command(multi, "--config.num_processes=2", f"--config.process_id={i}",
                   f"--config.coordinator_address=localhost:{port}") for i in range(2)])
  a, b = params(single), params(multi)
  assert a.keys() == b.keys()
  for k in a:
    # Cross-process all-reduces may sum in another order: float32 round-off only.
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7)
  sa = json.load(open(single / "summary.json"))
  sb = json.load(open(multi / "summary.json"))
  assert sa["sim_time"] == pytest.approx(sb["sim_time"], rel=1e-6)
  assert sa["erasures"] == sb["erasures"]
  assert sa["test_accuracy"] == pytest.approx(sb["test_accuracy"], abs=1e-6)

"""Two processes × 4 CPU devices (gloo) train like one process with 8 devices, and
build the per-worker input from their own chunks only."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests import warm

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
  env["PYTHONPATH"] = ROOT
  procs = [warm.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE,
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
  for p, out in zip(procs, outs, strict=True):
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
  # Each process placed only its devices' chunks: the same per-device input as one process.
  assert sa["input_bytes_per_device"] == sb["input_bytes_per_device"] < sa["global_batch_bytes"]


# Each process loads only the chunks its own devices hold (process_chunk_ids) and
# assembles the per-worker input with from_process_chunks; the coded gradient must
# equal the one from the replicated global batch laid out by the step, bit for bit.
LAYOUT_WORKER = """
import sys
import jax
from jaxgc import parallel
parallel.set_cpu_device_count(4)
parallel.use_gloo()
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]), initialization_timeout=60)
import numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxgc import assignments, models, protocols, timing
mesh = parallel.make_mesh(8)
model = models.get_model("mlp", 3, (8,))
params = models.init_params(model, jax.random.key(0), np.zeros((1, 5), np.float32))
loss_fn = models.chunk_loss_fn(model.apply, 40)
proto = protocols.PartialStraggler(assignments.cyclic(10, 3), 2)
coded = parallel.make_coded_step(proto, timing.get_model("slowdown"), loss_fn, optax.sgd(0.1),
                                 mesh, message_loss_prob=0.1)
def chunk(i):   # chunk i of the step, as a data loader would read it
  r = np.random.default_rng(int(i) + 1)
  return r.normal(size=(4, 5)).astype(np.float32), r.integers(0, 3, 4).astype(np.int32)
ids = coded.layout.process_chunk_ids()
rows = [[chunk(max(i, 0)) for i in row] for row in ids]
local = (np.asarray([[c[0] for c in r] for r in rows]),
         np.asarray([[c[1] for c in r] for r in rows]))
assert local[0].shape[0] * 2 == coded.layout.m_pad, local[0].shape   # half the workers
per_worker = coded.layout.from_process_chunks(local)
full = [chunk(i) for i in range(10)]
rep = NamedSharding(mesh, P())
glob = tuple(jax.make_array_from_callback(x.shape, rep, lambda idx, x=x: x[idx])
             for x in (np.stack([c[0] for c in full]), np.stack([c[1] for c in full])))
glob = coded.shard_chunks(glob)   # laid out from the replicated batch (one step compile)
grad = jax.jit(coded.gradient)
out = [jax.tree.map(lambda v: np.asarray(v.addressable_data(0)),   # replicated outputs
                    grad(params, c, jax.random.key(4))) for c in (per_worker, glob)]
for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(out[1])):
  np.testing.assert_array_equal(a, b)
print("OK", int(out[0][1]["erasures"]))
"""


def test_process_local_layout_matches_replicated_batch():
  port = free_port()
  outs = run_all([[sys.executable, "-c", LAYOUT_WORKER, f"localhost:{port}", str(i)]
                  for i in range(2)])
  assert all("OK" in out for out in outs), outs


# A 2-D mesh over two processes: 4 workers positions x groups of 2 devices, each group
# within one process. Each process places only its devices' parameter shards and its
# workers' chunks; the coded gradient and two SGD updates match the full-batch ones.
MESH2D_WORKER = """
import sys
import jax
from jaxgc import parallel
parallel.set_cpu_device_count(4)
parallel.use_gloo()
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]), initialization_timeout=60)
import numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxgc import assignments, models, protocols, timing
mesh = parallel.make_mesh(8, model=2)
assert mesh.devices.shape == (4, 2)
model = models.get_model("mlp", 3, (64,))
params = models.init_params(model, jax.random.key(0), np.zeros((1, 16), np.float32))
loss_fn = models.chunk_loss_fn(model.apply, 40)
proto = protocols.PartialStraggler(assignments.cyclic(10, 3), 2)
tx = optax.sgd(0.5)
coded = parallel.make_coded_step(proto, timing.get_model("slowdown"), loss_fn, tx, mesh,
                                 message_loss_prob=0.1, param_sharding=parallel.fsdp_rule(512))
def chunk(i):
  r = np.random.default_rng(int(i) + 1)
  return r.normal(size=(4, 16)).astype(np.float32), r.integers(0, 3, 4).astype(np.int32)
ids = coded.layout.process_chunk_ids()
rows = [[chunk(max(i, 0)) for i in row] for row in ids]
local = (np.asarray([[c[0] for c in r] for r in rows]),
         np.asarray([[c[1] for c in r] for r in rows]))
per_worker = coded.layout.from_process_chunks(local)
state = jax.jit(coded.init_state)(params, jax.random.key(1))
kernel = state.params["Dense_0"]["kernel"]              # [16, 64]: sharded along 64
assert len(kernel.addressable_shards) == 4             # this process's devices only
assert all(s.data.shape == (16, 32) for s in kernel.addressable_shards)
update = jax.jit(coded.update)
full = [chunk(i) for i in range(10)]
grad = jax.jit(jax.grad(lambda p: sum(loss_fn(p, c) for c in full)))
rep = jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))
want = params
for s in range(2):
  state, metrics = update(state, per_worker, jax.random.key(1))
  assert bool(metrics["exact"]), s
  want = optax.apply_updates(want, tx.update(grad(want), tx.init(want))[0])
got = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), rep(state.params))
for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
  np.testing.assert_allclose(a, np.asarray(b), rtol=1e-5, atol=1e-6)
print("OK", int(state.num_erasures))
"""


def test_two_processes_2d_mesh_place_only_their_shards():
  port = free_port()
  outs = run_all([[sys.executable, "-c", MESH2D_WORKER, f"localhost:{port}", str(i)]
                  for i in range(2)])
  assert all("OK" in out for out in outs), outs

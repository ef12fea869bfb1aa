"""jaxgc.network: the §11 formulas by hand, and step_comm_time in training (with faults too)."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from configs import default as default_config
from jaxgc import assignments, data, experiment, models, network, parallel, protocols, timing

# -- the formulas -------------------------------------------------------------------------

def test_formulas_against_a_hand_computation():
  # 5 senders of 250 float32 numbers, B = 1e9 bytes/s, L = 1 ms, 8 workers.
  ps = network.PSIngress(bandwidth=1e9, latency=1e-3)
  assert float(ps.time(5, 250, 4, 8)) == pytest.approx(1e-3 + 5 * 1000 / 1e9, rel=1e-6)
  ring = network.RingAllReduce(bandwidth=1e9, latency=1e-3)
  assert float(ring.time(5, 250, 4, 8)) == pytest.approx(14 * (1e-3 + 1000 / 8e9), rel=1e-6)
  assert float(ring.time(0, 250, 4, 8)) == float(ring.time(8, 250, 4, 8))   # all take part
  assert float(network.NoNetwork().time(5, 250, 4, 8)) == 0.0
  # A 1B-parameter float32 gradient: n · b does not overflow.
  big = network.PSIngress(1.25e10, 0.0).time(64, 10**9, 4, 64)
  assert float(big) == pytest.approx(64 * 4e9 / 1.25e10, rel=1e-6)


def test_each_protocol_sends_its_own_message_size():
  asg = assignments.cyclic(8, 4)
  d = 1001
  sizes = {
      "partial_straggler": (protocols.PartialStraggler(asg, 3), math.ceil(d / 3)),
      "original": (protocols.Original(asg, 2), math.ceil(d / 2)),
      "uncoded": (protocols.Uncoded(asg, 3), d),        # ell is accepted, whole gradients sent
      "backup_workers": (protocols.BackupWorkers(assignments.cyclic(8, 1), 1, num_backup=2), d),
      "graph_code": (protocols.GraphCode(asg, 1), d),
  }
  for name, (proto, want) in sizes.items():
    assert network.message_numbers(proto, d) == want, name
    assert network.message_bytes(proto, d, jnp.bfloat16) == 2 * want, name
  assert network.bytes_per_number(jnp.float32) == 4


def test_reencoding_round_costs_ingress_again_for_its_senders():
  proto = protocols.PartialStraggler(assignments.cyclic(8, 2), 2)
  ps = network.PSIngress(2e6, 0.01)
  per = math.ceil(100 / 2) * 4 / 2e6
  one = network.step_comm_time(ps, proto, 100, jnp.float32, 7, 5, False)
  two = network.step_comm_time(ps, proto, 100, jnp.float32, 7, 5, True)
  assert float(one) == pytest.approx(0.01 + 7 * per, rel=1e-6)
  assert float(two) == pytest.approx(0.02 + 12 * per, rel=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="ps", bandwidth=0.0), "bandwidth must be positive"),
    (dict(name="ring", bandwidth=-3.0), "bandwidth must be positive"),
    (dict(name="ps", bandwidth=1e9, latency=-1e-3), "latency must be >= 0"),
    (dict(name="ps"), "bandwidth is required"),
    (dict(name="ps", bandwidth=float("inf")), "bandwidth must be a finite number"),
    (dict(name="star", bandwidth=1e9), "unknown network 'star'"),
    (dict(name="none", bandwidth=-1.0), "bandwidth must be positive"),
])
def test_bad_networks_name_the_parameter(kwargs, match):
  with pytest.raises(ValueError, match=match):
    network.get_network(**kwargs)


@pytest.mark.parametrize("flag,match", [
    ("network.bandwidth=-1", r"--config.network.bandwidth=-1.0: bandwidth must be positive"),
    ("network.latency=-0.5", r"--config.network.latency=-0.5: latency must be >= 0"),
    ("network.name=star", r"--config.network.name='star': unknown network"),
    ("network.bandwidth=fast", r"--config.network.bandwidth: 'fast' is not a float"),
])
def test_bad_network_flags_are_named(flag, match):
  with pytest.raises(experiment.ConfigError, match=match):
    config = default_config.get_config()
    experiment.apply_overrides(config, [("network.name", "ps"), ("network.bandwidth", "1e9"),
                                        flag.split("=", 1)])
    experiment.make_network(config)


# -- in training --------------------------------------------------------------------------

B, L, ELL = 2e6, 0.05, 2


def test_metrics_jsonl_has_comm_time_in_the_step_time(tmp_path):
  """The contract: PS ingress, no faults: step_comm_time = L + senders · ⌈d/ℓ⌉ · 4 / B."""
  config = default_config.get_config()
  experiment.apply_overrides(config, [
      ("num_steps", "4"), ("eval_every", "4"), ("checkpoint_every", "0"), ("hidden", "(16,)"),
      ("ell", str(ELL)), ("network.name", "ps"), ("network.bandwidth", str(B)),
      ("network.latency", str(L))])
  workdir = str(tmp_path / "run")
  experiment.train_and_evaluate(config, workdir)
  with np.load(os.path.join(workdir, "final_params.npz")) as z:
    d = sum(z[k].size for k in z.files)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [r for r in map(json.loads, f) if "step_comm_time" in r]
  assert len(steps) == 4
  total = 0.0
  for r in steps:
    assert r["erasures"] == 0
    want = L + r["senders"] * math.ceil(d / ELL) * 4 / B
    assert r["step_comm_time"] == pytest.approx(want, rel=1e-5)
    assert r["step_sim_time"] > r["step_comm_time"] > 0        # stop + comm, stop > 0
    total += r["step_sim_time"]
    assert r["sim_time"] == pytest.approx(total, rel=1e-5)


SM, SLOAD, SBATCH = 8, 4, 64


def test_step_comm_time_with_erasures_pays_a_second_round():
  mesh = parallel.make_mesh(8)
  ds = data.load("digits")
  model = models.get_model("mlp", ds.num_classes, (8,))
  params = models.init_params(model, jax.random.key(0), ds.x_train[:1])
  d = ravel_pytree(params)[0].size
  loss_fn = models.chunk_loss_fn(model.apply, SBATCH)
  proto = protocols.PartialStraggler(assignments.cyclic(SM, SLOAD), ELL)
  net = network.PSIngress(B, L)
  step = parallel.make_coded_step(proto, timing.get_model("slowdown"), loss_fn, optax.sgd(0.1),
                                  mesh, message_loss_prob=0.08, network=net)
  update = step.jit()
  key = jax.random.key(3)
  state = step.init_state(params, key)
  train = (jnp.asarray(ds.x_train), jnp.asarray(ds.y_train))
  per = math.ceil(d / ELL) * 4 / B
  seen = set()
  for s in range(6):
    chunks = data.step_chunks(train, jax.random.key(5), s, SBATCH, SM)
    stop, first = float(state.plan.stop), int(np.sum(state.plan.solve.senders))
    state, m = update(state, chunks, key)
    erased = int(m["erasures"]) > 0
    seen.add(erased)
    want = L + first * per + (L + int(m["senders"]) * per if erased else 0.0)
    assert float(m["step_comm_time"]) == pytest.approx(want, rel=1e-5)
    assert float(m["step_sim_time"]) == pytest.approx(stop + want, rel=1e-5)
  assert seen == {True, False}, "the draws should give steps with and without erasures"

"""The experiment layer in-process: config errors, end-to-end runs, resume, comparison."""
import itertools
import json
import os

import jax
import numpy as np
import pytest

from configs import default as default_config
from jaxgc import experiment
from tests import warm


def small_config(*flags):
  """The default config with ``--config.``-style overrides (old flat names included)."""
  config = default_config.get_config()
  return experiment.apply_overrides(config, [
      ("num_steps", "12"), ("eval_every", "6"), ("checkpoint_every", "4"), ("hidden", "(32,)"),
      *(f.split("=", 1) for f in flags)])


def read(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def final_params(workdir):
  with np.load(os.path.join(workdir, "final_params.npz")) as z:
    return {k: z[k] for k in z.files}


# -- config errors ----------------------------------------------------------------

@pytest.mark.parametrize("flags,match", [
    (("ell=5", "load=4"), r"--config.protocol.ell=5: ell=5 is larger.*ell <= 4"),
    (("protocol=partial_stragler",), r"--config.protocol.name=.*Did you mean "
                                     r"--config.protocol.name=partial_straggler"),
    (("mode=deadline",), r"--config.step.deadline.*deadline=T"),
    (("protocol=ignore_stragglers",), r"--config.step.mode.*mode='deadline'"),
    (("mode=approx",), r"--config.step.mode.*unknown mode"),
    (("batch_size=333",), r"--config.batch_size=333.*not a multiple"),
    (("failure_prob=2.0",), r"--config.straggler.failure_prob=2.0.*failure_prob"),
    (("straggler.name=weibull",), r"--config.straggler.name='weibull'.*unknown straggler"),
    (("num_devices=6", "num_processes=4"), r"split evenly"),
    (("straggler.slowdown.bogus=1",), r"--config.straggler.slowdown.bogus.*'bogus'"),
    (("num_workers=2000", "batch_size=2000"), r"--config.batch_size=2000"),
    # An option the chosen protocol / model / dataset / assignment does not take: its flag.
    (("protocol.partial_straggler.colour=3",), r"^--config.protocol.partial_straggler.colour=3: "
     r"unknown option\(s\) \['colour'\] for protocol 'partial_straggler'; valid options"),
    (("model.mlp.dropout=0.5",), r"^--config.model.mlp.dropout=0.5: model 'mlp' takes no "
     r"parameter\(s\) \['dropout'\]; it takes \['hidden'\]"),
    (("dataset=synthetic_logistic", "synthetic.noise=0.5"), r"^--config.data.synthetic_logistic."
     r"noise=0.5: dataset 'synthetic_logistic' takes no parameter\(s\) \['noise'\]"),
    (("dataset=pystdlib", "data.pystdlib.split_seed=3"), r"^--config.data.pystdlib.split_seed=3:"
     r" dataset 'pystdlib' takes no parameter\(s\) \['split_seed'\]"),
    (("assignment.cyclic.seed=3",), r"^--config.assignment.cyclic.seed=3: assignment 'cyclic' "
     r"takes no parameter\(s\) \['seed'\]"),
    (("model=cnn_bn", "model.cnn_bn.dropout=1.5"), r"^--config.model.cnn_bn.dropout=1.5: "
     r"dropout=1.5 must be in \[0, 1\)"),
    # An unknown name: the registry's suggestion, once, as the flag to type.
    (("model=cnnn",), r"^--config.model.name='cnnn': unknown model 'cnnn'; choose one of "
     r"\[.*\]\. Did you mean --config.model.name=cnn\?$"),
    (("assignment=cyclc",), r"^--config.assignment.name='cyclc': unknown assignment.* Did you "
     r"mean --config.assignment.name=cyclic\?$"),
])
def test_bad_configs_fail_at_startup(tmp_path, flags, match):
  with pytest.raises(experiment.ConfigError, match=match) as e:
    experiment.train_and_evaluate(small_config(*flags), str(tmp_path / "run"))
  assert "\n" not in str(e.value) and str(e.value).count("Did you mean") <= 1
  assert not (tmp_path / "run").exists()          # nothing written for a bad config


def test_backends_declare_what_a_config_may_ask_of_them(monkeypatch):
  """make_step asks the backend's declared capabilities, not its name: a new backend
  gets the options it declares, and a feature it lacks is one line naming the flag."""
  from jaxgc import backends  # pylint: disable=import-outside-toplevel
  from jaxgc.backends import capabilities  # pylint: disable=import-outside-toplevel

  def backend(caps):
    @capabilities.declare(caps)
    def build(protocol, straggler, loss_fn, tx, mesh=None, **options):
      return options                  # builds nothing: shows what make_step passed
    return build
  monkeypatch.setitem(backends.BACKENDS, "probe",
                      backend(capabilities.Capabilities(network_model=True)))
  monkeypatch.setitem(backends.BACKENDS, "needy", backend(capabilities.Capabilities(
      requires="jaxgc_no_such_module", install="Needy: pip install needy")))

  def step(*flags, has_aux=False):
    config = small_config(*flags)
    proto = experiment.make_protocol(config, experiment.make_assignment(config))
    return experiment.make_step(config, proto, experiment.make_straggler_model(config),
                                None, experiment.make_optimizer(config), None, has_aux=has_aux)

  net = ("network.name=ps", "network.bandwidth=1e9")
  options = step("backend=probe", *net)
  assert options["network"].bandwidth == 1e9 and options["mode"] == "exact"
  assert not {"adaptive", "has_aux", "num_actors"} & set(options)
  cases = [
      (("backend=probe", "adaptive=True"), False, r"--config.adaptive: backend 'probe' does "
       r"not support the adaptive PS \(the ray and spmd backends do\); use --config.backend=spmd "
       r"or --config.adaptive=False\."),
      (("backend=probe", "mesh.model=2"), False, r"--config.mesh.model: backend 'probe' does not "
       r"support workers that are groups of devices .*--config.mesh.model=1\."),
      (("backend=probe",), True, r"--config.model.name='mlp': backend 'probe' does not support a "
       r"model with state \(batch norm\) \(the ray and spmd backends do\); use "
       r"--config.backend=spmd\."),
      (("backend=ray", *net), False, r"--config.network.name='ps': backend 'ray' does not "
       r"support a network model \(the probe and spmd backends do\); use --config.backend=probe "
       r"or --config.network.name=none\."),
      (("backend=needy",), False, r"--config.backend=needy: --config.backend=needy needs Needy: "
       r"pip install needy"),
  ]
  for flags, has_aux, match in cases:
    with pytest.raises(experiment.ConfigError, match=rf"^{match}$"):
      step(*flags, has_aux=has_aux)


def test_library_decides_original_with_no_stragglers():
  """s = load - ell = 0 is a valid (if pointless) original code: the library accepts it,
  so the experiment does too."""
  config = small_config("protocol=original", "ell=4", "load=4")
  experiment.check_config(config)
  proto = experiment.make_protocol(config, experiment.make_assignment(config))
  assert proto.ell == 4 and proto.assignment.loads.min() == 4


def test_config_typo_is_named(tmp_path):
  config = small_config()
  config.num_step = 5   # typo: the real field is num_steps
  with pytest.raises(ValueError, match=r"--config.num_step: unknown config field.*num_steps"):
    experiment.train_and_evaluate(config, str(tmp_path))


# -- end to end -----------------------------------------------------------------------

def test_metrics_and_outputs(tmp_path):
  state = experiment.train_and_evaluate(small_config(), str(tmp_path))
  recs = read(tmp_path)
  steps = [r for r in recs if "loss" in r]
  evals = [r for r in recs if "test_accuracy" in r]
  assert [r["step"] for r in steps] == list(range(1, 13))
  assert [r["step"] for r in evals] == [0, 6, 12]
  times = [r["sim_time"] for r in steps]
  assert all(b > a for a, b in itertools.pairwise(times))          # cumulative
  assert times[-1] == pytest.approx(float(state.sim_time))
  assert all(r["exact"] and r["decodable"] and not r["skipped"] for r in steps)
  for key in ("min_coverage", "chunks_below_ell", "erasures", "condition_number",
              "step_sim_time"):
    assert key in steps[0]
  summary = json.load(open(tmp_path / "summary.json"))
  assert summary["steps"] == 12 and summary["test_accuracy"] == evals[-1]["test_accuracy"]
  saved = json.load(open(tmp_path / "config.json"))
  assert saved["protocol"]["name"] == "partial_straggler"
  assert saved["model"]["mlp"]["hidden"] == [32]


def test_exact_partial_straggler_and_uncoded_same_losses(tmp_path):
  """Exact mode rebuilds the true gradient: same losses, different simulated times."""
  runs = {}
  for name in ("partial_straggler", "uncoded"):
    experiment.train_and_evaluate(
        small_config(f"protocol={name}", "checkpoint_every=0", "num_steps=15",
                     "optimizer=sgd", "learning_rate=0.5"), str(tmp_path / name))
    runs[name] = [r for r in read(tmp_path / name) if "loss" in r]
  a = np.array([r["loss"] for r in runs["partial_straggler"]])
  b = np.array([r["loss"] for r in runs["uncoded"]])
  np.testing.assert_allclose(a, b, rtol=2e-5)
  ta = runs["partial_straggler"][-1]["sim_time"]
  tb = runs["uncoded"][-1]["sim_time"]
  assert ta < tb   # slowdown stragglers: partial work beats waiting for everyone


def test_continuing_reproduces_uninterrupted_run(tmp_path):
  """Train 10 steps, then raise num_steps to 14 in the same workdir: as if run straight."""
  config = small_config("num_steps=14", "eval_every=7", "message_loss_prob=0.2")
  experiment.train_and_evaluate(config, str(tmp_path / "straight"))
  short = small_config("num_steps=10", "eval_every=7", "message_loss_prob=0.2")
  experiment.train_and_evaluate(short, str(tmp_path / "resumed"))
  state = experiment.train_and_evaluate(config, str(tmp_path / "resumed"))
  summary = json.load(open(tmp_path / "resumed" / "summary.json"))
  assert summary["resumed_from"] == 10 and summary["steps"] == 14
  a, b = final_params(tmp_path / "straight"), final_params(tmp_path / "resumed")
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  # The eval at step 10 (the short run's last) is extra; everything else matches.
  resumed = [r for r in read(tmp_path / "resumed") if not ("test_loss" in r and r["step"] == 10)]
  assert read(tmp_path / "straight") == resumed
  assert int(state.step) == 14


def test_faults_through_config_never_reach_params(tmp_path):
  config = small_config("mode=deadline", "deadline=2.5", "failure_prob=0.4",
                        "message_loss_prob=0.3", "nan_message_prob=0.3", "checkpoint_every=0")
  state = experiment.train_and_evaluate(config, str(tmp_path))
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
  experiment.train_and_evaluate(config, str(tmp_path))
  summary = json.load(open(tmp_path / "summary.json"))
  assert summary["test_accuracy"] >= 0.95, summary
  # A device holds its workers' chunks only: load/m of the global batch per worker,
  # ceil(m / devices) workers per device (20 workers on 8 devices: 3, one phantom slot row).
  m, load = config.assignment.num_workers, config.assignment.load
  per_device = -(-m // config.num_devices)
  assert summary["input_bytes_per_device"] * m == (
      summary["global_batch_bytes"] * per_device * load), summary


def test_compare_writes_plot(tmp_path):
  config = small_config("num_steps=10", "eval_every=5", "checkpoint_every=0")
  out = experiment.compare_protocols(config, str(tmp_path), ("partial_straggler", "uncoded"))
  assert set(out) == {"partial_straggler", "uncoded"}
  assert (tmp_path / "accuracy_vs_time.png").stat().st_size > 1000
  assert json.load(open(tmp_path / "comparison.json"))["target_accuracy"] == 0.95


def test_synthetic_config_runs(tmp_path):
  from configs import synthetic  # pylint: disable=import-outside-toplevel
  config = synthetic.get_config()
  config.num_steps = 30
  config.eval_every = 30
  config.checkpoint_every = 0
  experiment.train_and_evaluate(config, str(tmp_path))
  summary = json.load(open(tmp_path / "summary.json"))
  assert summary["test_accuracy"] > 0.7, summary


def test_pod_config_validates():
  from configs import pod  # pylint: disable=import-outside-toplevel
  experiment.check_config(pod.get_config())


def test_command_line_defaults_from_any_directory(tmp_path):
  """`python train.py` needs no flags: configs/default.py is found beside train.py."""
  import sys  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root)
  run = lambda *flags: warm.run(
      [sys.executable, os.path.join(root, "train.py"), *flags], cwd=tmp_path,
      capture_output=True, text=True, timeout=300, env=env)
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
  assert bad.returncode != 0 and "--config.num_steps" in bad.stderr


# -- the step's input, built on the host ------------------------------------------------

@pytest.fixture(scope="module")
def built():
  """A built experiment (shared: building costs more than these tests' steps)."""
  return experiment.build(small_config("num_steps=5", "checkpoint_every=0", "eval_every=5",
                                       "batch_size=640", "message_loss_prob=0.2"))


def replicated_train_data(exp):
  rep = jax.sharding.NamedSharding(exp.mesh, jax.sharding.PartitionSpec())
  return rep, (experiment.global_array(exp.dataset.x_train, rep),
               experiment.global_array(exp.dataset.y_train, rep))


def test_step_input_equals_in_graph_batches(built):
  """StepInput's chunks, host and per worker, are bit for bit those drawn in the graph
  from the replicated training set (train_step's), across epoch boundaries."""
  from jaxgc import data  # pylint: disable=import-outside-toplevel
  exp, seed = built, 3                             # 1437 examples, batch 640: 2 steps/epoch
  ds, n = exp.dataset, exp.assignment.num_chunks
  _, replicated = replicated_train_data(exp)
  inputs = experiment.StepInput((ds.x_train, ds.y_train), seed=seed, batch_size=640,
                                num_chunks=n, layout=exp.step.layout)
  for step in (0, 1, 2, 5):
    perm = experiment.epoch_permutation(seed, step // 2, ds.num_train)
    want = data.step_chunks(replicated, experiment.keys(seed)[1], step, 640, n, perm=perm)
    for a, b in zip(inputs.host_chunks(step), want, strict=True):
      np.testing.assert_array_equal(a, np.asarray(b))
    for a, b in zip(inputs(step).data, exp.step.shard_chunks(want).data, strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      assert a.sharding == b.sharding
  with pytest.raises(ValueError, match="--config.batch_size=640"):
    experiment.StepInput((ds.x_train, ds.y_train), seed=seed, batch_size=650, num_chunks=n)


def test_training_equals_in_graph_batches(built, tmp_path):
  """The loop (host-built, per-worker input) trains bit for bit as train_step on the
  replicated training set does: same losses, same final parameters."""
  from jaxgc import models  # pylint: disable=import-outside-toplevel
  exp, seed, steps = built, built.config.seed, built.config.num_steps
  experiment.train(exp, str(tmp_path))
  rep, train_data = replicated_train_data(exp)
  state = jax.jit(lambda: exp.step.init_state(
      models.init_params(exp.model, experiment.keys(seed)[0], exp.dataset.x_train[:1]),
      experiment.keys(seed)[2]), out_shardings=rep)()
  step = jax.jit(lambda s, d, p: experiment.train_step(s, d, p, coded_step=exp.step,
                                                       batch_size=640, seed=seed))
  perm_for = experiment.epoch_permutations(seed, exp.dataset.num_train, 640, rep)
  losses = []
  for s in range(steps):
    state, metrics = step(state, train_data, perm_for(s))
    losses.append(float(metrics["loss"]))
  assert losses == [r["loss"] for r in read(tmp_path) if "loss" in r]
  got = final_params(tmp_path)
  want = {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))}
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])


def test_epoch_permutations_draw_each_epoch_once():
  """perm_for(step) is that step's epoch permutation, and one array per epoch."""
  num_train, batch = 100, 30                         # 3 steps per epoch
  perm_for = experiment.epoch_permutations(7, num_train, batch, None)
  for step in range(7):
    np.testing.assert_array_equal(perm_for(step),
                                  experiment.epoch_permutation(7, step // 3, num_train))
  assert perm_for(6) is perm_for(8)
  assert not np.array_equal(perm_for(0), perm_for(3))
  with pytest.raises(ValueError, match="batch_size must be in 1..100"):
    experiment.epoch_permutations(7, num_train, 0, None)

"""Trains a model with coded gradients on simulated stragglers.

Follows the flax examples: ``train_step``, ``evaluate`` and
``train_and_evaluate(config, workdir)`` are plain functions, ``main`` parses flags.

  python train.py --config=configs/default.py --workdir=/tmp/gc \
      --config.protocol=partial_straggler --config.mode=exact --config.num_steps=300
  python train.py --config=configs/default.py --workdir=/tmp/cmp \
      --compare=partial_straggler,original,uncoded     # + accuracy_vs_time.png

Each step costs simulated time (the protocol's stop time under the straggler
model); ``DIR/metrics.jsonl`` logs it cumulatively as ``sim_time``. Checkpoints
go to ``DIR/checkpoints``; rerunning the same command resumes from the latest
one and reproduces the uninterrupted run, because the batch and the straggler
durations of step ``s`` are functions of ``(seed, s)`` only.
"""
from __future__ import annotations

import copy
import difflib
import functools
import json
import os
import time
from typing import Any

from absl import app, flags, logging
import jax
import ml_collections
import numpy as np
import optax
from ml_collections import config_flags

from jaxgc import assignments, data, models, protocols, timing
from jaxgc import parallel

PROTOCOLS = ("partial_straggler", "original", "uncoded", "ignore_stragglers")
ASSIGNMENTS = ("cyclic", "fractional_repetition", "random_regular")
OPTIMIZERS = ("adam", "sgd", "momentum")
STRAGGLER_PARAMS = {
    "shifted_exponential": ("shift", "rate"),
    "pareto": ("scale", "alpha"),
    "slowdown": ("shift", "rate", "fraction", "factor"),
}


# -- config checks -----------------------------------------------------------------

def _default_config() -> ml_collections.ConfigDict:
  from configs import default  # pylint: disable=import-outside-toplevel
  return default.get_config()


def _check_keys(config, reference, prefix=""):
  for key in config.keys():
    if key not in reference:
      near = difflib.get_close_matches(key, list(reference.keys()), n=1)
      hint = f" Did you mean '{prefix}{near[0]}'?" if near else ""
      raise ValueError(f"unknown config field '{prefix}{key}'.{hint} Valid fields are "
                       f"listed in configs/default.py.")
    if isinstance(config[key], ml_collections.ConfigDict) and isinstance(
        reference[key], ml_collections.ConfigDict):
      _check_keys(config[key], reference[key], prefix + key + ".")


def _choice(config, key, choices):
  if config[key] not in choices:
    near = difflib.get_close_matches(str(config[key]), choices, n=1)
    hint = f" Did you mean --config.{key}={near[0]}?" if near else ""
    raise ValueError(f"unknown {key} {config[key]!r}; choose one of {list(choices)}.{hint}")


def validate_config(config, num_train: int | None = None) -> None:
  """Raises ``ValueError`` naming the fix for settings that cannot work.

  Runs before any device work. ``num_train`` (training examples), when given,
  also checks the batch against the data.
  """
  _check_keys(config, _default_config())
  _choice(config, "protocol", PROTOCOLS)
  _choice(config, "mode", parallel.MODES)
  _choice(config, "assignment", ASSIGNMENTS)
  _choice(config, "optimizer", OPTIMIZERS)
  _choice(config, "dataset", data.DATASETS)
  _choice(config.straggler, "name", tuple(STRAGGLER_PARAMS))
  m, load, ell = config.num_workers, config.load, config.ell
  if not isinstance(m, int) or m < 1:
    raise ValueError(f"num_workers must be a positive integer, got {m!r}.")
  if not isinstance(load, int) or not 1 <= load <= m:
    raise ValueError(f"load must be an integer in 1..num_workers={m}, got {load!r}; "
                     "set --config.load accordingly.")
  if not isinstance(ell, int) or ell < 1:
    raise ValueError(f"ell must be a positive integer, got {ell!r}.")
  if ell > load and config.protocol in ("partial_straggler", "original"):
    raise ValueError(
        f"ell={ell} > load={load}: each chunk is held by only {load} workers, so ell "
        f"of them can never cover it. Use --config.ell<={load} or raise --config.load.")
  if config.protocol == "original" and ell == load:
    raise ValueError(
        f"the original protocol with load={load} and ell={ell} tolerates s = load - ell "
        "= 0 stragglers; raise --config.load or lower --config.ell.")
  if config.mode == "deadline":
    if config.deadline is None or not np.isfinite(config.deadline) or config.deadline <= 0:
      raise ValueError("mode='deadline' needs a positive deadline: add "
                       "--config.deadline=T (simulated seconds), or use --config.mode=exact.")
  if config.mode == "exact" and config.protocol == "ignore_stragglers":
    raise ValueError("ignore_stragglers is an approximate protocol with no exact mode: use "
                     "--config.mode=deadline --config.deadline=T, or --config.protocol=uncoded "
                     "to wait for every worker.")
  for key in ("failure_prob", "message_loss_prob", "nan_message_prob"):
    if not 0.0 <= config[key] <= 1.0:
      raise ValueError(f"{key} must be a probability in [0, 1], got {config[key]}.")
  if config.batch_size < 1 or config.batch_size % m:
    raise ValueError(
        f"batch_size={config.batch_size} must be a positive multiple of num_workers={m} "
        f"(one chunk per worker per step); e.g. --config.batch_size={m * max(1, config.batch_size // m)}.")
  if num_train is not None:
    if m > num_train:
      raise ValueError(f"num_workers={m} exceeds the {num_train} training examples; every "
                       "chunk needs at least one. Lower --config.num_workers.")
    if config.batch_size > num_train:
      raise ValueError(f"batch_size={config.batch_size} exceeds the {num_train} training "
                       f"examples; lower --config.batch_size to at most "
                       f"{m * (num_train // m)}.")
  if config.num_devices < 1:
    raise ValueError(f"num_devices must be >= 1, got {config.num_devices}.")
  if config.num_processes < 1 or not 0 <= config.process_id < config.num_processes:
    raise ValueError(f"need num_processes >= 1 and 0 <= process_id < num_processes, got "
                     f"{config.num_processes}, {config.process_id}.")
  if config.num_devices % config.num_processes:
    raise ValueError(f"num_devices={config.num_devices} must split evenly over "
                     f"num_processes={config.num_processes}.")
  for key in ("num_steps", "eval_every"):
    if config[key] < 1:
      raise ValueError(f"{key} must be >= 1, got {config[key]}.")


# -- devices -----------------------------------------------------------------------

def setup_devices(config):
  """Fixes the device count, joins the cluster if asked, and returns the mesh."""
  platform = config.platform or None
  if platform == "cpu":
    local = config.num_cpu_devices or config.num_devices // config.num_processes
    parallel.set_cpu_device_count(local)
  if config.num_processes > 1:
    if platform == "cpu":
      parallel.use_gloo()
    if not parallel.backend_started():
      kwargs = {}
      if config.coordinator_address:
        kwargs = dict(coordinator_address=config.coordinator_address,
                      num_processes=config.num_processes, process_id=config.process_id)
      jax.distributed.initialize(initialization_timeout=int(config.distributed_timeout),
                                 **kwargs)
  return parallel.make_mesh(config.num_devices, platform)


def _global(x, sharding):
  """A host array as a global replicated jax.Array (works with several processes)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


# -- building blocks ---------------------------------------------------------------

def make_assignment(config) -> assignments.Assignment:
  build = {"cyclic": assignments.cyclic,
           "fractional_repetition": assignments.fractional_repetition,
           "random_regular": functools.partial(assignments.random_regular, seed=config.seed)}
  return build[config.assignment](config.num_workers, config.load)


def make_protocol(config, assignment):
  kwargs: dict[str, Any] = {}
  if config.protocol == "partial_straggler":
    kwargs = dict(decoding_matrix=config.decoding_matrix, seed=config.seed,
                  num_candidates=config.num_candidates)
  elif config.protocol == "original":
    kwargs = dict(construction=config.construction, seed=config.seed)
  elif config.protocol == "ignore_stragglers":
    kwargs = dict(rescale=config.rescale)
  return protocols.get_protocol(config.protocol, assignment, config.ell, **kwargs)


def make_straggler_model(config):
  s = config.straggler
  params = {k: s[k] for k in STRAGGLER_PARAMS[s.name]}
  return timing.get_model(s.name, failure_prob=config.failure_prob, **params)


def make_optimizer(config) -> optax.GradientTransformation:
  if config.optimizer == "adam":
    return optax.adam(config.learning_rate)
  if config.optimizer == "momentum":
    return optax.sgd(config.learning_rate, momentum=config.momentum)
  return optax.sgd(config.learning_rate)


def load_dataset(config) -> data.Dataset:
  return data.load(config.dataset, test_fraction=config.test_fraction,
                   split_seed=config.split_seed, **config.synthetic.to_dict())


# -- train / eval --------------------------------------------------------------------

def _keys(seed: int):
  """``(init, data, step)`` keys; built inside jit from the static seed, so no key
  array has to be placed on a multi-process mesh."""
  return jax.random.split(jax.random.key(seed), 3)


def train_step(state: parallel.TrainState, train_data, perm, *,
               coded_step: parallel.CodedStep, batch_size: int, seed: int):
  """One coded step on the batch of step ``state.step`` (jit this).

  ``perm`` is the current epoch's example order (:func:`epoch_permutation`).
  The batch and the step's PRNG key are functions of ``(seed, state.step)``
  only: every protocol sees the same chunks, and a resumed run replays the same
  straggler durations.
  """
  _, data_key, step_key = _keys(seed)
  chunks = data.step_chunks(train_data, data_key, state.step, batch_size,
                            coded_step.assignment.num_chunks, perm=perm)
  return coded_step.update(state, chunks, step_key)


def epoch_permutation(seed: int, epoch, num_train: int):
  """Epoch ``epoch``'s example order (the ``perm`` of :func:`train_step`)."""
  return data.epoch_permutation(_keys(seed)[1], epoch, num_train)


def epoch_permutations(seed: int, num_train: int, batch_size: int, sharding):
  """``step -> perm`` for :func:`train_step`: jitted, and drawn once per epoch.

  Drawing a permutation sorts ``num_train`` keys, which on a CPU mesh costs more
  than a small model's whole step, so the current epoch's is kept.
  """
  per_epoch = data.steps_per_epoch(num_train, batch_size)
  draw = jax.jit(functools.partial(epoch_permutation, seed, num_train=num_train),
                 out_shardings=sharding)
  held = {}

  def perm_for(step: int):
    epoch = step // per_epoch
    if epoch not in held:
      held.clear()
      held[epoch] = draw(epoch)
    return held[epoch]
  return perm_for


def evaluate(apply_fn, params, test_data, regression: bool = False) -> dict[str, float]:
  """Test-set loss and accuracy (or MSE for regression)."""
  metrics = _eval_fn(apply_fn, regression)(params, *test_data)
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


@functools.lru_cache(maxsize=None)
def _eval_fn(apply_fn, regression):
  return jax.jit(functools.partial(models.predict_metrics, apply_fn, regression=regression))


class _MetricsLog:
  """``DIR/metrics.jsonl``, written by process 0; truncated to a resumed step."""

  def __init__(self, path: str, resume_step: int, enabled: bool):
    self.path, self.enabled = path, enabled
    if not enabled:
      return
    kept = []
    if resume_step > 0 and os.path.exists(path):
      with open(path) as f:
        kept = [l for l in f if l.strip() and json.loads(l)["step"] <= resume_step]
    with open(path, "w") as f:
      f.writelines(kept)

  def write(self, record: dict):
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _to_python(tree):
  out = {}
  for k, v in jax.device_get(tree).items():
    v = np.asarray(v)
    out[k] = bool(v) if v.dtype == bool else (int(v) if v.dtype.kind in "iu" else float(v))
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> parallel.TrainState:
  """Trains and evaluates; writes metrics, checkpoints and a summary to ``workdir``.

  Returns the final :class:`jaxgc.parallel.TrainState`.
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

  validate_config(config)
  ds = load_dataset(config)
  validate_config(config, ds.num_train)
  mesh = setup_devices(config)
  lead = jax.process_index() == 0
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)

  assignment = make_assignment(config)
  protocol = make_protocol(config, assignment)
  model = models.get_model(config.model, ds.num_classes, config.hidden)
  tx = make_optimizer(config)
  loss_fn = models.chunk_loss_fn(model.apply, config.batch_size, ds.is_regression)
  coded = parallel.make_coded_step(
      protocol, make_straggler_model(config), loss_fn, tx, mesh, mode=config.mode,
      deadline=config.deadline, message_loss_prob=config.message_loss_prob,
      nan_message_prob=config.nan_message_prob, report_condition=config.report_condition)

  rep = NamedSharding(mesh, P())
  train_data = (_global(ds.x_train, rep), _global(ds.y_train, rep))
  test_data = (_global(ds.x_test, rep), _global(ds.y_test, rep))
  def init():
    init_key, _, step_key = _keys(config.seed)
    return coded.init_state(models.init_params(model, init_key, ds.x_train[:1]), step_key)

  init = jax.jit(init, out_shardings=rep)
  state = init()

  mngr = None
  if config.checkpoint_every > 0:
    mngr = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=config.max_checkpoints,
                                             save_interval_steps=config.checkpoint_every,
                                             create=True))
    latest = mngr.latest_step()
    if latest is not None:
      abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                              state)
      state = mngr.restore(latest, args=ocp.args.StandardRestore(abstract))
      logging.info("resumed from step %d", latest)
  start = int(state.step)
  log = _MetricsLog(os.path.join(workdir, "metrics.jsonl"), start, lead)
  if lead:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json(indent=2))

  step_fn = jax.jit(functools.partial(train_step, coded_step=coded,
                                      batch_size=config.batch_size, seed=config.seed),
                    donate_argnums=(0,))
  perm_for = epoch_permutations(config.seed, len(ds.x_train), config.batch_size, rep)
  regression = ds.is_regression
  score_key = "test_mse" if regression else "test_accuracy"

  def run_eval(step, sim_time):
    ev = evaluate(model.apply, state.params, test_data, regression)
    log.write({"step": step, "sim_time": sim_time, **ev})
    return ev

  t0 = time.time()
  ev = run_eval(0, 0.0) if start == 0 else {}
  bar = tqdm(range(start, config.num_steps), initial=start, total=config.num_steps,
             disable=not lead, desc=f"{config.protocol}/{config.mode}")
  for step in bar:
    state, metrics = step_fn(state, train_data, perm_for(step))
    rec = {"step": step + 1, **_to_python(metrics)}
    log.write(rec)
    if (step + 1) % config.eval_every == 0 or step + 1 == config.num_steps:
      ev = run_eval(step + 1, rec["sim_time"])
    # refresh=False: the bar redraws at its own pace, not once per (fast) step.
    bar.set_postfix(loss=f"{rec['loss']:.3f}", sim_time=f"{rec['sim_time']:.0f}",
                    **{score_key: f"{ev.get(score_key, float('nan')):.3f}"}, refresh=False)
    if mngr is not None:
      mngr.save(step + 1, args=ocp.args.StandardSave(state))
  if mngr is not None:
    if mngr.latest_step() != int(state.step):
      mngr.save(int(state.step), args=ocp.args.StandardSave(state), force=True)
    mngr.wait_until_finished()
    mngr.close()
  wall = time.time() - t0

  if lead:
    flat = {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))}
    np.savez(os.path.join(workdir, "final_params.npz"), **flat)
    summary = {"protocol": config.protocol, "mode": config.mode, "steps": int(state.step),
               "sim_time": float(state.sim_time), "skipped": int(state.num_skipped),
               "erasures": int(state.num_erasures), "wall_time_s": wall,
               "resumed_from": start, **ev}
    if not regression:
      # From the log, so a resumed run still sees a target reached before the restart.
      summary["sim_time_to_target"] = time_to_target(read_metrics(workdir),
                                                     config.target_accuracy)
      plot_accuracy_vs_time({config.protocol: workdir},
                            os.path.join(workdir, "accuracy_vs_time.png"),
                            config.target_accuracy)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    logging.info("summary: %s", summary)
    print(json.dumps(summary))
  return state


# -- protocol comparison -------------------------------------------------------------

def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if l.strip()]


def time_to_target(records: list[dict], target: float, key: str = "test_accuracy"):
  """First simulated time at which an eval line reaches ``target`` (``None`` if never)."""
  for r in records:
    if key in r and r[key] >= target:
      return r["sim_time"]
  return None


def plot_accuracy_vs_time(runs: dict[str, str], path: str, target: float | None = None):
  """Test accuracy against cumulative simulated time, one curve per run directory."""
  # A bare Figure on the Agg canvas: no pyplot, so no global backend switch (which
  # would silence inline figures in a notebook that calls this).
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(7, 4.5))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for name, wd in runs.items():
    ev = [r for r in read_metrics(wd) if "test_accuracy" in r]
    t = [r["sim_time"] for r in ev]
    line, = ax.plot(t, [r["test_accuracy"] for r in ev], label=name)
    hit = time_to_target(ev, target) if target is not None else None
    if hit is not None:
      ax.axvline(hit, color=line.get_color(), ls=":", lw=1)
  if target is not None:
    ax.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:.0%}")
  ax.set_xlabel("simulated wall-clock time (s)")
  ax.set_ylabel("test accuracy")
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def compare_protocols(config, workdir: str, names=("partial_straggler", "original", "uncoded")):
  """Trains once per protocol (same seed: same batches, same straggler draws).

  Writes ``workdir/<protocol>/`` runs and ``workdir/accuracy_vs_time.png``;
  returns ``{protocol: simulated time to config.target_accuracy}``.
  """
  runs = {}
  for name in names:
    cfg = copy.deepcopy(config)
    cfg.unlock()
    cfg.protocol = name
    run_dir = os.path.join(workdir, name)
    train_and_evaluate(cfg, run_dir)
    runs[name] = run_dir
  out = {n: time_to_target(read_metrics(d), config.target_accuracy) for n, d in runs.items()}
  if jax.process_index() == 0:
    plot_accuracy_vs_time(runs, os.path.join(workdir, "accuracy_vs_time.png"),
                          config.target_accuracy)
    with open(os.path.join(workdir, "comparison.json"), "w") as f:
      json.dump({"target_accuracy": config.target_accuracy, "sim_time_to_target": out}, f,
                indent=2)
  return out


# -- command line ----------------------------------------------------------------------

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "workdir", "Directory for metrics, checkpoints and plots.")
flags.DEFINE_list("compare", None, "Train each of these protocols and plot test accuracy "
                  "against simulated time, e.g. partial_straggler,original,uncoded.")
config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py"),
    "Training configuration file.", lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)   # orbax logs every save at INFO
  config = FLAGS.config
  if FLAGS.compare:
    out = compare_protocols(config, FLAGS.workdir, FLAGS.compare)
    print(json.dumps({"target_accuracy": config.target_accuracy, "sim_time_to_target": out}))
  else:
    train_and_evaluate(config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)

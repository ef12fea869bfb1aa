"""The training loop: ``StepInput``, ``evaluate``, ``train_and_evaluate``, comparisons.

Each step costs simulated time (the protocol's stop time under the straggler
model); ``metrics.jsonl`` logs it cumulatively as ``sim_time``. The batch and the
straggler durations of step ``s`` are functions of ``(seed, s)`` only, so a run
resumed from a checkpoint reproduces the uninterrupted one, and every protocol
sees the same chunks and draws.

The training set stays on the host. Each step, :class:`StepInput` gathers the
chunks the step needs there and each process places only its own devices' part
(:meth:`jaxgc.parallel.WorkerLayout.from_process_chunks`), so a device receives
its workers' chunks, ``load / m`` of the global batch per worker, not all of it.
The test set is small and is placed replicated for evaluation.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxgc import models
from jaxgc.backends import spmd
from jaxgc.backends.base import TrainState
from jaxgc.experiment import checkpoints, resilience, runs
from jaxgc.experiment.build import Experiment, build, make_assignment, make_protocol, setup_devices
from jaxgc.experiment.config import ConfigError, check_config
from jaxgc.experiment.inputs import (
  StepInput,
  epoch_permutation,
  epoch_permutations,
  global_array,
  keys,
  step_chunks,
  train_step,
)
from jaxgc.experiment.plots import plot_accuracy_vs_time, time_to_target
from jaxgc.memo import per_object

__all__ = [
    "keys", "global_array", "epoch_permutation", "epoch_permutations", "step_chunks",
    "train_step", "StepInput", "evaluate", "train", "train_and_evaluate", "compare_protocols",
    "run",
]


def evaluate(apply_fn, params, test_data, regression: bool = False,
             batch_size: int | None = None, model_state=()) -> dict[str, float]:
  """Test-set loss and accuracy (or MSE for regression; perplexity for a language model).

  ``batch_size``: examples per forward pass (``None``: all at once); a language
  model's logits ``[n, T, vocab]`` for a whole validation split need not fit a device.
  ``model_state``: the model's other collections (batch-norm running statistics).
  """
  n = int(test_data[0].shape[0])
  size = n if batch_size is None else max(1, min(int(batch_size), n))
  metrics = _eval_fn(apply_fn, regression, size)(params, *test_data, model_state or {})
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


@functools.cache
def _eval_fn(apply_fn, regression, size: int):
  metrics = functools.partial(models.predict_metrics, apply_fn, regression=regression)

  def run(params, x, y, model_state):
    metrics_of = functools.partial(metrics, model_state=model_state)
    k = x.shape[0] // size
    split = lambda a: a[:k * size].reshape((k, size) + a.shape[1:])
    parts = jax.lax.map(lambda b: metrics_of(params, *b), (split(x), split(y)))
    total = jax.tree.map(lambda v: jnp.sum(v) * size, parts)
    if x.shape[0] > k * size:
      total = jax.tree.map(lambda t, v: t + v * (x.shape[0] - k * size), total,
                           metrics_of(params, x[k * size:], y[k * size:]))
    out = jax.tree.map(lambda t: t / x.shape[0], total)   # example-weighted means
    if "test_perplexity" in out:                          # exp of the mean loss, not a mean
      out["test_perplexity"] = jnp.exp(out["test_loss"])
    return out
  return jax.jit(run)


def _to_python(tree) -> dict:
  out = {}
  for k, v in jax.device_get(tree).items():
    v = np.asarray(v)
    if v.ndim:                      # per worker (the finish counts): a list
      out[k] = v.tolist()
    else:
      out[k] = bool(v) if v.dtype == bool else (int(v) if v.dtype.kind in "iu" else float(v))
  return out


def _make_update(exp: Experiment):
  """``(state, step input) -> (state, metrics)``: the jitted shard_map step on
  :class:`jaxgc.parallel.WorkerChunks`, or the step's own (host) update for the Ray
  backend on host chunks."""
  cfg = exp.config
  return per_object(exp.step, ("update", exp.step.traced, cfg.seed), lambda: _build_update(exp))


def _build_update(exp: Experiment):
  seed = exp.config.seed
  if exp.step.traced:
    return jax.jit(lambda state, chunks: exp.step.update(state, chunks, keys(seed)[2]),
                   donate_argnums=(0,))
  update, step_key = exp.step.update, keys(seed)[2]   # on the host: nothing to trace
  return lambda state, chunks: update(state, chunks, step_key)


def _step_input(exp: Experiment, rep):
  """``step -> input`` of the step object: per-worker for a step with a layout, host
  chunks for a step that is not traced (Ray), else the replicated chunks ``[N, ...]``."""
  cfg, ds = exp.config, exp.dataset
  layout = exp.step.layout if isinstance(exp.step.layout, spmd.WorkerLayout) else None
  inputs = StepInput((ds.x_train, ds.y_train), seed=cfg.seed, batch_size=cfg.batch_size,
                     num_chunks=exp.assignment.num_chunks, layout=layout)
  if layout is None and exp.step.traced:
    return inputs, lambda step: jax.tree.map(lambda x: global_array(x, rep),
                                             inputs.host_chunks(step))
  return inputs, inputs


def _input_bytes_per_device(inputs: StepInput, first) -> int | None:
  """Input bytes of one step on one device (``None``: host input, the Ray step)."""
  if isinstance(first, spmd.WorkerChunks) and inputs.layout is not None:
    return inputs.layout.device_bytes(first)
  leaves = jax.tree.leaves(first)
  if leaves and isinstance(leaves[0], jax.Array):
    return sum(x.addressable_shards[0].data.nbytes for x in leaves)
  return None


def _init_state(exp: Experiment, sharding):
  seed, model, example = exp.config.seed, exp.model, exp.dataset.x_train[:1]
  traced = exp.step.traced

  def init():   # keys built in the program from the static seed (see keys())
    params, model_state = models.init_variables(model, keys(seed)[0], example)  # (shapes only)
    if not traced:
      return params, model_state
    # A model with state (batch norm) keeps it in the TrainState, so it is checkpointed.
    extra = {"model_state": model_state} if model_state else {}
    return exp.step.init_state(params, keys(seed)[2], **extra)

  if traced:   # sharded over a group of devices on a 2-D mesh
    placed = exp.step.state_sharding(jax.eval_shape(init))
    sharding = sharding if placed is None else placed
  out = per_object(exp.step, ("init", traced, model, seed, example.shape, example.dtype),
                  lambda: jax.jit(init, out_shardings=sharding))()
  if traced:
    return out
  params, model_state = out     # the Ray step keeps a model's state (batch norm) too
  return exp.step.init_state(params, keys(seed)[2], **(
      {"model_state": model_state} if model_state else {}))


def _write_outputs(exp: Experiment, workdir: str, state, summary: dict) -> None:
  """Final parameters, the plot and ``summary.json`` (process 0), each renamed into place."""
  cfg = exp.config
  flat: dict[str, Any] = {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))}
  tmp = os.path.join(workdir, f"final_params.tmp{os.getpid()}.npz")
  np.savez(tmp, **flat)
  os.replace(tmp, os.path.join(workdir, "final_params.npz"))
  if not exp.dataset.is_regression:
    # From the log, so a resumed run still sees a target reached before the restart.
    summary["sim_time_to_target"] = time_to_target(runs.read_metrics(workdir),
                                                   cfg.target_accuracy)
    plot_accuracy_vs_time({summary["protocol"]: workdir},
                          os.path.join(workdir, "accuracy_vs_time.png"), cfg.target_accuracy,
                          title=f"{summary['protocol']}/{summary['mode']}, seed {cfg.seed}")
  runs.write_atomic(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2))
  print(json.dumps(summary), flush=True)


def train(exp: Experiment, workdir: str, restart: bool = False) -> TrainState:
  """Runs a built :class:`Experiment` in ``workdir``: resume, train, evaluate, checkpoint,
  summarise (see :func:`train_and_evaluate`, which checks the workdir first).

  ``exp.step`` is a :class:`jaxgc.backends.StepBackend` (the SPMD or the Ray step);
  it is closed at the end.
  """
  workdir = os.path.abspath(workdir)
  try:
    with runs.hold_workdir(workdir):
      return _train(exp, workdir, restart)
  except (OSError, RuntimeError, ValueError) as e:
    if isinstance(e, ConfigError):
      raise
    error = runs.disk_error(e, workdir)
    if error is None:
      raise
    raise error from None
  finally:
    exp.step.close()


def _train(exp: Experiment, workdir: str, restart: bool) -> TrainState:
  from jax.sharding import NamedSharding  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

  cfg, ds, lead = exp.config, exp.dataset, jax.process_index() == 0
  _claim_workdir(cfg, workdir, restart, lead)
  rep = NamedSharding(exp.mesh, P())
  # The test set is small: replicated. The training set stays on the host (StepInput).
  test_data = (global_array(ds.x_test, rep), global_array(ds.y_test, rep))
  state, ckpt, meta = checkpoints.restore(exp, workdir, _init_state(exp, rep), rep, lead)
  start = int(state.step)
  log = _resume_log(exp, workdir, state, lead)
  try:
    t0, wall_before = time.time(), float(meta.get("wall_time", 0.0))
    inputs, input_for = _step_input(exp, rep)
    if "input" in meta:   # the grain iterator's state: this pipeline's, at the restored step
      inputs.set_state(meta["input"], start, workdir)
    run = _Steps(exp, log, test_data, ckpt, lambda: wall_before + time.time() - t0, inputs)
    if start == 0 or (start not in log.eval_steps and (start % cfg.eval_every == 0
                                                        or start == cfg.num_steps)):
      # (again, after a resume whose evaluation line was lost)
      run.evaluate(state, start, float(state.sim_time))
    next_input = input_for(start) if start < cfg.num_steps else None
    input_bytes = _input_bytes_per_device(inputs, next_input)
    # The handlers stay until the stop step is saved and summarised: more SIGTERMs wait.
    with resilience.StopSignals() as signals:
      state, stopped = run.steps(state, start, next_input, input_for, signals)
      wall = run.wall()
      if ckpt is not None:
        if ckpt.latest_step() != int(state.step):
          checkpoints.save(ckpt, exp, int(state.step), state, wall, force=True,
                           extra_meta={"input": inputs.get_state(int(state.step))})
        ckpt.close()
      ev = run.ev
      if not ev or (stopped and int(state.step) not in log.eval_steps):
        # The summary's scores are the final state's (not logged: a resume logs them on time).
        ev = evaluate(exp.model.apply, state.params, test_data, ds.is_regression,
                      cfg.batch_size, getattr(state, "model_state", ()))
      state = _summarise(exp, workdir, state, {
          "wall_time_s": wall, "session_wall_time_s": time.time() - t0, "resumed_from": start,
          **ev, "step_wall_time_s": run.step_wall,
          "global_batch_bytes": inputs.global_batch_bytes(), "input_bytes_per_device":
          input_bytes, "stopped_by": stopped,
          # The Ray step's re-forms of the code (PROTOCOL.md §16), [] when none.
          "reforms": getattr(exp.step, "reforms", None)}, rep, lead)
  finally:
    log.close()
  if stopped:
    raise resilience.Preempted(int(state.step), stopped, saved=ckpt is not None)
  return state


def _claim_workdir(cfg, workdir: str, restart: bool, lead: bool) -> None:
  """``--restart`` clears the old run; ``config.json`` is written before anything else."""
  if lead:
    if restart and os.path.isdir(workdir):
      runs.clear_run(workdir)
    runs.save_config(cfg, workdir)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices("jaxgc workdir ready")


def _resume_log(exp: Experiment, workdir: str, state, lead: bool) -> runs.MetricsLog:
  """The metrics log cut back to the restored step, with the resume's notes."""
  cfg, start = exp.config, int(state.step)
  place = exp.step.placement(state.params) if lead else None
  if place is not None:
    for line in place.summary().splitlines():
      if "replicated:" in line:      # a large leaf the group cannot share
        runs.note(f"parameter {line.strip()}")
  if lead and start:
    runs.note(f"resuming {workdir} from step {start}.")
  if start > cfg.num_steps and lead:
    runs.note(f"{workdir} is already at step {start} > --config.num_steps={cfg.num_steps}: "
              "nothing to train (use a new --workdir for a shorter run).")
  return runs.MetricsLog(os.path.join(workdir, "metrics.jsonl"), start, lead)


def _summarise(exp: Experiment, workdir: str, state, extra: dict, rep, lead: bool):
  """Writes the outputs (process 0); ``extra``'s ``None``/``0.0`` entries are left out.
  Returns ``state`` with whole (replicated) parameters."""
  cfg = exp.config
  param_bytes = spmd.device_bytes((state.params, state.opt_state))
  if not all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params)):
    # Sharded over a group: every process needs whole parameters to write them out.
    state = state.replace(params=jax.jit(lambda p: p, out_shardings=rep)(state.params))
  if lead:
    summary = {"protocol": cfg.protocol.name, "mode": cfg.step.mode, "steps": int(state.step),
               "num_steps": cfg.num_steps, "sim_time": float(state.sim_time),
               "skipped": int(state.num_skipped), "erasures": int(state.num_erasures),
               "timeout": exp.timeout, "param_bytes_per_device": param_bytes}
    summary.update({k: v for k, v in extra.items()
                    if v is not None and not (k == "step_wall_time_s" and not v)})
    _write_outputs(exp, workdir, state, summary)
  return state


class _Steps:
  """The step loop of :func:`_train`: steps, metrics lines, evaluations, checkpoints."""

  def __init__(self, exp: Experiment, log, test_data, ckpt, wall, inputs: StepInput):
    self.exp, self.log, self.test_data, self.ckpt, self.wall = exp, log, test_data, ckpt, wall
    self.inputs = inputs
    self.ev: dict[str, float] = {}
    self.step_wall = log.last.get("wall_time", 0.0)   # Ray: real seconds the steps took
    # Checked once: NaN/Inf in the data turn into non-finite messages (erased) later.
    self.bad_inputs = resilience.nonfinite_inputs(exp.dataset)
    self.warned = False

  def evaluate(self, state, step: int, sim_time: float) -> None:
    cfg = self.exp.config
    self.ev = evaluate(self.exp.model.apply, state.params, self.test_data,
                       self.exp.dataset.is_regression, cfg.batch_size,
                       getattr(state, "model_state", ()))
    self.log.write({"step": step, "sim_time": sim_time, **self.ev})
    self.log.eval_steps.add(step)

  def _warn_nonfinite(self, rec: dict) -> None:
    """One line per run when non-finite inputs cause erasures or skipped steps."""
    hit = rec.get("erasures", 0) or rec.get("skipped", False)
    loss = rec.get("loss")
    if self.warned or not hit or (not self.bad_inputs and loss is not None
                                  and math.isfinite(loss)):
      return
    self.warned = True
    where = (f"the training data holds {self.bad_inputs} NaN/Inf value(s)" if self.bad_inputs
             else "the step's loss is non-finite (NaN/Inf in the messages)")
    if jax.process_index() == 0:
      runs.note(f"step {rec['step']}: {where}; the messages they touch are erased and steps "
                "that cannot be decoded are skipped (erasures/skipped in metrics.jsonl). "
                "Shown once per run.", kind="warning")

  def steps(self, state, start: int, next_input, input_for, signals):
    """Runs steps ``start..num_steps-1``; ``(state, signal name or None)`` after the last
    one run (a signal stops the loop after its current step)."""
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    cfg, lead = self.exp.config, jax.process_index() == 0
    update, name = _make_update(self.exp), f"{cfg.protocol.name}/{cfg.step.mode}"
    score_key = "test_mse" if self.exp.dataset.is_regression else "test_accuracy"
    # The first step compiles: the bar starts after it, so its rate and ETA are the steps'.
    bar = None
    if start < cfg.num_steps:
      bar = tqdm(total=cfg.num_steps, initial=start, disable=not lead, desc=name,
                 bar_format="{desc}: {n_fmt}/{total_fmt} compiling…")
    stopped = None
    try:   # (closed on an error too, so that its one line starts a line)
      for step in range(start, cfg.num_steps):
        state, metrics = update(state, next_input)
        # The next step's chunks are gathered and sent while this step runs.
        next_input = input_for(step + 1) if step + 1 < cfg.num_steps else None
        rec = {"step": step + 1, **_to_python(metrics)}
        if "wall_time" in rec:
          self.step_wall += rec["wall_time"]
          rec["wall_time"] = self.step_wall
        self.log.write(rec)
        self._warn_nonfinite(rec)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.num_steps:
          self.evaluate(state, step + 1, rec["sim_time"])
        assert bar is not None     # made above, as there are steps
        if step == start:
          bar.close()
          bar = tqdm(total=cfg.num_steps, initial=step + 1, disable=not lead, desc=name)
        else:
          bar.update(1)
        # refresh=False: the bar redraws at its own pace, not once per (fast) step.
        bar.set_postfix(loss=f"{rec['loss']:.3f}", sim_time=f"{rec['sim_time']:.0f}",
                        **{score_key: f"{self.ev.get(score_key, float('nan')):.3f}"},
                        refresh=False)
        checkpoints.save(self.ckpt, self.exp, step + 1, state, self.wall(),
                         extra_meta={"input": self.inputs.get_state(step + 1)})
        stopped = signals.requested()
        if stopped:
          break
    finally:
      if bar is not None:
        bar.close()
    return state, stopped


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       restart: bool = False) -> TrainState:
  """Trains and evaluates; writes metrics, checkpoints and a summary to ``workdir``.

  A workdir holds one run: rerunning resumes it (from the newest checkpoint that
  restores), a higher ``num_steps`` continues it, and a config that would change
  its results is refused unless ``restart`` (which starts over in ``workdir``).

  Returns the final :class:`jaxgc.parallel.TrainState`.

  Raises:
    ConfigError: (a ``ValueError``) a setting that cannot work, naming its flag;
      checked before any device work or file write.
  """
  check_config(config)
  runs.open_workdir(config, workdir, restart)
  if config.num_processes > 1:
    return train(build(config), workdir, restart)
  # A workdir that exists may be in use: find out before building (a new one is locked
  # when training starts; nothing is created for a config that does not build).
  with runs.lock_workdir(os.path.abspath(workdir), create=False):
    return train(build(config), workdir, restart)


def compare_protocols(config: ml_collections.ConfigDict, workdir: str,
                      names=("partial_straggler", "original", "uncoded"), *,
                      restart: bool = False) -> dict:
  """Trains once per protocol (same seed: same batches, same straggler draws).

  Every protocol's config is built (and so validated) before any training.
  Writes ``workdir/<protocol>/`` runs and ``workdir/accuracy_vs_time.png``;
  returns ``{protocol: simulated time to config.target_accuracy}``.
  """
  check_config(config)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir}", "is a file, not a directory.")
  configs = {}
  for name in names:
    cfg = copy.deepcopy(config)
    cfg.unlock()
    cfg.protocol.name = name
    runs.open_workdir(cfg, os.path.join(workdir, name), restart)
    configs[name] = cfg
  mesh = setup_devices(config)
  try:                       # protocols first: cheap, and the likeliest typo
    for cfg in configs.values():
      make_protocol(cfg, make_assignment(cfg))
  except ConfigError as e:
    if e.flag and e.flag.startswith("--config.protocol.name"):
      raise ConfigError(f"--compare={','.join(names)}",
                        e.message.replace("--config.protocol.name=", "")) from None
    raise
  built = {name: build(cfg, mesh) for name, cfg in configs.items()}
  run_dirs = {}
  for name, exp in built.items():
    run_dirs[name] = os.path.join(workdir, name)
    train(exp, run_dirs[name], restart)
  out = {n: time_to_target(runs.read_metrics(d), config.target_accuracy)
         for n, d in run_dirs.items()}
  if jax.process_index() == 0:
    plot_accuracy_vs_time(run_dirs, os.path.join(workdir, "accuracy_vs_time.png"),
                          config.target_accuracy,
                          title=f"{', '.join(names)}: {config.step.mode} mode, seed {config.seed}")
    runs.write_atomic(os.path.join(workdir, "comparison.json"), json.dumps(
        {"target_accuracy": config.target_accuracy, "sim_time_to_target": out}, indent=2))
  return out


def run(config, workdir: str, compare=None, restart: bool = False):
  """What ``train.py`` runs: :func:`compare_protocols` if ``compare`` names protocols,
  else :func:`train_and_evaluate`."""
  if compare:
    out = compare_protocols(config, workdir, tuple(compare), restart=restart)
    print(json.dumps({"target_accuracy": config.target_accuracy, "sim_time_to_target": out}))
    return out
  return train_and_evaluate(config, workdir, restart=restart)

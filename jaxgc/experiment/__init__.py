"""The experiment layer: config -> objects, the training loop, runs on disk, plots.

``train.py`` is a thin command line over this package::

  config = experiment.load_config("configs/default.py")
  experiment.apply_overrides(config, [("protocol.name", "original")])
  experiment.train_and_evaluate(config, "/tmp/run")

A workdir holds one run (config.json, metrics.jsonl, checkpoints/, summary.json,
final_params.npz, accuracy_vs_time.png); see :mod:`jaxgc.experiment.runs`.
"""
from jaxgc.experiment.build import (
  TIMEOUT_DRAWS,
  TIMEOUT_FACTOR,
  Experiment,
  build,
  check_memory,
  default_timeout,
  make_assignment,
  make_dataset,
  make_model,
  make_optimizer,
  make_protocol,
  make_step,
  make_straggler_model,
  sequence_length,
  setup_devices,
)
from jaxgc.experiment.config import (
  ALIASES,
  NON_RESULT_FIELDS,
  ConfigError,
  check_config,
  default_config,
  load_config,
  result_fields_differ,
)
from jaxgc.experiment.loop import (
  StepInput,
  compare_protocols,
  epoch_permutation,
  epoch_permutations,
  evaluate,
  global_array,
  keys,
  run,
  step_chunks,
  train,
  train_and_evaluate,
  train_step,
)
from jaxgc.experiment.overrides import apply_overrides, split_config_flags
from jaxgc.experiment.plots import plot_accuracy_vs_time, time_to_target
from jaxgc.experiment.resilience import EXIT_CODES, Preempted
from jaxgc.experiment.runs import MetricsLog, lock_workdir, open_workdir, read_metrics

__all__ = [
    # config
    "default_config", "load_config", "apply_overrides", "split_config_flags", "check_config",
    "result_fields_differ", "ConfigError", "ALIASES", "NON_RESULT_FIELDS",
    # config -> objects
    "Experiment", "build", "setup_devices", "make_dataset", "make_assignment", "make_protocol",
    "make_straggler_model", "make_model", "make_optimizer", "make_step", "default_timeout",
    "TIMEOUT_FACTOR", "TIMEOUT_DRAWS", "sequence_length", "check_memory",
    # loop
    "keys", "global_array", "epoch_permutation", "epoch_permutations", "step_chunks",
    "train_step", "StepInput", "evaluate", "train", "train_and_evaluate", "compare_protocols",
    "run",
    # runs on disk and plots
    "open_workdir", "read_metrics", "MetricsLog", "time_to_target", "plot_accuracy_vs_time",
    # resilience: preemption, exit codes, the workdir lock
    "Preempted", "EXIT_CODES", "lock_workdir",
]

# Communication in simulated time (jaxgc.network): the --config.network.* block.
from jaxgc.experiment.build import make_network  # noqa: E402

__all__ += ["make_network"]

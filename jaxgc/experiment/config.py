"""The experiment config: its fields, command-line overrides, old flag names.

A config is an ``ml_collections.ConfigDict`` with nested blocks whose fields go
straight to the library's constructors (big_vision style):

=============  ==============================================================
block          built with
=============  ==============================================================
``data``       ``jaxgc.data.load(name, test_fraction=, split_seed=, **data.<name>)``
``model``      ``jaxgc.models.get_model(name, num_classes, **model.<name>)``
``optimizer``  ``optax.<name>(learning_rate, **optimizer.<name>)``
``assignment`` ``jaxgc.assignments.ASSIGNMENTS.build(name, num_workers, load, **...)``
``protocol``   ``jaxgc.protocols.get_protocol(name, assignment, ell, **protocol.<name>)``
``straggler``  ``jaxgc.timing.get_model(name, failure_prob, **straggler.<name>)``
``step``       ``jaxgc.parallel.make_coded_step(..., **step)`` (or the Ray step)
``network``    ``jaxgc.network.get_network(name, bandwidth, latency)``, to the step
``ray``        ``jaxgc.backends.ray.RayStep(..., **ray)`` when ``backend="ray"``
=============  ==============================================================

``test_fraction`` and ``split_seed`` go to the datasets whose loader takes them
(``pystdlib``'s split is the text's tail: no seed).

Each name is looked up in the library's registry (``DATASETS``, ``MODELS``,
``ASSIGNMENTS``, ``PROTOCOLS``, ``STRAGGLER_MODELS``, ``BACKENDS``); a backend's
optional features (the adaptive PS, model state, a model axis, a network model)
are the capabilities it declares (:mod:`jaxgc.backends.capabilities`).

A *choice block* has a ``name`` and one sub-block of options per choice; only
the chosen one is used, so switching ``--config.straggler.name`` needs no other
edit. A choice that the config file does not list (say a straggler model added
to the library) takes its options on the command line,
``--config.straggler.<name>.<option>=value``; the library rejects unknown ones.
An option called ``seed`` left unset takes ``config.seed`` (where the
choice's options list one).

:data:`ALIASES` are shortcut flags for the common fields
(``--config.ell``, ``--config.protocol=original``, ``--config.straggler.shift``, ...).
"""
from __future__ import annotations

import difflib
import importlib.util
import os
from collections.abc import Iterable
from typing import Any

import ml_collections
from ml_collections import config_dict

__all__ = [
    "ConfigError", "default_config", "load_config", "check_config",
    "flatten", "effective", "result_fields_differ", "ALIASES", "CHOICE_BLOCKS",
    "NON_RESULT_FIELDS", "check_fields",
]

CHOICE_BLOCKS = ("data", "model", "optimizer", "assignment", "protocol", "straggler")

# Fields that may differ between invocations on one workdir: they do not change
# what a given step computes (only how long the run is, how often it reports and
# where it runs).
NON_RESULT_FIELDS = (
    "num_steps", "eval_every", "checkpoint_every", "max_checkpoints", "target_accuracy",
    "platform", "num_devices", "num_cpu_devices", "coordinator_address", "num_processes",
    "process_id", "distributed_timeout", "ray.address", "memory_budget_gb", "mesh.model",
    "tensorboard",
    # The Ray cluster's size: a resume on another one re-forms the code (PROTOCOL.md §16).
    "ray.num_actors", "ray.num_spares", "ray.max_restarts",
)

# Shortcut flags: the short names users type (--config.ell) -> the field they set.
# "<name>" is the block's chosen name, resolved once every override is applied.
ALIASES = {
    "mode": "step.mode",
    "deadline": "step.deadline",
    "timeout": "step.timeout",
    "message_loss_prob": "step.message_loss_prob",
    "nan_message_prob": "step.nan_message_prob",
    "report_condition": "step.report_condition",
    "failure_prob": "straggler.failure_prob",
    "ell": "protocol.ell",
    "load": "assignment.load",
    "num_workers": "assignment.num_workers",
    "decoding_matrix": "protocol.partial_straggler.decoding_matrix",
    "num_candidates": "protocol.partial_straggler.num_candidates",
    "construction": "protocol.original.construction",
    "rescale": "protocol.ignore_stragglers.rescale",
    "dataset": "data.name",
    "test_fraction": "data.test_fraction",
    "split_seed": "data.split_seed",
    "synthetic.*": "data.<name>.*",
    "hidden": "model.mlp.hidden",
    "learning_rate": "optimizer.learning_rate",
    "num_backup": "protocol.backup_workers.num_backup",
    "seq_len": "data.pystdlib.seq_len",
    "corpus_bytes": "data.pystdlib.max_bytes",
    "d_model": "model.transformer_lm.d_model",
    "num_heads": "model.transformer_lm.num_heads",
    "num_layers": "model.transformer_lm.num_layers",
    "straggler.*": "straggler.<name>.*",
}
# ``--config.<block>=NAME`` for a choice block means ``--config.<block>.name=NAME``.


class ConfigError(ValueError):
  """A setting that cannot work; ``flag`` names it as on the command line."""

  def __init__(self, flag: str | None, message: str):
    self.flag, self.message = flag, " ".join(str(message).split())
    super().__init__(f"{flag}: {self.message}" if flag else self.message)


def default_config() -> ml_collections.ConfigDict:
  """Every field with its default: digits, an MLP, 20 workers, partial-straggler coding."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_steps = 300
  c.batch_size = 320                # examples per step, split into num_chunks chunks

  _add_problem(c)
  _add_coding(c)
  _add_runtime(c)
  return c


def _add_problem(c: ml_collections.ConfigDict) -> None:
  """The data, the model and the optimizer."""
  # Data: digits ships with scikit-learn, the synthetic tasks are generated.
  # Each dataset's block holds its loader's options (jaxgc.data.DATASETS); only the
  # regression task has label noise.
  synthetic = dict(num_examples=4000, dim=32, data_seed=0)
  c.data = ml_collections.ConfigDict(dict(
      name="digits", test_fraction=0.2, split_seed=0,
      digits={}, synthetic_logistic=dict(synthetic),
      synthetic_linear=dict(synthetic, noise=0.1),
      # Next-byte prediction on the stdlib's source: seq_len bytes per sequence,
      # the first max_bytes bytes of the corpus.
      pystdlib=dict(seq_len=64, max_bytes=2_000_000),
      # Your own data: source="MODULE:FUNCTION" returns (train, test) of {"x", "y"}
      # examples (jaxgc.data.load_custom); num_classes unset: from the labels.
      custom=dict(source="", num_classes=None)))
  c.data.custom.num_classes = config_dict.placeholder(int)
  # A model option `seq_len` left unset takes the data's sequence length (one source).
  c.model = ml_collections.ConfigDict(dict(
      name="mlp", mlp=dict(hidden=(64, 64)), linear={}, cnn={}, cnn_bn=dict(dropout=0.1),
      transformer_lm=dict(d_model=64, num_heads=4, num_layers=2, mlp_ratio=4, seq_len=None)))
  c.model.transformer_lm.seq_len = config_dict.placeholder(int)
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adam", learning_rate=3e-3, adam={}, sgd=dict(momentum=None)))
  c.optimizer.sgd.momentum = config_dict.placeholder(float)


def _add_coding(c: ml_collections.ConfigDict) -> None:
  """Gradient coding: assignment, protocol, stragglers, the PS's stop rule, network, adaptive PS."""
  # Gradient coding: N = m chunks per step, each held by `load` workers.
  c.assignment = ml_collections.ConfigDict(dict(
      name="cyclic", num_workers=20, load=4, cyclic={}, fractional_repetition={},
      random_regular=dict(seed=None), by_speed=dict(speeds=None, load_min=None)))
  c.assignment.random_regular.seed = config_dict.placeholder(int)
  # by_speed: loads proportional to the workers' speeds (unset: equal, i.e. cyclic).
  c.assignment.by_speed.speeds = config_dict.placeholder(tuple)
  c.assignment.by_speed.load_min = config_dict.placeholder(int)
  # ell: one value, or a set such as (1, 2, 4) that the PS chooses from each step (§14).
  c.protocol = ml_collections.ConfigDict(dict(
      name="partial_straggler", ell=config_dict.FieldReference(2, field_type=object),
      partial_straggler=dict(decoding_matrix="auto", num_candidates=None, seed=None),
      original=dict(construction="auto", seed=None),
      uncoded={}, ignore_stragglers=dict(rescale=True)))
  c.protocol.partial_straggler.num_candidates = config_dict.placeholder(int)
  c.protocol.partial_straggler.seed = config_dict.placeholder(int)
  c.protocol.original.seed = config_dict.placeholder(int)

  # Per-chunk durations; failure_prob: a worker fails for the whole step.
  c.straggler = ml_collections.ConfigDict(dict(
      name="slowdown", failure_prob=0.0,
      slowdown=dict(shift=1.0, rate=1.0, fraction=0.2, factor=5.0),
      shifted_exponential=dict(shift=1.0, rate=1.0),
      pareto=dict(scale=1.0, alpha=2.0)))

  # When the PS stops (exact: once decodable; deadline: at min(deadline, t*)) and
  # message faults. timeout: simulated seconds the PS waits in exact mode before
  # giving up on an undecodable step; unset: 3x the median uncoded step time.
  # fail_at: a deterministic fault schedule, ((worker, step), ...): that worker finishes
  # nothing in that step (jaxgc.faults; simulated in spmd, a real kill on ray).
  # message_dtype: the messages' precision on the wire (PROTOCOL.md §15): float32,
  # bfloat16 or int8 (one float32 scale per 256 numbers); the network prices its bytes.
  c.step = ml_collections.ConfigDict(dict(
      mode="exact", deadline=None, timeout=None, message_loss_prob=0.0,
      nan_message_prob=0.0, report_condition=True, fail_at=(), message_dtype="float32"))
  c.step.deadline = config_dict.placeholder(float)
  c.step.timeout = config_dict.placeholder(float)
  # batch_axis_name: for a model written for pmap (flax BatchNorm(axis_name="batch")): the
  # axis its collectives name, bound to each chunk alone so its statistics are its own.
  c.step.batch_axis_name = config_dict.placeholder(str)
  # Communication in simulated time (jaxgc.network, PROTOCOL.md §11): a step costs
  # stop + comm. name: none (free messages), ps (PS ingress) or ring (all-reduce);
  # bandwidth in bytes per second, latency in seconds (the chunk durations' unit).
  c.network = ml_collections.ConfigDict(dict(name="none", bandwidth=None, latency=0.0))
  c.network.bandwidth = config_dict.placeholder(float)
  # The PS learns each worker's speed and re-places the chunk lists between steps
  # (jaxgc.adaptive.AdaptivePS of the protocol); the code and exactness are unchanged.
  c.adaptive = False
  # With adaptive: a CUSUM detector of slow workers (jaxgc.detector.Detector) restarts a
  # worker's speed estimate at a change point; metrics list slow_workers per step.
  c.detector = False


def _add_runtime(c: ml_collections.ConfigDict) -> None:
  """Where and how the step runs: backend, memory, devices, the loop's cadence."""
  # Where the step runs: "spmd" (one shard_map program) or "ray" (one actor per worker).
  c.backend = "spmd"
  # num_spares: warm actors that take over a dead one's workers at the next step;
  # max_restarts: per actor (unset: no limit); one out of them, or on a node that left,
  # is gone for good and the PS re-forms the code over the live workers (PROTOCOL.md §16).
  c.ray = ml_collections.ConfigDict(dict(num_actors=4, time_scale=0.01, address=None,
                                         num_spares=0, max_restarts=None))
  c.ray.address = config_dict.placeholder(str)
  c.ray.max_restarts = config_dict.placeholder(int)
  # Per-device memory the step may use (GiB); unset: what the device reports (none on
  # CPU: no check). The model's estimate (jaxgc.models.memory_estimate) must fit.
  c.memory_budget_gb = config_dict.placeholder(float)

  # Devices: num_devices in the mesh (all processes together). mesh.model: devices per
  # worker (PROTOCOL.md §13): a workers x model mesh, parameters and optimizer state
  # sharded over each worker's group (jaxgc.parallel.make_mesh(n, model=k)).
  c.mesh = ml_collections.ConfigDict(dict(model=1))
  c.platform = "cpu"                # cpu, or "" for JAX's default backend (GPU/TPU)
  c.num_devices = 8
  # Per process; unset: num_devices // num_processes.
  c.num_cpu_devices = config_dict.placeholder(int)
  c.coordinator_address = config_dict.placeholder(str)  # multi-host: "host:port"
  c.num_processes = 1
  c.process_id = 0
  c.distributed_timeout = 120       # seconds to wait for the other processes

  # Loop.
  c.eval_every = 10
  c.checkpoint_every = 50           # 0 disables checkpoints
  c.max_checkpoints = 2
  c.target_accuracy = 0.95          # reported, and marked on the plots
  # TensorBoard events in workdir/tensorboard/, a mirror of metrics.jsonl
  # (jaxgc.experiment.tensorboard): tensorboard --logdir workdir.
  c.tensorboard = True


# -- loading and overriding ---------------------------------------------------------

def load_config(path: str) -> ml_collections.ConfigDict:
  """``get_config()`` of the Python file ``path`` (``path:arg`` calls ``get_config(arg)``)."""
  arg = None
  if not os.path.isfile(path) and ":" in path:
    path, arg = path.rsplit(":", 1)
  if not os.path.isfile(path):
    raise ConfigError("--config", f"no config file {path!r}; pass a Python file with "
                      "get_config(), e.g. --config=configs/default.py.")
  spec = importlib.util.spec_from_file_location(
      "jaxgc_config_" + os.path.splitext(os.path.basename(path))[0], path)
  if spec is None or spec.loader is None:      # not a Python source file (no loader for it)
    raise ConfigError("--config", f"{path!r} is not a Python file; pass one with "
                      "get_config(), e.g. --config=configs/default.py.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError("--config", f"{path} defines no get_config().")
  config = module.get_config() if arg is None else module.get_config(arg)
  check_fields(config)
  return config


def _suggest(key: str, choices: Iterable[str], prefix: str) -> str:
  near = difflib.get_close_matches(key, list(choices), n=1)
  return f" Did you mean --config.{prefix}{near[0]}?" if near else ""


def check_fields(config: ml_collections.ConfigDict, reference=None, prefix: str = "") -> None:
  """Rejects fields the experiment does not know (typos), naming the closest one."""
  reference = default_config() if reference is None else reference
  for key in config:
    flag = f"--config.{prefix}{key}"
    if key not in reference:
      if "name" in reference and isinstance(config[key], ml_collections.ConfigDict):
        continue                     # options of a choice the defaults do not list
      raise ConfigError(flag, "unknown config field." + _suggest(key, reference.keys(), prefix))
    if isinstance(config[key], ml_collections.ConfigDict):
      if not isinstance(reference[key], ml_collections.ConfigDict):
        raise ConfigError(flag, "expected a value, got a block.")
      if "name" not in reference[key] or prefix:
        check_fields(config[key], reference[key], prefix + key + ".")
      else:
        check_fields(ml_collections.ConfigDict(
            {k: v for k, v in config[key].items() if not isinstance(v, ml_collections.ConfigDict)}),
            reference[key], prefix + key + ".")
    elif isinstance(reference[key], ml_collections.ConfigDict):
      raise ConfigError(flag, f"is a block; set one of its fields, e.g. "
                        f"--config.{prefix}{key}.{next(iter(reference[key].keys()))}=...")


def check_config(config: ml_collections.ConfigDict) -> None:
  """The experiment's own fields (the library checks the rest when building)."""
  check_fields(config)
  for key in ("num_steps", "eval_every", "batch_size"):
    if not isinstance(config[key], int) or config[key] < 1:
      raise ConfigError(f"--config.{key}", f"must be a positive integer, got {config[key]!r}.")
  for key in ("checkpoint_every", "max_checkpoints"):
    if not isinstance(config[key], int) or config[key] < 0:
      raise ConfigError(f"--config.{key}", f"must be an integer >= 0, got {config[key]!r}.")
  if not isinstance(config.get("tensorboard", True), bool):
    raise ConfigError("--config.tensorboard", f"must be True or False, got "
                      f"{config.tensorboard!r}.")
  from jaxgc.backends import BACKENDS  # pylint: disable=import-outside-toplevel
  if config.backend not in BACKENDS:
    raise ConfigError("--config.backend", f"unknown backend {config.backend!r}; choose "
                      "'spmd' (one shard_map program) or 'ray' (one actor per worker).")
  if config.num_devices < 1:
    raise ConfigError("--config.num_devices", f"must be >= 1, got {config.num_devices}.")
  if config.num_processes < 1 or not 0 <= config.process_id < config.num_processes:
    raise ConfigError("--config.process_id", f"need num_processes >= 1 and 0 <= process_id < "
                      f"num_processes, got {config.num_processes}, {config.process_id}.")
  model = config.mesh.model
  if not isinstance(model, int) or model < 1 or config.num_devices % model:
    raise ConfigError("--config.mesh.model", f"must be a positive integer dividing "
                      f"num_devices={config.num_devices} (devices per worker), got {model!r}.")
  if config.num_devices % config.num_processes:
    raise ConfigError("--config.num_devices", f"num_devices={config.num_devices} must split "
                      f"evenly over num_processes={config.num_processes}.")
  for block in CHOICE_BLOCKS:
    name = config[block].name
    if not isinstance(name, str) or not name:
      raise ConfigError(f"--config.{block}.name", f"must be a name, got {name!r}.")
    for key, value in config[block].items():
      if isinstance(value, ml_collections.ConfigDict) and key != name and key not in (
          default_config()[block]):
        raise ConfigError(f"--config.{block}.{key}",
                          f"sets options of {key!r}, but --config.{block}.name is {name!r}.")


# -- comparing runs --------------------------------------------------------------------

def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists become tuples (as read back from JSON)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = tuple(value) if isinstance(value, list) else value
  return out


def effective(config: dict) -> dict[str, Any]:
  """The flat fields that decide a run's results: unchosen option blocks dropped."""
  tree = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
  for block in CHOICE_BLOCKS:
    if isinstance(tree.get(block), dict):
      name = tree[block].get("name")
      tree[block] = {k: v for k, v in tree[block].items()
                     if not isinstance(v, dict) or k == name}
  return {k: v for k, v in flatten(tree).items() if k not in NON_RESULT_FIELDS}


def result_fields_differ(saved: dict, requested: dict) -> list[tuple[str, Any, Any]]:
  """``(field, saved, requested)`` for every field that changes results and differs."""
  a, b = effective(saved), effective(requested)
  # A field added after the run was saved holds its default there.
  default = effective(default_config().to_dict())
  a = {**{k: v for k, v in default.items() if k in b and k not in a}, **a}
  # A field removed since (an option its choice no longer takes) decided nothing then
  # that the remaining fields don't, unless the request still names it.
  known = set(flatten(default_config().to_dict()))
  a = {k: v for k, v in a.items() if k in b or k in known}
  # Where a choice differs, its name says it all: its options are another choice's.
  switched = tuple(k[:-len("name")] for k in a
                   if k.count(".") == 1 and k.endswith(".name") and a[k] != b.get(k))
  return [(k, a.get(k, "unset"), b.get(k, "unset")) for k in sorted(set(a) | set(b))
          if a.get(k, "unset") != b.get(k, "unset")
          and (k.endswith(".name") or not k.startswith(switched))]

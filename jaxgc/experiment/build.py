"""Config -> objects: each block goes straight to its library constructor.

The library validates; this module only says which flag a library ``ValueError``
is about (:class:`~jaxgc.experiment.config.ConfigError`).
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
from collections.abc import Collection
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import optax

from jaxgc import adaptive, assignments, backends, data, models, parallel, protocols, timing
from jaxgc import network as network_models
from jaxgc.backends import capabilities
from jaxgc.detector import Detector
from jaxgc.errors import ParamError
from jaxgc.experiment.config import ConfigError
from jaxgc.registry import signature_options

__all__ = [
    "Experiment", "build", "setup_devices", "make_dataset", "make_assignment",
    "make_protocol", "make_straggler_model", "make_network", "make_model", "make_optimizer",
    "make_step", "default_timeout", "TIMEOUT_FACTOR", "TIMEOUT_DRAWS", "sequence_length",
    "check_memory", "has_model_state", "config_ell",
]

TIMEOUT_FACTOR = 3.0   # default timeout: this many times the median uncoded step time
TIMEOUT_DRAWS = 256    # straggler draws behind that median


class Experiment(NamedTuple):
  """Everything a run is built from (see :func:`build`)."""
  config: ml_collections.ConfigDict
  dataset: data.Dataset
  assignment: assignments.Assignment
  protocol: Any
  straggler: Any
  model: Any
  tx: optax.GradientTransformation
  loss_fn: Any
  step: backends.StepBackend   # the SPMD CodedStep or the RayStep
  mesh: Any
  timeout: float | None


# -- naming the flag -----------------------------------------------------------------

def _options(block: ml_collections.ConfigDict, takes: Collection[str],
             seed: int) -> dict[str, Any]:
  """The chosen choice's options; unset ones dropped, an unset ``seed`` is ``config.seed``
  when the choice ``takes`` one."""
  sub = block.get(block.name)
  opts = {} if sub is None else {k: v for k, v in sub.to_dict().items() if v is not None}
  if "seed" in takes and "seed" not in opts:
    opts["seed"] = seed
  return {k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()}


def _parameters(fn) -> tuple[str, ...]:
  """``fn``'s keyword options (:func:`jaxgc.registry.signature_options`; ``()`` where
  Python cannot read its signature)."""
  try:
    return signature_options(fn)
  except (TypeError, ValueError):
    return ()


def _takes_kwargs(fn) -> bool:
  """Whether ``fn`` takes ``**kwargs`` (then it, not the config, decides its options)."""
  try:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD
               for p in inspect.signature(fn).parameters.values())
  except (TypeError, ValueError):
    return True


def _flag(path: str, config) -> str:
  node = config
  for key in path.split("."):
    node = node.get(key)
    if node is None:
      return f"--config.{path}"
  shown = node if isinstance(node, (int, float, bool)) or node is None else repr(node)
  return f"--config.{path}={shown}"


@contextlib.contextmanager
def blame(config, block: str, fields: tuple[str, ...] = (), default: str = ""):
  """Re-raises a library ``ValueError`` as a :class:`ConfigError` naming the flag.

  The flag is the field of ``fields`` (dotted config paths) that the error's ``param``
  names (:class:`jaxgc.errors.ParamError`; the chosen choice's option before a block
  field of the same name; ``"name"`` is ``<block>.name``), else ``default``
  (``<block>.name`` if empty). An unknown name's ``suggestion`` becomes the flag to
  type. The message is never parsed: an error without a ``param`` names ``default``.
  """
  try:
    yield
  except ConfigError:
    raise
  except ValueError as e:
    param = e.param if isinstance(e, ParamError) else None
    named = [f for f in fields if f.split(".")[-1] == param]
    if named:   # the chosen choice's own option before a block field of the same name
      path = max(named, key=lambda f: f.count("."))
    elif param == "name":
      path = f"{block}.name"
    else:
      path = default or f"{block}.name"
    if isinstance(e, ParamError) and e.suggestion is not None and path.endswith(".name"):
      # The registry's "Did you mean 'x'?" becomes the flag to type.
      raise ConfigError(_flag(path, config), f"{e.message} Did you mean "
                        f"--config.{path}={e.suggestion}?") from None
    raise ConfigError(_flag(path, config), str(e)) from None


def _fields(config, block: str) -> tuple[str, ...]:
  """Dotted paths of the block's fields and of its chosen options."""
  out = [f"{block}.{k}" for k, v in config[block].items()
         if not isinstance(v, ml_collections.ConfigDict) and k != "name"]
  sub = config[block].get(config[block].get("name", ""))
  if isinstance(sub, ml_collections.ConfigDict):
    out += [f"{block}.{config[block].name}.{k}" for k in sub]
  return tuple(out)


# -- devices -----------------------------------------------------------------------------

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
  with blame(config, "devices", ("mesh.model", "num_devices", "platform"), "num_devices"):
    return parallel.make_mesh(config.num_devices, platform, model=config.mesh.model)


# -- building blocks -----------------------------------------------------------------------

def make_dataset(config) -> data.Dataset:
  """The dataset ``config.data.name`` from :data:`jaxgc.data.DATASETS`, with the block's
  ``test_fraction`` and ``split_seed`` where its loader takes them."""
  d = config.data
  with blame(config, "data", _fields(config, "data")):
    takes = data.DATASETS.options(d.name)
    split = {k: d[k] for k in ("test_fraction", "split_seed") if k in takes}
    ds = data.load(d.name, **split, **_options(d, takes, config.seed))
  with blame(config, "data", ("batch_size",), "batch_size"):
    data.steps_per_epoch(ds.num_train, config.batch_size)
  return ds


def make_assignment(config) -> assignments.Assignment:
  """``config.assignment.name`` from :data:`jaxgc.assignments.ASSIGNMENTS`."""
  a = config.assignment
  with blame(config, "assignment", _fields(config, "assignment")):
    opts = _options(a, assignments.ASSIGNMENTS.options(a.name), config.seed)
    return assignments.ASSIGNMENTS.build(a.name, a.num_workers, a.load, **opts)


def config_ell(config) -> int | tuple[int, ...]:
  """``--config.ell``: a positive integer, or a set of them (``'(1, 2, 4)'``: ``ℓ`` chosen
  per step by the partial-straggler PS, PROTOCOL.md §14); a :class:`ConfigError` names it."""
  ell, name = config.protocol.ell, config.protocol.name
  if isinstance(ell, list):
    ell = tuple(ell)    # a config saved as JSON
  if isinstance(ell, tuple):
    try:
      ell = protocols.dynamic_ell.check_ells(ell)
    except ValueError as e:
      raise ConfigError("--config.ell", str(e)) from None
    if name != "partial_straggler":
      raise ConfigError("--config.ell", f"a set of ells {ell} is chosen per step by the "
                        f"partial_straggler PS only, not {name!r}; give one ell, e.g. "
                        f"--config.ell={ell[0]}.")
    return ell
  if isinstance(ell, bool) or not isinstance(ell, int) or ell < 1:
    raise ConfigError("--config.ell", f"must be a positive integer or a set such as "
                      f"'(1, 2, 4)', got {ell!r}.")
  return ell


def make_protocol(config, assignment):
  p = config.protocol
  ell = config_ell(config)
  for e in ell if isinstance(ell, tuple) else ():   # one ell: the protocol's own check
    try:
      assignment.check_ell(e)
    except ValueError as err:
      raise ConfigError("--config.ell", str(err)) from None
  with blame(config, "protocol",
             _fields(config, "protocol") + ("assignment.load", "assignment.num_workers")):
    opts = _options(p, protocols.PROTOCOLS.options(p.name), config.seed)
    return protocols.get_protocol(p.name, assignment, ell, **opts)


def make_straggler_model(config, failure_prob: float | None = None):
  """The straggler model (``failure_prob`` overrides the config's, e.g. 0 for the timeout)."""
  s = config.straggler
  fp = s.failure_prob if failure_prob is None else failure_prob
  with blame(config, "straggler", _fields(config, "straggler")):
    return timing.get_model(s.name, failure_prob=fp, **_options(s, (), config.seed))


def sequence_length(ds: data.Dataset) -> int | None:
  """Tokens per sequence of a text dataset (targets ``[n, T]``), else ``None``."""
  return int(ds.y_train.shape[1]) if ds.y_train.ndim == 2 else None


def make_model(config, num_classes: int, seq_len: int | None = None):
  """The model; ``seq_len`` (the data's, see :func:`sequence_length`) goes to a model
  whose options list ``seq_len``, where it must agree with any value set there."""
  m = config.model
  with blame(config, "model", _fields(config, "model")):
    takes = models.MODELS.options(m.name)
  opts = _options(m, takes, config.seed)
  if seq_len is not None and "seq_len" in takes:
    configured = opts.setdefault("seq_len", seq_len)
    if configured != seq_len:
      data_flag = (f"--config.data.{config.data.name}.seq_len"
                   if "seq_len" in config.data.get(config.data.name, {}) else "the data")
      raise ConfigError(_flag(f"model.{m.name}.seq_len", config),
                        f"differs from {data_flag}={seq_len}, the data's sequence length; "
                        f"leave --config.model.{m.name}.seq_len unset (it follows the data).")
  with blame(config, "model", _fields(config, "model")):
    return models.get_model(m.name, num_classes, **opts)


def make_optimizer(config) -> optax.GradientTransformation:
  o = config.optimizer
  fn = getattr(optax, o.name, None)
  if o.name.startswith("_") or not callable(fn) or isinstance(fn, type):
    near = difflib.get_close_matches(o.name, [n for n in dir(optax) if not n.startswith("_")],
                                     n=1)
    hint = f" Did you mean --config.optimizer.name={near[0]}?" if near else ""
    raise ConfigError(_flag("optimizer.name", config),
                      f"optax has no optimizer {o.name!r} (any optax.<name>(learning_rate, "
                      f"...) works).{hint}")
  takes = _parameters(fn)
  opts = _options(o, takes, config.seed)
  unknown = sorted(set(opts) - set(takes))
  if unknown and takes and not _takes_kwargs(fn):   # () : a signature Python cannot read
    raise ConfigError(_flag(f"optimizer.{o.name}.{unknown[0]}", config),
                      f"optax.{o.name} takes no option(s) {unknown}; it takes "
                      f"{[t for t in takes if t != 'learning_rate']}.")
  with blame(config, "optimizer", _fields(config, "optimizer")):
    tx = fn(o.learning_rate, **opts)
  if not isinstance(tx, optax.GradientTransformation):
    raise ConfigError(_flag("optimizer.name", config),
                      f"optax.{o.name} is not an optimizer (it returned {type(tx).__name__}).")
  return tx


def default_timeout(assignment, straggler, key, draws: int = TIMEOUT_DRAWS) -> float | None:
  """``TIMEOUT_FACTOR`` × the median uncoded step time over ``draws`` straggler draws.

  ``straggler`` should be the model without failures: the time the PS waits for
  a step that never becomes decodable, scaled from a normal step. ``None`` (no
  timeout) when no draw finishes.
  """
  uncoded = protocols.Uncoded(assignment)

  @jax.jit
  def times(key):
    k_init, k_steps = jax.random.split(key)
    state = timing.init_state(straggler, k_init, assignment.num_workers)

    def one(state, k):
      durations, state = timing.sample_step(straggler, k, state, assignment)
      return state, uncoded.completion_time(durations)
    return jax.lax.scan(one, state, jax.random.split(k_steps, draws))[1]

  t = np.asarray(times(key))
  return float(TIMEOUT_FACTOR * np.median(t[np.isfinite(t)])) if np.isfinite(t).any() else None


def make_network(config) -> network_models.Network:
  """The step's network model (:func:`jaxgc.network.get_network`); ``none`` by default."""
  n = config.get("network")
  if n is None:
    return network_models.NoNetwork()
  with blame(config, "network", ("network.bandwidth", "network.latency"), "network.name"):
    return network_models.get_network(n.name, n.bandwidth, n.latency)


def _requested_features(config, network, has_aux: bool) -> list[tuple[str, str, str]]:
  """``(capability, flag, how to stop asking)`` for each optional backend feature
  (:data:`jaxgc.backends.capabilities.FEATURES`) the config asks for."""
  asked = []
  if config.adaptive:
    asked.append(("adaptive", "--config.adaptive", "--config.adaptive=False"))
  if has_aux:
    asked.append(("model_state", _flag("model.name", config), ""))
  if config.mesh.model != 1:
    asked.append(("model_axis", "--config.mesh.model", "--config.mesh.model=1"))
  if not isinstance(network, network_models.NoNetwork):
    asked.append(("network_model", _flag("network.name", config), "--config.network.name=none"))
  return asked


def _check_backend(config, network, has_aux: bool) -> capabilities.Capabilities:
  """The backend's declared capabilities, after checking that it has every feature the
  config asks for and that what it requires imports."""
  name = config.backend
  caps = capabilities.of(name)
  for feature, flag, instead in _requested_features(config, network, has_aux):
    if getattr(caps, feature):
      continue
    able = capabilities.supporting(feature)
    # Suggest first a backend that needs nothing installed beyond jaxgc.
    first = sorted(able, key=lambda b: capabilities.of(b).requires is not None)[:1]
    fixes = [f"--config.backend={b}" for b in first] + ([instead] if instead else [])
    where = (f"the {' and '.join(able)} backend{'s do' if len(able) > 1 else ' does'}"
             if able else "no backend does")
    raise ConfigError(flag, f"backend {name!r} does not support {capabilities.FEATURES[feature]}"
                      f" ({where}); use {' or '.join(fixes)}.")
  if caps.requires:
    try:
      importlib.import_module(caps.requires)
    except ImportError:
      raise ConfigError(f"--config.backend={name}",
                        f"--config.backend={name} needs {caps.install or caps.requires}"
                        ) from None
  return caps


def make_step(config, protocol, straggler, loss_fn, tx, mesh, timeout=None, has_aux=False):
  """The coded step of ``config.backend``, from :data:`jaxgc.backends.BACKENDS`:
  :func:`jaxgc.parallel.make_coded_step` (``spmd``) or the Ray step (``ray``).

  A feature the config asks for (the adaptive PS, model state, a model axis, a
  network model) must be one the backend declares
  (:mod:`jaxgc.backends.capabilities`). A config block named after the backend
  (``config.ray``) holds its own options. ``has_aux``: the loss returns
  ``(loss, new model state)`` (batch norm).
  """
  s = config.step
  detect = config.get("detector", False)      # (absent from configs saved before it)
  for name, value in (("adaptive", config.adaptive), ("detector", detect)):
    if not isinstance(value, bool):
      raise ConfigError(f"--config.{name}", f"must be True or False, got {value!r}.")
  if detect and not config.adaptive:
    raise ConfigError("--config.detector", "the straggler detector is the adaptive PS's; add "
                      "--config.adaptive=True, or leave --config.detector=False.")
  batch_axis_name = s.get("batch_axis_name")
  # Only the spmd step runs the loss under shard_map, with the axis bound per chunk.
  if batch_axis_name is not None and config.backend != "spmd":
    raise ConfigError(_flag("step.batch_axis_name", config),
                      f"backend {config.backend!r} cannot bind an axis per chunk; use "
                      "--config.backend=spmd, or a model without cross-replica collectives.")
  if config.backend != "ray" and config.get("ray", {}).get("num_spares", 0):
    raise ConfigError("--config.ray.num_spares", f"hot spares are Ray actors, but "
                      f"--config.backend={config.backend}; use --config.backend=ray, or leave "
                      "--config.ray.num_spares=0.")
  if isinstance(protocol, protocols.DynamicEll) and config.backend != "spmd":
    raise ConfigError("--config.ell", f"ell chosen per step {protocol.ells} runs on the spmd "
                      f"backend only; use --config.backend=spmd, or one ell such as "
                      f"--config.ell={protocol.ells[0]}.")
  net = make_network(config)
  caps = _check_backend(config, net, has_aux)
  kwargs: dict[str, Any] = dict(mode=s.mode, deadline=s.deadline,
                                message_loss_prob=s.message_loss_prob,
                                nan_message_prob=s.nan_message_prob,
                                report_condition=s.report_condition)
  fail_at = s.get("fail_at", ())
  if fail_at:   # simulated in the spmd step, a real kill on Ray
    kwargs["fail_at"] = fail_at
  if timeout is not None:
    kwargs["timeout"] = timeout
  message_dtype = s.get("message_dtype", "float32")
  if message_dtype != "float32":   # checked by the backend, which names the field
    kwargs["message_dtype"] = message_dtype
  if has_aux:
    kwargs["has_aux"] = True
  if batch_axis_name is not None:
    kwargs["batch_axis_name"] = batch_axis_name
  if caps.adaptive:
    kwargs["adaptive"] = adaptive.AdaptivePS(
        protocol, detector=Detector() if detect else None) if config.adaptive else None
  if caps.network_model:
    kwargs["network"] = net
  own = config.get(config.backend)
  own = own.to_dict() if isinstance(own, ml_collections.ConfigDict) else {}
  fields = _fields(config, "step") + (_fields(config, config.backend) if own else ())
  with blame(config, "step", fields, "backend" if own else "step.mode"):
    return backends.get_backend(config.backend)(protocol, straggler, loss_fn, tx, mesh,
                                                **kwargs, **own)


def _check_batches(config, ds, num_chunks: int):
  """The library's chunking checks, traced (no device work) before training."""
  x = jax.ShapeDtypeStruct(ds.x_train.shape, ds.x_train.dtype)
  y = jax.ShapeDtypeStruct(ds.y_train.shape, ds.y_train.dtype)
  with blame(config, "data", ("batch_size", "assignment.num_workers"), "batch_size"):
    data.check_chunking(config.batch_size, num_chunks, sequence_length(ds))
    jax.eval_shape(lambda d: data.step_chunks(d, jax.random.key(0), 0, config.batch_size,
                                              num_chunks), (x, y))


def check_memory(config, model, loss_fn, tx, ds, assignment, num_devices: int,
                 mesh=None) -> None:
  """The model's per-device memory estimate against ``config.memory_budget_gb``
  (unset: :func:`jaxgc.models.device_memory_budget`; no budget, no check).

  On a ``workers × model`` ``mesh`` a device holds its share of the parameters,
  optimizer state and messages (the FSDP placement, :func:`jaxgc.parallel.place_params`)."""
  budget = config.memory_budget_gb
  budget = models.device_memory_budget() if budget is None else budget * 2**30
  if budget is None:
    return
  params, model_state = jax.eval_shape(
      lambda k: models.init_variables(model, k, ds.x_train[:1]), jax.random.key(0))
  if model_state:   # the memory of the gradient: the state and the key are inputs
    held_state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), model_state)
    stateful_loss = loss_fn
    loss_fn = lambda p, c: stateful_loss(p, c, held_state, rng=jax.random.key(0))[0]
  per_chunk = config.batch_size // assignment.num_chunks
  chunk = tuple(jax.ShapeDtypeStruct((per_chunk,) + a.shape[1:], a.dtype)
                for a in (ds.x_train, ds.y_train))
  nbytes = lambda tree: sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
                           for a in jax.tree.leaves(tree))
  p, opt = nbytes(params), nbytes(jax.eval_shape(tx.init, params))
  positions, held = num_devices, None
  if mesh is not None:
    positions = mesh.shape[parallel.AXIS]
    held = parallel.place_params(params, mesh).bytes_per_device()
  # The step streams over a device's chunk slots: one chunk gradient at a time, plus a
  # message of d/ell per worker on the device and the decoded gradient.
  workers = -(-assignment.num_workers // positions)
  buffers = 2 + -(-workers // min(_as_tuple(config_ell(config))))   # the largest messages
  est = models.memory_estimate(loss_fn, params, chunk, assignment.max_load,
                               optimizer_slots=round(opt / max(p, 1)), gradient_buffers=buffers,
                               param_bytes=held)
  with blame(config, "memory", ("assignment.load", "memory_budget_gb"), "memory_budget_gb"):
    models.check_memory(est, budget, assignment.max_load)


def _as_tuple(x) -> tuple:
  return x if isinstance(x, tuple) else (x,)


def has_model_state(model, example_x) -> bool:
  """Whether the model has collections besides ``params`` (batch-norm statistics)."""
  shapes = jax.eval_shape(lambda k: models.init_variables(model, k, example_x), jax.random.key(0))
  return bool(shapes[1])


def build(config, mesh=None) -> Experiment:
  """Builds every part of a run from ``config`` (devices first, unless ``mesh`` is given).

  Raises:
    ConfigError: a setting the library rejects, naming its flag.
  """
  mesh = setup_devices(config) if mesh is None else mesh
  ds = make_dataset(config)
  assignment = make_assignment(config)
  protocol = make_protocol(config, assignment)
  _check_batches(config, ds, assignment.num_chunks)
  straggler = make_straggler_model(config)
  model = make_model(config, ds.num_classes, sequence_length(ds))
  tx = make_optimizer(config)
  stateful = has_model_state(model, ds.x_train[:1])
  loss_fn = (models.stateful_chunk_loss_fn if stateful else models.chunk_loss_fn)(
      model.apply, config.batch_size, ds.is_regression)
  check_memory(config, model, loss_fn, tx, ds, assignment, mesh.devices.size, mesh)
  timeout = config.step.timeout
  if config.step.mode == "exact" and timeout is None:
    timeout = default_timeout(assignment, make_straggler_model(config, failure_prob=0.0),
                              jax.random.fold_in(jax.random.key(config.seed), 0x7173))
  elif config.step.mode != "exact":
    timeout = None
  step = make_step(config, protocol, straggler, loss_fn, tx, mesh, timeout, has_aux=stateful)
  return Experiment(config, ds, assignment, protocol, straggler, model, tx, loss_fn, step,
                    mesh, timeout)

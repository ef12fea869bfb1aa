"""The step interface both backends implement, and the pieces they share.

A backend runs one coded training step (PROTOCOL.md §6): the SPMD step
(:class:`jaxgc.parallel.CodedStep`, one ``shard_map`` program that simulates
time) and the Ray step (:class:`jaxgc.backends.ray.RayStep`, actors in real time).
Both must give the same gradient for the same key, so what decides it lives here
once and both call it:

- :func:`straggler_init_key` / :func:`init_straggler_state`: the straggler
  model's state before step 0, from the base key;
- :func:`draw_step`: one step's durations ``τ [m, max_load]`` and injected
  message faults (lost, NaN), from the step's key ``fold_in(key, step)``;
- :class:`TrainState`: what a step updates (parameters, optimizer state, the
  simulated clock, the straggler model's and the adaptive PS's states);
- :func:`check_step_args` and :func:`check_straggler`: the mode, deadline,
  timeout, fault-probability and straggler-model checks;
- :func:`optimizer_update` and :func:`keep_if`: the ``optax`` update and the
  rule "a non-finite update never touches the parameters".

The rules of the step itself (work slots, decode, erasures, skip, metrics, the
state's update) are :mod:`jaxgc.backends.core`'s.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgc import protocols as _protocols
from jaxgc import timing
from jaxgc.errors import ParamError

__all__ = [
    "StepBackend", "TrainState", "STRAGGLER_INIT", "straggler_init_key", "init_straggler_state",
    "StepDraw", "draw_step", "check_step_args", "check_straggler", "optimizer_update", "keep_if",
]

# fold_in data of the straggler model's initial-state key; steps use 0, 1, 2, ...
STRAGGLER_INIT = 0x7FFFFFFF


@runtime_checkable
class StepBackend(Protocol):
  """What the experiment loop needs of a coded step, whichever backend runs it.

  Attributes:
    traced: ``update`` is a pure JAX function of ``(state, chunks, key)``: the
      loop jits it and builds the state under ``jit``. ``False``: it runs on the
      host (the Ray PS) and takes host chunks.
    layout: the :class:`jaxgc.parallel.WorkerLayout` the step wants its input laid
      out by (per worker, :meth:`jaxgc.parallel.WorkerLayout.shard_chunks`);
      ``None``: replicated chunks ``[N, ...]`` (traced) or host chunks.
  """

  traced: bool
  layout: Any

  def init_state(self, params, key) -> Any:
    """A fresh :class:`TrainState` (``key``: the run's base key)."""
    ...

  def update(self, state, chunks, key) -> tuple[Any, dict]:
    """One optimizer step: ``(new_state, metrics)``; never writes NaN into the parameters."""
    ...

  def gradient(self, params, chunks, key) -> tuple[Any, dict]:
    """One step's decoded gradient ``ĝ`` (a pytree like ``params``) and its metrics."""
    ...

  def placement(self, params) -> Any:
    """Where ``params`` live (:class:`jaxgc.parallel.Placement`); ``None``: on the host."""
    ...

  def state_sharding(self, state) -> Any:
    """The state's ``NamedSharding`` pytree; ``None``: the caller's (replicated) choice."""
    ...

  def close(self) -> None:
    """Releases what the step holds (actors); the step may not run afterwards."""
    ...


# -- the state -------------------------------------------------------------------------

@flax.struct.dataclass
class TrainState:
  """Replicated training state.

  Attributes:
    step: int32 scalar, steps taken (skipped ones included).
    params: model parameter pytree.
    opt_state: optax state.
    sim_time: float32 scalar, cumulative simulated wall-clock seconds.
    num_skipped: int32, steps whose update was dropped (undecodable / non-finite).
    num_erasures: int32, cumulative erased messages.
    plan: the :class:`jaxgc.parallel.Plan` of step ``step``, made during the
      previous step; ``None`` (:meth:`create`): the step plans itself first.
    straggler_state: the straggler model's state after the durations of the
      latest planned step (``()`` for i.i.d. models), so a model with memory
      advances with the steps and is checkpointed with them.
    adaptive_state: the adaptive PS's :class:`jaxgc.adaptive.AdaptiveState`
      after observing the latest planned step (``()`` without one): its
      placement is that of the step after ``plan``'s.
    model_state: the model's variables that are not trained (batch-norm running
      statistics), ``()`` for none; the loss receives it as its first extra
      argument, and :meth:`jaxgc.parallel.CodedStep.update` replaces it by the
      chunk mean of the loss's ``aux`` (ghost batch norm, PROTOCOL.md §12).
  """
  step: jax.Array
  params: Any
  opt_state: Any
  sim_time: jax.Array
  num_skipped: jax.Array
  num_erasures: jax.Array
  plan: Any = None
  straggler_state: Any = ()
  adaptive_state: Any = ()
  model_state: Any = ()

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation, plan=None,
             straggler_state=(), adaptive_state=(), model_state=()) -> TrainState:
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               sim_time=jnp.zeros((), jnp.float32), num_skipped=jnp.zeros((), jnp.int32),
               num_erasures=jnp.zeros((), jnp.int32), plan=plan,
               straggler_state=straggler_state, adaptive_state=adaptive_state,
               model_state=model_state)

  if TYPE_CHECKING:
    # Added at run time by flax.struct.dataclass; declared here for the type checker.
    def replace(self, **changes: Any) -> TrainState:
      """A copy with the fields in ``changes`` replaced."""
      ...


# -- keys and draws --------------------------------------------------------------------

def straggler_init_key(key: jax.Array) -> jax.Array:
  """The key of the straggler model's initial state: ``fold_in(key, STRAGGLER_INIT)``."""
  return jax.random.fold_in(key, STRAGGLER_INIT)


def init_straggler_state(straggler, key: jax.Array, num_workers: int):
  """The straggler model's state before step 0 (``key``: the run's base key)."""
  return timing.init_state(straggler, straggler_init_key(key), num_workers)


class StepDraw(NamedTuple):
  """One step's random part, drawn for the ``m`` real workers.

  Attributes:
    durations: ``τ [m, max_load]`` simulated seconds per chunk slot.
    lost: bool ``[m]``, messages lost in transit.
    corrupt: bool ``[m]``, messages that arrive non-finite.
    straggler_state: the model's state after this step's durations.
  """
  durations: jax.Array
  lost: jax.Array
  corrupt: jax.Array
  straggler_state: Any


def draw_step(straggler, assignment, key: jax.Array, straggler_state,
              message_loss_prob: float, nan_message_prob: float) -> StepDraw:
  """The durations and message faults of the step whose key is ``key`` (= ``fold_in(base, s)``).

  ``key`` splits three ways: durations, message loss, NaN messages. Each fault
  is ``bernoulli(p)`` per worker, none drawn where ``p = 0``.
  """
  k_dur, k_loss, k_nan = jax.random.split(key, 3)
  durations, straggler_state = timing.sample_step(straggler, k_dur, straggler_state, assignment)
  m = assignment.num_workers
  draw = lambda k, p: jax.random.bernoulli(k, p, (m,)) if p > 0 else jnp.zeros((m,), bool)
  return StepDraw(durations, draw(k_loss, message_loss_prob), draw(k_nan, nan_message_prob),
                  straggler_state)


# -- argument checks -------------------------------------------------------------------

def check_step_args(protocol, mode: str, deadline, timeout, message_loss_prob: float,
                    nan_message_prob: float) -> None:
  """Refuses a bad mode, deadline, timeout or fault probability with a ``ValueError``.

  The mode, deadline and timeout are checked by the one stop rule
  (:func:`jaxgc.protocols.stop_time`), traced on shapes only (no device work).
  """
  jax.eval_shape(lambda t: _protocols.stop_time(protocol, t, mode, deadline, timeout),
                 jax.ShapeDtypeStruct(protocol.assignment.order.shape, jnp.float32))
  for name, p in (("message_loss_prob", message_loss_prob),
                  ("nan_message_prob", nan_message_prob)):
    if not 0.0 <= p <= 1.0:
      raise ValueError(f"{name} must be in [0, 1], got {p}.")


def check_adaptive(adaptive, protocol) -> None:
  """Refuses an adaptive PS built for another assignment, or one that would change the
  lists (``reassign``): a step places the assignment's whole lists; unequal loads are
  :func:`jaxgc.adaptive.simulate`'s."""
  if adaptive is None:
    return
  a = protocol.assignment
  if (adaptive.protocol.assignment.num_workers != a.num_workers
      or not np.array_equal(adaptive.protocol.assignment.order, a.order)):
    raise ParamError("adaptive: the AdaptivePS was built for another assignment; build it "
                     "with the step's protocol, AdaptivePS(protocol).", "adaptive")
  if adaptive.reassign:
    raise ParamError("adaptive: reassign=True (unequal loads) runs in jaxgc.adaptive.simulate "
                     "only; a step places the assignment's lists: use "
                     "AdaptivePS(protocol, reassign=False).", "adaptive")


def check_straggler(straggler) -> None:
  """Refuses, when the step is built, a straggler model that cannot draw durations.

  A model is a :class:`jaxgc.timing.StragglerModel` (it has ``sample``); one with
  memory across steps (``stateful = True``) needs ``sample_step`` only.
  """
  if getattr(straggler, "stateful", False):
    ok = callable(getattr(straggler, "sample_step", None))
  else:
    ok = isinstance(straggler, timing.StragglerModel)
  if not ok:
    raise ValueError(
        f"straggler must be a straggler model with sample(key, assignment) (or, with memory, "
        f"sample_step), got {type(straggler).__name__} {straggler!r}; build one with "
        "jaxgc.timing.get_straggler_model(name) or e.g. jaxgc.timing.Slowdown(...).")


# -- the update ------------------------------------------------------------------------

def optimizer_update(tx: optax.GradientTransformation, grads, opt_state, params):
  """``(params, opt_state, finite)`` after one ``optax`` step with ``grads``.

  ``finite``: bool ``[]``, every update is finite. One scalar instead of a
  reduction per leaf: any NaN/Inf makes the sum non-finite.
  """
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  finite = jnp.isfinite(sum(jnp.sum(u) for u in jax.tree.leaves(updates)))
  return params, opt_state, finite


def keep_if(skip, old, new):
  """``old`` where the step is skipped, else ``new`` (pytrees of one structure).

  A traced ``skip`` takes one ``lax.cond`` rather than a select per leaf: fewer
  kernels, each of which runs on every device of the mesh. A Python or NumPy
  bool (the Ray PS, on the host) chooses directly.
  """
  if isinstance(skip, (bool, np.bool_)):
    return old if skip else new
  return jax.lax.cond(skip, lambda: old, lambda: new)

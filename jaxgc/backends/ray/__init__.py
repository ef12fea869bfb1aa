"""The coded step on real asynchronous workers: Ray actors and a PS that never waits for stragglers.

The SPMD step (:mod:`jaxgc.parallel`) simulates time: every device waits for every
other one, so a real straggler slows all protocols alike. Here the ``m`` jaxgc
workers run on ``num_actors`` Ray actors (worker ``j`` on actor ``j mod num_actors``)
and the driver plays the PS, in real time:

1. **Dispatch.** The step's injected durations ``τ [m, max_load]`` come from the
   straggler model and the step's key (``fold_in(key, step)``, as in
   :class:`jaxgc.parallel.CodedStep`). Each worker processes its chunks in its
   assigned order: real JAX compute (one jitted ``value_and_grad`` per actor, of the
   SPMD step's own chunk loss, key and extra arguments, :mod:`jaxgc.backends.chunk_rule`;
   with ``model=k`` on a group of ``k`` of the actor's devices), then
   an injected sleep of ``τ · time_scale`` seconds; ``τ = inf`` (a failed worker)
   stops it. It keeps each finished chunk gradient (and ``aux``) and reports the chunk
   to the PS. With an adaptive PS, logical worker ``j`` runs on the actor of physical
   worker ``perm[j]``.
   Only actors that Ray's control store calls alive get work
   (:class:`ActorLiveness`): the workers of a dead or restarting
   actor are the step's ``dead_workers``, and a restarted actor gets the current
   parameters with its next dispatch. ``fail_at`` kills the actor hosting a
   worker at the start of a step (:mod:`jaxgc.faults`, :func:`kill_scheduled`).
2. **Watch.** The PS reads the reports as they come (``ray.wait`` on streaming
   generators, never a blocking get on one worker) and stops as soon as the
   protocol's ``completion_time`` of the arrivals so far is finite, i.e. at the
   moment the simulator would stop on these arrival times (for the coded
   protocols: every chunk has ``ℓ`` finishers; for backup workers: ``m − b``
   workers reported), in exact mode; or at the deadline
   ``T · time_scale`` wall seconds after dispatch (deadline mode; ``T`` is in
   simulated seconds as everywhere in jaxgc, so one config runs on both backends).
   An exact-mode step that can never decode (dead workers) stops once nothing
   more can arrive, or at ``timeout · time_scale`` plus ``message_timeout`` wall
   seconds for the real compute.
3. **Round.** The PS solves the coefficients of the observed state with the
   protocol's own solve, sends each worker its row, and collects the ``⌈d/ℓ⌉``
   messages (:func:`jaxgc.protocols.encode` on the worker). That call also stops
   every worker: work no longer needed is dropped between chunks and mid-sleep.
4. **Erasures** (PROTOCOL.md §2). A worker whose actor died, whose message is
   lost or non-finite, gets ``k_j = 0``; the PS re-solves once and collects again
   from the rest. Exact if coverage still allows, else the deadline-mode estimate
   (``exact`` is False). A failure in that second round, or no sender at all,
   skips the step; a skipped or non-finite update never touches the parameters.
5. **Decode and update** on the PS (:func:`jaxgc.protocols.decode`, ``optax``); a
   model's state moves to the mean of the chunks' ``aux`` (ghost batch norm), and the
   adaptive PS observes the state it saw.
   The metrics add the final solve's ``condition_number``, each message's size
   (``message_bytes``) and its measured transfer time (``message_transfer_s``).

Times: ``step_sim_time`` is the simulator's stop time for the injected durations
(the same number the SPMD backend reports for the same key), ``wall_time`` the
real seconds of the step. Each step's measured chunk finish times are kept in
:attr:`RayStep.last_record`; :func:`measured_durations` turns one into durations
for :class:`jaxgc.timing.RecordedDurations`, so a real run replays in the simulator.

Membership (PROTOCOL.md §16, :mod:`jaxgc.backends.ray.membership`): at each step
boundary a hot spare (``num_spares``) takes over a dead actor's workers; an actor gone
for good (out of ``max_restarts``, or its node left) with no spare, or a node that
joined, re-forms the code over the live workers. The metrics add ``live_workers`` and
``membership_epoch``; :attr:`RayStep.reforms` lists each re-form.

Modules, one idea each: ``connect`` (joining Ray, the lazy import and install
hint), ``actor`` (the worker host actor), ``pool`` (:class:`WorkerPool`),
``liveness`` (which actors are alive, :class:`Restart`), ``membership`` (spares and
re-forms, :class:`Membership`), ``kills``
(``fail_at`` kills, :class:`KillLoop`), ``compute`` (the PS's jitted draw,
solve, stop test, decode, update, on the rules of :mod:`jaxgc.backends.core`),
``records`` (what a step saw), ``watch`` (phase 2), ``messages`` (phase 3 on the
wire), ``chunk_aux`` (the chunks' ``aux`` to the PS), ``ps`` (:class:`RayStep`) and
``value_and_grad`` (:class:`RayGradFn`, ``jaxgc.coded_value_and_grad(...,
backend="ray")``: your own loop, a host function that cannot be jitted).
Ray itself is imported only when a pool is built, so importing this package
needs no Ray.
"""
from __future__ import annotations

from jaxgc.backends.core import work_slots
from jaxgc.backends.ray.actor import ACTOR_XLA_FLAGS, actor_xla_flags
from jaxgc.backends.ray.connect import INSTALL_HINT, connect
from jaxgc.backends.ray.kills import KillLoop, kill_scheduled
from jaxgc.backends.ray.liveness import ERROR_GRACE_S, ActorLiveness, Restart, actor_state
from jaxgc.backends.ray.membership import Membership, Reform, reformed_assignment
from jaxgc.backends.ray.pool import WorkerPool
from jaxgc.backends.ray.ps import RayStep
from jaxgc.backends.ray.records import measured_durations
from jaxgc.backends.ray.value_and_grad import RayGradFn, ray_value_and_grad

__all__ = [
    "ACTOR_XLA_FLAGS", "ERROR_GRACE_S", "INSTALL_HINT", "ActorLiveness", "KillLoop",
    "Membership", "RayGradFn", "RayStep", "Reform", "Restart", "WorkerPool", "actor_state",
    "actor_xla_flags", "connect", "reformed_assignment",
    "kill_scheduled", "measured_durations", "ray_value_and_grad", "work_slots",
]

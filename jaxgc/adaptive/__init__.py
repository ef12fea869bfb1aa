"""An adaptive PS (PROTOCOL.md §10): learn who is slow, and place the work accordingly.

The PS sees the state ``k`` at every stop. From it, it keeps an exponentially
weighted estimate of each *physical* worker's chunk rate, ``rate_p = EWMA(k_p / stop)``
(a worker that finished its whole list only shows a lower bound, so its estimate
may rise but not fall: see :func:`update_rates`). Between steps it re-chooses a **placement**:
a permutation ``perm`` ``[m]`` saying which physical worker runs logical worker
``j``'s chunk list, so ``τ_logical[j] = τ_physical[perm[j]]``. Each step's chunks
are fresh samples, so moving a list costs nothing beyond routing the input, and
the protocol (its assignment, ordering, code) is untouched: exactness is too.

What it optimises: ``E[t*]`` of the protocol under the estimated speeds (mean
chunk duration ``μ_p = 1 / rate_p``, times a fixed set of mean-one noise draws),
over a family of candidate placements:
the current one and, for ``s = 1..m``, "the ``s`` slowest workers spread evenly
around the list of logical workers, the rest in rank order". Spreading is what
the structure asks for: with a cyclic assignment a chunk's holders are ``δ``
consecutive logical workers, so adjacent slow workers starve the chunks they
share, while spread ones leave every chunk fast holders. The count ``s`` is
chosen by the objective, so no threshold on "slow" is needed. Ties keep the
current placement (no churn when nothing is learnt).

Under an i.i.d. straggler model the physical workers are exchangeable and the
placement depends only on past steps, so the completion time has the same law
as with a static placement: never worse than static.

Everything is a pure, jittable function of a NamedTuple state, so the training
step can carry the state in its ``TrainState`` and checkpoint it. In a step that
plans step ``t`` (durations, stop, state ``k``) before any gradient moves:

    tau, s_state = timing.sample_step(straggler, key_t, s_state, assignment)
    tau = apply_placement(tau, ps.placement(a_state), assignment)   # logical workers
    stop = stop_time(protocol, tau); counts = timing.progress(tau, stop)
    a_state = ps.observe(a_state, counts, stop)                      # for step t + 1

Only the simulated durations move: each logical worker's chunks and gradients are
the same, so the estimate, and exact mode, do not change.

**Detector and unequal loads** (opt-in: ``AdaptivePS(protocol, detector=Detector(),
reassign=True)``). A :class:`jaxgc.detector.Detector` runs a per-worker CUSUM on the
log chunk times; a change point resets that worker's rate to the newest step (no
EWMA lag) and its flags are reported per step as ``slow_workers``. With ``reassign``
the PS also sizes loads to the speeds, :func:`jaxgc.assignments.by_speed` of the
*planning speeds* (1 for unflagged workers, the estimated factor for flagged ones;
PROTOCOL.md §17: every chunk keeps ``load`` holders), and runs those lists in the
coming step when, under the same speeds and on fresh draws, their ``E[t*]`` beats
the best placement's by ``margin`` and the detector's flags have proven persistent
(``DetectorState.precision ≥ persistence``). The i.i.d. argument above covers only
the placement: unequal loads sized by past slowness can lose when slowness does not
persist, which the persistence gate is there to prevent. This path runs in
:func:`simulate` (the lists are host-built with ``jax.pure_callback``); the SPMD step
keeps its assignment.
"""
from jaxgc.adaptive._ps import (
    AdaptivePS,
    AdaptiveState,
    apply_placement,
    busy_times,
    order_completion_time,
    spread_positions,
    update_rates,
)
from jaxgc.adaptive._simulate import (
    completion_time_of,
    simulate,
    simulate_assignment,
    speed_assignment,
)

__all__ = ["AdaptiveState", "AdaptivePS", "update_rates", "apply_placement", "spread_positions",
           "simulate", "speed_assignment", "completion_time_of", "simulate_assignment",
           "order_completion_time", "busy_times"]

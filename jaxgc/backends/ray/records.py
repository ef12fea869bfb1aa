"""What one step of the PS saw: reports per worker and slot, the message rounds, and a replay.

:class:`Seen` is the watch phase's view (arrivals ``[m, max_load]``, deaths,
erasures), :class:`Rounds` the message rounds' outcome; the step's record
(:attr:`jaxgc.backends.ray.RayStep.last_record`) keeps both, and
:func:`measured_durations` turns it into durations the simulator replays.
"""
from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["Rounds", "Seen", "measured_durations", "observed_durations", "step_metrics"]


def measured_durations(record) -> np.ndarray:
  """Durations ``[m, max_load]`` in simulated seconds, as the PS observed them in one step.

  From the arrival times of the chunk reports (``RayStep.last_record``), divided
  by ``time_scale``; chunks that did not arrive are ``inf``. Replay with
  ``jaxgc.timing.RecordedDurations(measured_durations(record))``: its completion
  time is when the PS saw the state become decodable.
  """
  f = np.asarray(record["finish_wall"], np.float64) / record["time_scale"]
  prev = np.concatenate([np.zeros_like(f[:, :1]), f[:, :-1]], axis=1)
  tau = f - prev
  return np.where(np.isfinite(tau), tau, np.inf)


def observed_durations(record, slot_mask) -> np.ndarray:
  """Durations ``[m, width]`` as the adaptive PS may use them (``AdaptivePS.observe``).

  Measured (:func:`measured_durations`) where a chunk's report arrived; the stop time,
  a finite stand-in, in a listed slot still running at the stop (the PS knows only that
  the worker was busy then); ``inf`` in an empty slot. ``slot_mask``: bool
  ``[m, max_load]``, the assignment's listed slots.
  """
  tau = measured_durations(record)
  listed = np.zeros(tau.shape, bool)
  listed[:, : slot_mask.shape[1]] = slot_mask
  stop = record["stop_wall"] / record["time_scale"]
  return np.where(listed, np.where(np.isfinite(tau), tau, stop), np.inf).astype(np.float32)


class Seen:
  """What the PS saw in the watch phase, per worker and list slot (``[m, max_load]``)."""

  def __init__(self, m: int, width: int, num_chunks: int):
    self.counts = np.zeros(m, np.int32)
    self.finish = np.full((m, width), np.nan)      # arrival at the PS, s since dispatch
    self.chunk_s = np.full((m, width), np.nan)     # worker-measured chunk time (compute + sleep)
    self.compute_s = np.full((m, width), np.nan)   # of which real compute
    self.worker_t = np.full((m, width), np.nan)    # finish as the worker saw it, s since its start
    self.losses = np.full(num_chunks, np.nan)
    self.dead, self.erased = np.zeros(m, bool), np.zeros(m, bool)
    self.stop_wall = 0.0
    self.observed = self.counts


@dataclasses.dataclass
class Rounds:
  """The message rounds' outcome: final ``counts [m]``, messages, coefficients, sizes, timings."""
  counts: np.ndarray
  nbytes: np.ndarray           # [m] bytes of each worker's message as sent (0: none)
  transfer_s: np.ndarray       # [m] its actor's send to the PS's receipt (nan: none)
  msgs: np.ndarray
  dec: np.ndarray | None = None
  condition: float = 1.0
  senders: np.ndarray | None = None
  failed_again: bool = False
  solve_s: float = 0.0
  round_s: float = 0.0


def step_metrics(outcome: dict, seen: Seen, rounds: Rounds, num_chunks: int) -> dict:
  """A step's metrics: the decode's ``outcome`` (:func:`jaxgc.backends.core.step_outcome`)
  as Python scalars, and what the PS saw and spent (loss, deaths, phases, messages)."""
  known = np.isfinite(seen.losses)
  # The loss of the chunks whose reports came, scaled to all num_chunks.
  loss = (float(np.sum(seen.losses[known]) * num_chunks / known.sum()) if known.any()
          else np.nan)
  sent = rounds.nbytes > 0
  metrics = {k: np.asarray(v).item() for k, v in outcome.items()}
  metrics.update({
      "loss": loss, "dead_workers": int(seen.dead.sum()),
      "stop_wall": seen.stop_wall, "solve_s": rounds.solve_s, "round_s": rounds.round_s,
      "compute_s": float(np.nansum(seen.compute_s)),
      "message_bytes": int(rounds.nbytes.max(initial=0)),
      "message_transfer_s": float(np.median(rounds.transfer_s[sent])) if sent.any() else 0.0,
      "message_transfer_max_s": float(rounds.transfer_s[sent].max(initial=0.0)),
      "counts": np.asarray(rounds.counts),      # the state decoded at, per worker
  })
  return metrics

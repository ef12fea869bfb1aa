"""The planner: which protocol, load and ``ℓ`` to deploy on a cluster (PROTOCOL.md §11).

For each candidate ``(protocol, load, ℓ)`` on a cyclic assignment of ``m`` workers it
draws ``trials`` steps of chunk durations ``τ [trials, m, load]`` from the straggler
model, runs the one stop rule (:func:`jaxgc.protocols.stop_time`, the vectorised
completion time) and the protocol's own solve at the state it stops in (its senders),
and prices the messages with the network model (:func:`jaxgc.network.step_comm_time`):

``step time = stop + comm``, ``E[step time]`` and its 95th percentile over the draws.

Two stages, so a map over model sizes and bandwidths costs one simulation:
:func:`simulate` (the stop times and sender counts, independent of ``d`` and the network)
and :func:`rank` (prices them for one ``d`` and network). :func:`plan` does both.

Backup workers drop ``num_backup`` workers' chunks every step (an inexact gradient); they
are ranked on time alone, as a deployment would compare them. Uncoded and backup workers
run at load 1 and ``ℓ = 1`` whatever the grid says.

On the command line, ``python -m jaxgc.planner`` (:func:`main`)::

    python -m jaxgc.planner --num_workers 20 --num_params 1e9 --bandwidth 1.25e9 --latency 1e-4
    python -m jaxgc.planner ... --topology ring --straggler pareto alpha=1.5 --json
    python -m jaxgc.planner ... --dtypes float32,bfloat16   # the wire precision too (§15)

prints the table (:func:`format_table`), best first, or its rows as JSON. ``--bandwidth``
is in bytes per second (100 Gbit/s = 1.25e10), ``--latency`` in seconds, the unit of the
straggler model's chunk durations. A bad value is one line naming its flag, exit code 2.
"""
from __future__ import annotations

from jaxgc.planner._cli import format_table, main, parse_args
from jaxgc.planner._rank import (
  DEFAULT_ELLS,
  DEFAULT_LOADS,
  DEFAULT_PROTOCOLS,
  Candidate,
  Simulated,
  candidates,
  check_message_dtypes,
  check_num_params,
  plan,
  rank,
  simulate,
)

__all__ = [
    "Candidate", "Simulated", "DEFAULT_PROTOCOLS", "DEFAULT_LOADS", "DEFAULT_ELLS",
    "candidates", "simulate", "rank", "plan", "check_num_params", "check_message_dtypes",
    # the command line
    "main", "parse_args", "format_table",
]

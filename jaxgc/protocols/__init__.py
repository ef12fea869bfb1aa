"""Gradient-coding protocols: coefficients from the state, encode, decode, stop rule.

Internals of the sharded step (``split_blocks``, ``weighted_sum``,
``decode_blocks``, ...) live in :mod:`jaxgc.protocols.base`.
"""
from jaxgc.protocols.backup_workers import BackupWorkers
from jaxgc.protocols.base import (
  MODES,
  Coefficients,
  Protocol,
  decode,
  encode,
  estimate,
  expected_mse,
  stop_time,
)
from jaxgc.protocols.graph_code import GraphCode
from jaxgc.protocols.original import Original
from jaxgc.protocols.partial_straggler import PartialStraggler
from jaxgc.protocols.uncoded import IgnoreStragglers, Uncoded

__all__ = [
    "Protocol",
    "Coefficients",
    "PartialStraggler",
    "Original",
    "Uncoded",
    "IgnoreStragglers",
    "GraphCode",
    "BackupWorkers",
    "PROTOCOLS",
    "get_protocol",
    "MODES",
    "stop_time",
    "estimate",
    "encode",
    "decode",
    "expected_mse",
]

PROTOCOLS: dict[str, type[Protocol]] = {
    "partial_straggler": PartialStraggler,
    "original": Original,
    "uncoded": Uncoded,
    "ignore_stragglers": IgnoreStragglers,
    "graph_code": GraphCode,
    "backup_workers": BackupWorkers,
}


def get_protocol(name: str, assignment, ell: int = 1, **options) -> Protocol:
  """Builds the protocol registered as ``name`` in :data:`PROTOCOLS`.

  Every protocol takes ``(assignment, ell, **options)``; an unknown option is a
  ``ValueError`` that lists the valid ones.
  """
  if name not in PROTOCOLS:
    raise ValueError(f"unknown protocol {name!r}; choose one of {sorted(PROTOCOLS)}.")
  cls = PROTOCOLS[name]
  unknown = sorted(set(options) - set(cls.option_names()))
  if unknown:
    raise ValueError(f"unknown option(s) {unknown} for protocol {name!r}; valid options: "
                     f"{cls.option_names()}.")
  return cls(assignment, ell, **options)

"""Gradient-coding protocols: coefficients from the state, encode, decode, stop rule.

Internals of the sharded step (``split_blocks``, ``weighted_sum``,
``decode_blocks``, ...) live in :mod:`jaxgc.protocols.base`.
"""
from typing import Any

from jaxgc.assignments import Assignment
from jaxgc.errors import ParamError
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
from jaxgc.protocols.dynamic_ell import EllChoice, choose_ell
from jaxgc.protocols.graph_code import GraphCode
from jaxgc.protocols.original import Original
from jaxgc.protocols.partial_straggler import DynamicEll, PartialStraggler
from jaxgc.protocols.uncoded import IgnoreStragglers, Uncoded
from jaxgc.registry import Registry

__all__ = [
    "Protocol",
    "Coefficients",
    "PartialStraggler",
    "DynamicEll",
    "EllChoice",
    "choose_ell",
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

PROTOCOLS: Registry[Protocol] = Registry("protocol", positional=2)
"""Name -> protocol class; each is built as ``cls(assignment, ell, **options)``."""

for _cls in (PartialStraggler, Original, Uncoded, IgnoreStragglers, GraphCode, BackupWorkers):
  # Their constructors pass ``**options`` up to ``Protocol``, so declare the real ones.
  PROTOCOLS.register(_cls.name, options=_cls.option_names())(_cls)
del _cls


def get_protocol(name: str, assignment: Assignment, ell: int | tuple[int, ...] = 1,
                 **options: Any) -> Protocol:
  """Builds the protocol registered as ``name`` in :data:`PROTOCOLS`.

  Every protocol takes ``(assignment, ell, **options)``.

  Raises:
    jaxgc.errors.ParamError: (a ``ValueError``) an unknown name (``param="name"``) or
      option (``param`` is the option); the message lists the valid ones.
  """
  unknown = PROTOCOLS.unknown(name, options)
  if unknown:
    raise ParamError(f"unknown option(s) {unknown} for protocol {name!r}; valid options: "
                     f"{sorted(PROTOCOLS.options(name))}.", unknown[0])
  return PROTOCOLS.build(name, assignment, ell, **options)

"""Moved to jaxgc.backends.spmd.step; this name keeps working."""
from jaxgc.backends.spmd.step import (
  MODES,
  CodedStep,
  PlainStep,
  Plan,
  Solve,
  TrainState,
  decode_sharded,
  make_coded_step,
  make_plain_step,
  pvary,
)

__all__ = [
    "TrainState", "Plan", "Solve", "CodedStep", "make_coded_step", "PlainStep",
    "make_plain_step", "decode_sharded", "pvary", "MODES",
]

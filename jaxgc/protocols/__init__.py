"""Gradient-coding protocols: coefficients from the state, encode, decode."""
from jaxgc.protocols.base import (Protocol, decode, decode_blocks, encode, expected_mse,
                                  min_norm_decoder, num_blocks, split_blocks, weighted_sum)
from jaxgc.protocols.backup_workers import BackupWorkers
from jaxgc.protocols.original import Original
from jaxgc.protocols.partial_straggler import PartialStraggler
from jaxgc.protocols.uncoded import IgnoreStragglers, Uncoded

PROTOCOLS = {
    "partial_straggler": PartialStraggler,
    "original": Original,
    "uncoded": Uncoded,
    "ignore_stragglers": IgnoreStragglers,
    "backup_workers": BackupWorkers,
}


def get_protocol(name: str, assignment, ell: int = 1, **kwargs) -> Protocol:
  """Builds a protocol from its config name (``ell`` is ignored by the uncoded ones)."""
  if name not in PROTOCOLS:
    raise ValueError(f"unknown protocol {name!r}; choose one of {sorted(PROTOCOLS)}.")
  cls = PROTOCOLS[name]
  if cls in (Uncoded, IgnoreStragglers):
    return cls(assignment, **kwargs)
  return cls(assignment, ell, **kwargs)

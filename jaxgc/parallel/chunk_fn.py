"""Moved to jaxgc.backends.spmd.chunk_fn; this name keeps working."""
from jaxgc.backends.spmd.chunk_fn import (
  CONTRACT,
  ChunkLoss,
  chunk_keys,
  takes_rng,
)

__all__ = ["chunk_keys", "ChunkLoss", "takes_rng", "CONTRACT"]

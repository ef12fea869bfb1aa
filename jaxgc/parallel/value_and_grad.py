"""Moved to jaxgc.backends.spmd.value_and_grad; this name keeps working."""
from jaxgc.backends.spmd.value_and_grad import (
  chunk_keys,
  coded_value_and_grad,
)

__all__ = ["coded_value_and_grad", "chunk_keys"]

"""jaxgc: coded gradient computation in JAX.

Implements the partial-straggler gradient-coding protocol (Ramamoorthy, Meng,
Girimaji, NeurIPS 2024) with its baselines, straggler timing models, chunk
ordering, and a ``shard_map`` training step.
"""
from jaxgc import assignments
from jaxgc.assignments import Assignment

__version__ = "0.1.0"

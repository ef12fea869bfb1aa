"""jaxgc: coded gradient computation in JAX.

Implements the partial-straggler gradient-coding protocol (Ramamoorthy, Meng,
Girimaji, NeurIPS 2024) with its baselines, straggler timing models, chunk
ordering, and a ``shard_map`` training step. Device plumbing (meshes, simulated
CPU devices) lives in :mod:`jaxgc.parallel`.
"""
from jaxgc import (
                             adaptive,
                             assignments,
                             data,
                             models,
                             network,
                             ordering,
                             parallel,
                             planner,
                             protocols,
                             spectral,
                             timing,
)
from jaxgc.assignments import Assignment

# Device plumbing: kept at the top level for existing scripts, documented under jaxgc.parallel.
from jaxgc.backends.spmd import (  # noqa: F401
                             CodedStep,
                             PlainStep,
                             TrainState,
                             chunk_keys,
                             coded_value_and_grad,
                             make_coded_step,
                             make_mesh,
                             make_plain_step,
                             set_cpu_device_count,
)
from jaxgc.planner import plan
from jaxgc.protocols import (
                             BackupWorkers,
                             Coefficients,
                             GraphCode,
                             IgnoreStragglers,
                             Original,
                             PartialStraggler,
                             Protocol,
                             Uncoded,
                             decode,
                             encode,
                             estimate,
                             expected_mse,
                             get_protocol,
                             stop_time,
)

__version__ = "0.1.0"

__all__ = [
    # modules
    "adaptive",
    "assignments",
    "data",
    "models",
    "network",
    "ordering",
    "parallel",
    "planner",
    "protocols",
    "spectral",
    "timing",
    # assignments
    "Assignment",
    # protocols
    "Protocol",
    "Coefficients",
    "PartialStraggler",
    "Original",
    "Uncoded",
    "IgnoreStragglers",
    "GraphCode",
    "BackupWorkers",
    "get_protocol",
    "stop_time",
    "estimate",
    "encode",
    "decode",
    "expected_mse",
    # training steps
    "CodedStep",
    "PlainStep",
    "TrainState",
    "make_coded_step",
    "make_plain_step",
    # planning a deployment (jaxgc.planner; `python -m jaxgc.plan` on the command line)
    "plan",
    # your own loop
    "coded_value_and_grad",
    "chunk_keys",
]

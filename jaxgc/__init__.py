"""jaxgc: coded gradient computation in JAX.

Implements the partial-straggler gradient-coding protocol (Ramamoorthy, Meng,
Girimaji, NeurIPS 2024) with its baselines, straggler timing models, chunk
ordering, and a ``shard_map`` training step. Device plumbing (meshes, simulated
CPU devices) and the step live in :mod:`jaxgc.parallel`, the planner in :mod:`jaxgc.planner`
(``python -m jaxgc.planner``).

The names below (``jaxgc.PartialStraggler``, ``jaxgc.make_coded_step``, ``jaxgc.plan``, ...)
are shortcuts: the same objects as in their home modules, where they are documented.
"""
from jaxgc import (
                             adaptive,
                             assignments,
                             data,
                             detector,
                             models,
                             network,
                             ordering,
                             parallel,
                             planner,
                             precision,
                             protocols,
                             spectral,
                             timing,
)
from jaxgc.assignments import Assignment

# The step and your own loop: shortcuts to jaxgc.parallel's names, documented there.
from jaxgc.parallel import (  # noqa: F401
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
    "detector",
    "models",
    "network",
    "ordering",
    "parallel",
    "planner",
    "precision",
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
    # planning a deployment (jaxgc.planner; `python -m jaxgc.planner` on the command line)
    "plan",
    # your own loop
    "coded_value_and_grad",
    "chunk_keys",
]

"""jaxgc: coded gradient computation in JAX.

Implements the partial-straggler gradient-coding protocol (Ramamoorthy, Meng,
Girimaji, NeurIPS 2024) with its baselines, straggler timing models, chunk
ordering, and a ``shard_map`` training step.
"""
from jaxgc import assignments
from jaxgc import data
from jaxgc import models
from jaxgc import ordering
from jaxgc import parallel
from jaxgc import protocols
from jaxgc import timing
from jaxgc.assignments import Assignment
from jaxgc.parallel import (CodedStep, PlainStep, TrainState, make_coded_step, make_mesh,
                            make_plain_step, set_cpu_device_count)
from jaxgc.protocols import (IgnoreStragglers, Original, PartialStraggler, Uncoded, decode,
                             encode, expected_mse, get_protocol)

__version__ = "0.1.0"

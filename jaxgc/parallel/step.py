"""Moved to jaxgc.backends.spmd.step; this name keeps working.

(``TrainState`` now lives in :mod:`jaxgc.backends.base`, ``Plan`` and ``Solve`` in
:mod:`jaxgc.backends.spmd.plan`, ``pvary`` and ``decode_sharded`` in
:mod:`jaxgc.backends.spmd.collectives`, ``PlainStep`` in :mod:`jaxgc.backends.spmd.plain`.)
"""
from jaxgc.backends.base import TrainState
from jaxgc.backends.spmd.collectives import decode_sharded, pvary
from jaxgc.backends.spmd.plain import PlainStep, make_plain_step
from jaxgc.backends.spmd.plan import Plan, Solve
from jaxgc.backends.spmd.step import MODES, CodedStep, make_coded_step

__all__ = [
    "TrainState", "Plan", "Solve", "CodedStep", "make_coded_step", "PlainStep",
    "make_plain_step", "decode_sharded", "pvary", "MODES",
]

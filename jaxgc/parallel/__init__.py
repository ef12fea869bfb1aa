"""Data-parallel coded training: devices, meshes and the ``shard_map`` step."""
from jaxgc.parallel.devices import (AXIS, backend_started, make_mesh, set_cpu_device_count,
                                    use_gloo, workers_per_device)
from jaxgc.parallel.step import (MODES, CodedStep, PlainStep, TrainState, decode_sharded,
                                 make_coded_step, make_plain_step, pvary, shard_map)

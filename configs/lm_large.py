"""A language model larger than one (simulated) device, trained on groups of 4 devices.

Each simulated CPU device gets a 16 MiB budget (``memory_budget_gb``). The model's
parameters and Adam's two moments alone (about 20 MiB) exceed it, so with one
device per worker (``--config.mesh.model=1``) the run is refused with the
estimate. With ``mesh.model=4`` (the default here) the 8 devices form a 2 × 4
``workers × model`` mesh: each worker's parameters, optimizer state and
messages are sharded over its group of 4 (PROTOCOL.md §13), a device holds about
a quarter of them, and training is exact as on one device.

  python train.py --config=configs/lm_large.py --workdir=/tmp/lm_large
  python train.py --config=configs/lm_large.py --workdir=/tmp/x --config.mesh.model=1   # refused
"""
from configs import lm as lm_lib


def get_config():
  config = lm_lib.get_config()
  config.model.transformer_lm.d_model = 256     # 1.7M parameters: 6.5 MiB, 20 MiB with Adam
  config.model.transformer_lm.num_heads = 4
  config.model.transformer_lm.num_layers = 2
  config.data.pystdlib.seq_len = 32
  config.batch_size = 16                        # sequences per step: 2 per chunk
  config.mesh.model = 4                         # 2 groups of 4 devices, 4 workers each
  config.memory_budget_gb = 16 / 1024           # 16 MiB per simulated device
  config.num_steps = 30
  config.eval_every = 10
  return config

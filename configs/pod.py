"""The language model on a GPU/TPU pod: one worker per accelerator.

Run the same command on every host, with that host's process id:

  python train.py --config=configs/pod.py --workdir=gs://... \
      --config.coordinator_address=host0:1234 --config.num_processes=4 \
      --config.process_id=$RANK --config.num_devices=32

``--config.assignment.num_workers`` follows ``--config.num_devices`` and the batch
grows with it (16 sequences per device). A model too large for one device: make each
worker a group of k devices holding it sharded (``--config.mesh.model=k``, PROTOCOL.md
§13, docs/guides/pods.md); there is then one worker per group. On Cloud TPU / SLURM,
jax.distributed.initialize() finds the cluster by itself; leave
coordinator_address unset and set num_processes > 1.
"""
from configs import lm as lm_lib


def get_config():
  config = lm_lib.get_config()
  config.platform = ""                          # JAX's default backend (GPU/TPU)
  config.num_devices = 8
  config.mesh.model = 1                         # devices per worker (a group, sharded model)
  # One worker per group of mesh.model devices.
  config.assignment.num_workers = config.get_ref("num_devices") // config.mesh.get_ref("model")
  config.batch_size = config.get_ref("num_devices") * 16
  config.assignment.load = 3
  config.protocol.ell = 2
  config.data.pystdlib.max_bytes = 1 << 40      # more than there is: the whole stdlib
  config.data.pystdlib.seq_len = 512
  config.model.transformer_lm.d_model = 512
  config.model.transformer_lm.num_heads = 8
  config.model.transformer_lm.num_layers = 8
  config.optimizer.learning_rate = 1e-3
  config.num_steps = 5000
  config.eval_every = 250
  config.checkpoint_every = 500
  return config

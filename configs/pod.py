"""The language model on a GPU/TPU pod: one worker per accelerator.

Run the same command on every host, with that host's process id:

  python train.py --config=configs/pod.py --workdir=gs://... \
      --config.coordinator_address=host0:1234 --config.num_processes=4 \
      --config.process_id=$RANK --config.num_devices=32

``num_workers`` follows ``num_devices`` and the batch grows with it (16
sequences per worker). On Cloud TPU / SLURM, jax.distributed.initialize() finds
the cluster by itself; leave coordinator_address unset and set num_processes > 1.
"""
from configs import lm as lm_lib


def get_config():
  config = lm_lib.get_config()
  config.platform = ""             # JAX's default backend (GPU/TPU)
  config.num_devices = 8
  config.num_workers = config.get_ref("num_devices")     # one worker per device
  config.batch_size = config.get_ref("num_devices") * 16
  config.load = 3
  config.ell = 2
  config.corpus_bytes = None       # the whole standard library (~30 MB)
  config.seq_len = 512
  config.d_model = 512
  config.num_heads = 8
  config.num_layers = 8
  config.learning_rate = 1e-3
  config.num_steps = 5000
  config.eval_every = 250
  config.checkpoint_every = 500
  return config

"""A larger model on a GPU/TPU pod: one worker per accelerator.

Run the same command on every host, with that host's process id:

  python train.py --config=configs/pod.py --workdir=gs://... \
      --config.coordinator_address=host0:1234 --config.num_processes=4 \
      --config.process_id=$RANK --config.num_devices=32 --config.assignment.num_workers=32

On Cloud TPU / SLURM, jax.distributed.initialize() finds the cluster by itself;
leave coordinator_address unset and set num_processes > 1.
"""
from configs import default as default_lib


def get_config():
  config = default_lib.get_config()
  config.platform = ""             # JAX's default backend (GPU/TPU)
  config.num_devices = 8
  config.assignment.num_workers = 8  # one worker per device
  config.assignment.load = 3
  config.protocol.ell = 2
  config.model.name = "mlp"
  config.model.mlp.hidden = (2048, 2048, 2048)
  config.data.name = "synthetic_logistic"
  config.data.synthetic_logistic.num_examples = 200_000
  config.data.synthetic_logistic.dim = 512
  config.batch_size = 8 * 1024
  config.optimizer.learning_rate = 1e-3
  config.num_steps = 2000
  config.eval_every = 100
  config.checkpoint_every = 500
  config.target_accuracy = 0.8
  return config

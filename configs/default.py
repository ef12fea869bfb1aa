"""Default: digits on 8 simulated CPU devices, 20 workers, partial-straggler coding.

  python train.py --config=configs/default.py --workdir=/tmp/gc \
      --config.protocol=original --config.num_steps=300
"""
import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Data: sklearn's digits ships with the package, nothing downloads.
  config.dataset = "digits"
  config.test_fraction = 0.2
  config.split_seed = 0
  config.synthetic = ml_collections.ConfigDict(
      dict(num_examples=4000, dim=32, noise=0.1, data_seed=0))

  # Model and optimizer.
  config.model = "mlp"            # mlp | linear | cnn
  config.hidden = (64, 64)
  config.optimizer = "adam"       # adam | sgd | momentum
  config.learning_rate = 3e-3
  config.momentum = 0.9
  config.batch_size = 320         # examples per step, split into num_workers chunks
  config.num_steps = 300

  # Gradient coding: N = m chunks per step, cyclic assignment with load δ.
  config.num_workers = 20
  config.assignment = "cyclic"    # cyclic | fractional_repetition | random_regular
  config.load = 4
  config.ell = 2
  config.protocol = "partial_straggler"  # partial_straggler | original | uncoded | ignore_stragglers
  config.mode = "exact"           # exact | deadline
  config.deadline = config_dict.placeholder(float)  # simulated seconds, deadline mode
  config.decoding_matrix = "auto"  # partial_straggler: auto | ones | gaussian | orthogonal
  config.num_candidates = config_dict.placeholder(int)  # partial_straggler: random A's to pick from
  config.construction = "auto"     # original: auto | frc | tandon | polynomial
  config.rescale = True            # ignore_stragglers: scale by N / #chunks received
  config.report_condition = True   # worst cond(A[:, S_i]) in the metrics

  # Straggler model (per-chunk durations) and faults.
  config.straggler = ml_collections.ConfigDict(dict(
      name="slowdown",             # shifted_exponential | pareto | slowdown
      shift=1.0, rate=1.0,         # shifted exponential (also the slowdown base)
      fraction=0.2, factor=5.0,    # slowdown: this share of workers is factor× slower
      scale=1.0, alpha=2.0))       # pareto
  config.failure_prob = 0.0        # a worker fails for the whole step
  config.message_loss_prob = 0.0   # a sent message is lost
  config.nan_message_prob = 0.0    # a sent message arrives corrupted (NaN)

  # Devices: num_devices in the mesh (all processes together).
  config.platform = "cpu"          # cpu, or "" for JAX's default backend (GPU/TPU)
  config.num_devices = 8
  config.num_cpu_devices = config_dict.placeholder(int)  # per process; default num_devices // num_processes
  # Multi-host: set all three on every process to join one cluster.
  config.coordinator_address = config_dict.placeholder(str)  # "host:port"
  config.num_processes = 1
  config.process_id = 0
  config.distributed_timeout = 120  # seconds to wait for the other processes

  # Loop.
  config.eval_every = 10
  config.checkpoint_every = 50     # 0 disables checkpoints
  config.max_checkpoints = 2
  config.target_accuracy = 0.95    # reported (and marked on the comparison plot)
  return config

"""A byte-level transformer language model on the Python standard library's source.

Next-byte prediction on the running Python's own stdlib ``.py`` files (nothing
downloads); a tiny decoder-only transformer that visibly learns within a few
dozen steps on CPU. The chunk losses add up to the batch's mean token loss, so
exact-mode coded training follows uncoded training step by step.

  python train.py --config=configs/lm.py --workdir=/tmp/lm --config.num_steps=40

The model's ``seq_len`` follows ``--config.data.pystdlib.seq_len``.
"""
from configs import default as default_lib


def get_config():
  config = default_lib.get_config()
  config.data.name = "pystdlib"
  config.data.test_fraction = 0.05              # the corpus' tail: the validation split
  config.data.pystdlib.seq_len = 64             # bytes per sequence; chunks hold whole sequences
  config.data.pystdlib.max_bytes = 1_000_000    # the first ~1 MB of the stdlib's .py files
  config.model.name = "transformer_lm"
  config.model.transformer_lm.d_model = 64
  config.model.transformer_lm.num_heads = 4
  config.model.transformer_lm.num_layers = 2
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 3e-3
  config.assignment.num_workers = 8             # one worker per simulated device
  config.assignment.load = 3
  config.protocol.ell = 2
  config.batch_size = 64                        # sequences per step: 8 per chunk
  config.num_steps = 60
  config.eval_every = 20
  config.target_accuracy = 0.4                  # next-byte accuracy
  return config

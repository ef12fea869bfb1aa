"""Default: digits on 8 simulated CPU devices, 20 workers, partial-straggler coding.

  python train.py --config=configs/default.py --workdir=/tmp/gc \
      --config.protocol.name=original --config.num_steps=300

Every field, its meaning and its default live in
:func:`jaxgc.experiment.default_config`; a config file changes what it needs.
Blocks go straight to the library: ``config.protocol`` to
``jaxgc.protocols.get_protocol(name, assignment, ell, **config.protocol.<name>)``,
``config.straggler`` to ``jaxgc.timing.get_model(name, failure_prob,
**config.straggler.<name>)``, and so on for ``data``, ``model``, ``optimizer``,
``assignment``, ``step`` and ``ray``.
"""
from jaxgc.experiment import default_config


def get_config():
  return default_config()

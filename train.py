"""Trains a model with coded gradients on simulated stragglers.

  python train.py --config=configs/default.py --workdir=/tmp/gc \
      --config.protocol.name=partial_straggler --config.step.mode=exact --config.num_steps=300
  python train.py --workdir=/tmp/cmp --compare=partial_straggler,original,uncoded

The work is done by :mod:`jaxgc.experiment` (``train_and_evaluate(config, workdir)``);
this file only parses flags. ``--config.<field>=value`` overrides any config field
(shortcuts such as ``--config.ell`` set the common fields). Rerunning the same command
resumes the run in ``--workdir``; ``--restart`` starts it over.

SIGTERM (preemption) or Ctrl-C stop after the current step, save it, and exit with
status 143 (SIGTERM) or 130 (SIGINT), 128 + the signal's number as the shell reports a
death by that signal; rerunning the same command resumes bit for bit. More SIGTERMs wait
for that save; a second Ctrl-C exits at once, saying that the stop step was not saved.
"""
import os
import sys

from absl import app, flags, logging

from jaxgc import experiment

FLAGS = flags.FLAGS
flags.DEFINE_string("config", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                           "configs", "default.py"),
                    "Config file (a Python file with get_config()).")
flags.DEFINE_string("workdir", "workdir", "Directory for metrics, checkpoints and plots.")
flags.DEFINE_list("compare", None, "Train each of these protocols and plot test accuracy "
                  "against simulated time, e.g. partial_straggler,original,uncoded.")
flags.DEFINE_bool("restart", False, "Discard the run in --workdir and start over.")
_OVERRIDES = []


def parse_flags(argv):
  """absl parses all but ``--config.<field>``, which the config applies itself."""
  rest, overrides = experiment.split_config_flags(argv)
  _OVERRIDES.extend(overrides)
  try:
    return FLAGS(rest)
  except flags.Error as e:
    sys.exit(f"train.py: error: {e}")


def _quiet_closed_loops(hook=sys.unraisablehook):
  """After a failed save (a full disk), orbax's pending callbacks find their event loop
  closed and each prints a traceback; the error itself is raised and reported once."""
  def quiet(info):
    if not (isinstance(info.exc_value, RuntimeError)
            and str(info.exc_value) == "Event loop is closed"):
      hook(info)
  sys.unraisablehook = quiet


def main(argv):
  if len(argv) > 1:
    sys.exit(f"train.py: error: unexpected arguments {argv[1:]}; flags look like --name=value.")
  if not FLAGS["verbosity"].present:
    # orbax logs every save at INFO, and logs at ERROR what it then raises (a full disk:
    # dozens of lines before the one that names the workdir).
    logging.set_verbosity(logging.FATAL)
    _quiet_closed_loops()
  try:
    config = experiment.apply_overrides(experiment.load_config(FLAGS.config), _OVERRIDES)
    experiment.run(config, FLAGS.workdir, FLAGS.compare, FLAGS.restart)
  except experiment.ConfigError as e:        # a bad setting: one line, no traceback
    sys.exit(f"train.py: error: {e}")
  except experiment.Preempted as e:          # SIGTERM/SIGINT: the step is saved
    print(e, file=sys.stderr, flush=True)
    sys.exit(e.exit_code)
  except KeyboardInterrupt:                  # Ctrl-C before training started: nothing to save
    print("interrupted before training started; nothing was saved", file=sys.stderr)
    sys.exit(experiment.EXIT_CODES["SIGINT"])


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)

"""How far apart are runs on different device counts? (the resilience guide's claim)

The default config (an MLP on digits, 20 workers, partial_straggler) trained on
8 and on 4 simulated CPU devices, from the same seed, for 1, 10 and 40 steps,
with Adam (the default) and with SGD. The plans, the batches and the straggler
draws do not depend on the layout, so the simulated time is identical; the
decode's all-reduce adds the messages in another order, so each step's gradient
differs by float32 round-off. The table shows what that becomes:

* ``max |dparam|``: the largest parameter difference, 8 against 4 devices;
* ``max |dloss|``: the largest difference of the logged training losses;
* ``coords > 1e-4``: how many parameters differ by more than 1e-4;
* ``8 vs 8``: the same 8-device run twice (determinism: must be 0).

  python benchmarks/layout_roundoff.py            # about 2 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _config(*flags):
  from configs import default as default_config  # pylint: disable=import-outside-toplevel
  from jaxgc import experiment  # pylint: disable=import-outside-toplevel
  return experiment.apply_overrides(default_config.get_config(), [
      f.split("=", 1) for f in ("num_cpu_devices=8", "checkpoint_every=0", "eval_every=1000",
                                *flags)])


def _run(built, flags, steps, root):
  """(params, step losses) after ``steps`` steps."""
  from jaxgc import experiment  # pylint: disable=import-outside-toplevel
  wd = tempfile.mkdtemp(dir=root)
  experiment.train(built._replace(config=_config(*flags, f"num_steps={steps}")), wd)
  with np.load(os.path.join(wd, "final_params.npz")) as z:
    params = np.concatenate([z[k].ravel() for k in sorted(z.files)])
  losses = np.array([r["loss"] for r in experiment.read_metrics(wd) if "loss" in r])
  return params, losses


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", default="1,10,40", help="comma-separated step counts")
  args = parser.parse_args()
  steps = [int(s) for s in args.steps.split(",")]
  from jaxgc import experiment  # pylint: disable=import-outside-toplevel
  root = tempfile.mkdtemp()
  print(f"{'optimizer':<10}{'steps':>6}{'max |dparam|':>15}{'max |dloss|':>14}"
        f"{'coords > 1e-4':>15}{'8 vs 8':>9}")
  for opt in ("adam", "sgd"):
    flags = (f"optimizer.name={opt}",) + (("learning_rate=0.1",) if opt == "sgd" else ())
    built = {d: experiment.build(_config(*flags, f"num_devices={d}", "num_steps=1"))
             for d in (8, 4)}
    for n in steps:
      (p8, l8), (p4, l4) = (_run(built[d], flags, n, root) for d in (8, 4))
      again, _ = _run(built[8], flags, n, root)
      diff = np.abs(p8 - p4)
      print(f"{opt:<10}{n:>6}{diff.max():>15.2e}{np.abs(l8 - l4).max():>14.2e}"
            f"{int((diff > 1e-4).sum()):>9} of {p8.size:<5}{np.abs(p8 - again).max():>4.0f}",
            flush=True)


if __name__ == "__main__":
  main()

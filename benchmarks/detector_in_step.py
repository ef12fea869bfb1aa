"""The straggler detector inside the SPMD training step: how soon and how well
``metrics["slow_workers"]`` names fixed slow workers.

20 workers, cyclic load 4, ``ℓ = 2``, workers 0–3 five times slower at every step
(``timing.FixedSlowdown``), the digits MLP on 8 simulated CPU devices, the step built
with ``AdaptivePS(protocol, detector=Detector())`` (``--config.adaptive=True
--config.detector=True`` in ``train.py``). Prints the flags per step, then the first step
at which they name exactly the slow workers, and after it the missed flags (slow
workers not flagged), the false ones (fast workers flagged) and the steps with the
exact set. ``tests/test_adaptive_step.py`` asserts bounds on the same figures.

    python benchmarks/detector_in_step.py [--steps 24] [--factor 5]
"""
from __future__ import annotations

import argparse

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxgc  # noqa: E402
from jaxgc import adaptive, assignments, data, detector, models, parallel, timing  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=24)
  ap.add_argument("--factor", type=float, default=5.0)
  ap.add_argument("--seed", type=int, default=7)
  args = ap.parse_args()
  m, load, ell, batch, slow = 20, 4, 2, 160, (0, 1, 2, 3)
  straggler = timing.FixedSlowdown(timing.ShiftedExponential(1.0, 1.0), slow, args.factor)
  ds = data.load("digits")
  net = models.get_model("mlp", ds.num_classes, (16,))
  params = models.init_params(net, jax.random.key(0), ds.x_train[:1])
  proto = jaxgc.PartialStraggler(assignments.cyclic(m, load), ell)
  step = parallel.make_coded_step(proto, straggler, models.chunk_loss_fn(net.apply, batch),
                                  optax.sgd(0.5), parallel.make_mesh(8),
                                  adaptive=adaptive.AdaptivePS(proto, detector=detector.Detector()))
  update, key = jax.jit(step.update), jax.random.key(args.seed)
  train = (jax.numpy.asarray(ds.x_train), jax.numpy.asarray(ds.y_train))
  state, flags = step.init_state(params, key), []
  for s in range(args.steps):
    state, met = update(state, data.step_chunks(train, jax.random.key(1), s, batch, m), key)
    flags.append(np.asarray(met["slow_workers"]))
    print(f"step {s:2d}: slow_workers {''.join('1' if f else '.' for f in flags[-1])}")
  flags = np.array(flags)
  truth = np.isin(np.arange(m), slow)
  exact = (flags == truth).all(axis=1)
  if not exact.any():
    print("the flags never name exactly the slow workers")
    return
  first = int(np.argmax(exact))
  later = flags[first + 1:]
  print(f"first step naming exactly workers {list(slow)}: {first}; after it "
        f"{int((~later[:, truth]).sum())} missed of {later[:, truth].size} slow-worker flags, "
        f"{int(later[:, ~truth].sum())} false of {later[:, ~truth].size}, exact set at "
        f"{int(exact[first + 1:].sum())} of {len(later)} steps")


if __name__ == "__main__":
  main()

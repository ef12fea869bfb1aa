"""The planner's choice against training-time simulation on a grid (issue #22).

For every candidate ``(protocol, load, ℓ)`` of a grid, the real sharded training step
(``CodedStep.update`` with the network model, 8 simulated CPU devices, an MLP on digits)
runs ``--steps`` steps; its mean ``step_sim_time`` (stop + comm) is the training-time
cost. The planner (``jaxgc.plan``, the vectorised simulator) ranks the same grid from
``--trials`` draws of its own. Printed: both means per candidate, the planner's choice, the
best candidate in training, and the ratio

    train_time(planner's choice) / min over the grid of train_time   (target: <= 1.05).

    python benchmarks/planner_accuracy.py                      # PS ingress, 200 steps each
    python benchmarks/planner_accuracy.py --topology ring --steps 100
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxgc import parallel  # noqa: E402

parallel.set_cpu_device_count(8)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import jaxgc  # noqa: E402
from jaxgc import assignments, data, models, network, planner, protocols, timing  # noqa: E402

M, BATCH = 8, 64


def train_times(c, net, straggler, setup, steps: int, seed: int) -> np.ndarray:
  """``step_sim_time`` of ``steps`` real training steps of candidate ``c``."""
  mesh, params, loss_fn, train = setup
  opts = {} if c.num_backup is None else {"num_backup": c.num_backup}
  proto = protocols.get_protocol(c.protocol, assignments.cyclic(M, c.load), c.ell, **opts)
  step = parallel.make_coded_step(proto, straggler, loss_fn, optax.sgd(0.05), mesh, network=net)
  update, key = step.jit(), jax.random.key(seed)
  state = step.init_state(params, key)
  out = []
  for s in range(steps):
    chunks = data.step_chunks(train, jax.random.key(seed + 1), s, BATCH, M)
    state, metrics = update(state, chunks, key)
    out.append(float(metrics["step_sim_time"]))
  return np.asarray(out)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--trials", type=int, default=4000)
  p.add_argument("--topology", default="ps", choices=("ps", "ring"))
  p.add_argument("--bandwidth", type=float, default=1e4, help="bytes/s (small model: slow link)")
  p.add_argument("--latency", type=float, default=0.01)
  p.add_argument("--loads", default="2,4")
  p.add_argument("--ells", default="1,2,3")
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args()

  ds = data.load("digits")
  model = models.get_model("mlp", ds.num_classes, (32,))
  params = models.init_params(model, jax.random.key(0), ds.x_train[:1])
  d = int(ravel_pytree(params)[0].size)
  setup = (parallel.make_mesh(8), params, models.chunk_loss_fn(model.apply, BATCH),
           (jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)))
  net = network.get_network(a.topology, a.bandwidth, a.latency)
  straggler = timing.get_model("slowdown")
  loads, ells = [int(x) for x in a.loads.split(",")], [int(x) for x in a.ells.split(",")]
  grid = planner.candidates(M, planner.DEFAULT_PROTOCOLS, loads, ells, backups=(1, 2))

  t0 = time.perf_counter()
  rows = jaxgc.plan(M, d, straggler, net, protocols=planner.DEFAULT_PROTOCOLS,
                    loads=loads, ells=ells, backups=(1, 2),
                    trials=a.trials, seed=a.seed)
  t_plan = time.perf_counter() - t0
  key = lambda r: (r["protocol"], r["load"], r["ell"], r["num_backup"])
  planned = {key(r): r["mean_step_time"] for r in rows}
  print(f"m = {M}, d = {d}, network {net}, straggler slowdown; planner: {len(rows)} candidates, "
        f"{a.trials} draws each, {t_plan:.1f} s")

  trained = {}
  t0 = time.perf_counter()
  for c in grid:
    k = (c.protocol, c.load, c.ell, c.num_backup)
    t = train_times(c, net, straggler, setup, a.steps, a.seed)
    trained[k] = (t.mean(), t.std(ddof=1) / np.sqrt(len(t)))
  t_train = time.perf_counter() - t0
  print(f"training-time simulation: {a.steps} steps per candidate, {t_train:.0f} s (machine "
        "shared, timings indicative)\n")
  print(f"{'candidate':<34}{'planner E[step]':>16}{'training mean ± se':>22}")
  for k in sorted(trained, key=lambda k: trained[k][0]):
    name = f"{k[0]} load={k[1]} ell={k[2]}" + (f" b={k[3]}" if k[3] else "")
    print(f"{name:<34}{planned[k]:>16.3f}{trained[k][0]:>14.3f} ± {trained[k][1]:.3f}")
  # Backup workers drop chunks (an inexact gradient): also the choice among exact protocols.
  for label, keep in (("all candidates", lambda k: True),
                      ("exact protocols only", lambda k: k[0] != "backup_workers")):
    choice = next(key(r) for r in rows if keep(key(r)))
    best = min((k for k in trained if keep(k)), key=lambda k: trained[k][0])
    ratio = trained[choice][0] / trained[best][0]
    print(f"\n{label}: planner's choice {choice[:3]}, best in training {best[:3]}")
    print(f"  ratio train_time(choice) / train_time(best) = {ratio:.4f} "
          f"({'within' if ratio <= 1.05 else 'NOT within'} 5%)")

if __name__ == "__main__":
  main()

"""Coding overhead of the coded step against an uncoded step with the same work.

Both steps compute the same chunk gradients on every device (same chunks, same
``vmap``); the uncoded one sums them and ``psum``s, the coded one also samples
durations, solves for the encoding coefficients, encodes, decodes. Both apply
the same optax update. Prints median step times and their median ratio.

  python benchmarks/step_overhead.py                 # default config, 8 CPU devices
  python benchmarks/step_overhead.py --hidden=512,512,512 --protocol=original
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/default.py")
  ap.add_argument("--protocol", default=None, help="override config.protocol")
  ap.add_argument("--models", default="64,64;512,512,512",
                  help="';'-separated hidden sizes of the MLPs to time (default: the "
                       "default model, then a larger one)")
  ap.add_argument("--iters", type=int, default=200)
  ap.add_argument("--warmup", type=int, default=20)
  args = ap.parse_args()

  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("cfg", args.config)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config()
  if args.protocol:
    config.protocol = args.protocol

  import train  # pylint: disable=import-outside-toplevel
  train.validate_config(config)
  mesh = train.setup_devices(config)

  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  from jaxgc import models, parallel  # pylint: disable=import-outside-toplevel

  ds = train.load_dataset(config)
  rep = NamedSharding(mesh, P())
  train_data = (train._global(ds.x_train, rep), train._global(ds.y_train, rep))  # pylint: disable=protected-access
  print(f"devices: {len(mesh.devices.flat)} x {jax.devices()[0].platform}, "
        f"workers m={config.num_workers}, load={config.load}, ell={config.ell}, "
        f"protocol={config.protocol}, mode={config.mode}, batch={config.batch_size}")

  for hidden in args.models.split(";"):
    hidden = tuple(int(h) for h in hidden.split(","))
    model = models.get_model(config.model, ds.num_classes, hidden)
    tx = train.make_optimizer(config)
    loss_fn = models.chunk_loss_fn(model.apply, config.batch_size)
    protocol = train.make_protocol(config, train.make_assignment(config))
    coded = parallel.make_coded_step(
        protocol, train.make_straggler_model(config), loss_fn, tx, mesh, mode=config.mode,
        deadline=config.deadline, report_condition=config.report_condition)
    plain = parallel.make_plain_step(protocol.assignment, loss_fn, tx, mesh,
                                     compute_slots=coded.layout.slots)
    init = jax.jit(lambda: parallel.TrainState.create(
        models.init_params(model, jax.random.key(0), ds.x_train[:1]), tx), out_shardings=rep)
    fns = {name: jax.jit(functools.partial(train.train_step, coded_step=s,
                                           batch_size=config.batch_size, seed=0))
           for name, s in (("coded", coded), ("uncoded", plain))}
    states = {name: init() for name in fns}
    times = {name: [] for name in fns}
    for it in range(args.warmup + args.iters):
      for name, fn in fns.items():       # interleaved, so drifts hit both alike
        t = time.perf_counter()
        states[name], metrics = fn(states[name], train_data)
        jax.block_until_ready((states[name], metrics))
        if it >= args.warmup:
          times[name].append(time.perf_counter() - t)
    nparams = sum(x.size for x in jax.tree.leaves(states["coded"].params))
    c, u = (np.asarray(times[k]) for k in ("coded", "uncoded"))
    ratio = np.median(c / u)
    print(f"MLP hidden={hidden} ({nparams} params): coded {1e3 * np.median(c):.2f} ms, "
          f"uncoded {1e3 * np.median(u):.2f} ms, median ratio {ratio:.3f} "
          f"(overhead {100 * (ratio - 1):+.1f}%)")


if __name__ == "__main__":
  main()

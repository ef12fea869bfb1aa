"""Coding overhead of the coded step against an uncoded step with the same work.

Both steps compute the same chunk gradients on every device (same chunks, same
``vmap``); the uncoded one sums them and ``psum``s, the coded one also samples
durations, solves for the encoding coefficients, encodes, decodes. Both apply
the same optax update. Prints median step times and their median ratio.

  python benchmarks/step_overhead.py                 # default config, 8 CPU devices
  python benchmarks/step_overhead.py --models=512,512,512 --protocol=original
  python benchmarks/step_overhead.py --config=configs/lm.py    # the transformer LM

The coded step plans each step (durations, state, coefficient solve) on one
device during the previous step and ships the plan in that step's all-reduce,
so both steps synchronise the devices once; what remains is the solve, the
encode, the erasure checks and the metrics.
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
  ap.add_argument("--protocol", default=None, help="override config.protocol.name")
  ap.add_argument("--models", default=None,
                  help="';'-separated hidden sizes of the MLPs to time (default: the "
                       "config's model, then 512,512,512); for the LM, ';'-separated "
                       "d_model,num_layers (default: the config's, then 128,4)")
  ap.add_argument("--max_seconds", type=float, default=60.0,
                  help="stop timing a model after this long (big models on CPU)")
  ap.add_argument("--num_devices", type=int, default=None, help="override config.num_devices")
  ap.add_argument("--ell", type=int, default=None, help="override config.protocol.ell")
  ap.add_argument("--num_candidates", type=int, default=None,
                  help="override config.protocol.partial_straggler.num_candidates")
  ap.add_argument("--iters", type=int, default=200)
  ap.add_argument("--warmup", type=int, default=20)
  args = ap.parse_args()

  from jaxgc import experiment  # pylint: disable=import-outside-toplevel
  config = experiment.load_config(args.config)
  if args.num_devices is not None:
    config.num_devices = args.num_devices
  if args.ell is not None:
    config.protocol.ell = args.ell
  if args.num_candidates is not None:
    config.protocol.partial_straggler.num_candidates = args.num_candidates
  if args.protocol:
    config.protocol.name = args.protocol
  experiment.check_config(config)
  mesh = experiment.setup_devices(config)

  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P

  from jaxgc import models, parallel  # pylint: disable=import-outside-toplevel

  ds = experiment.make_dataset(config)
  rep = NamedSharding(mesh, P())
  train_data = (experiment.global_array(ds.x_train, rep), experiment.global_array(ds.y_train, rep))
  print(f"devices: {len(mesh.devices.flat)} x {jax.devices()[0].platform}, "
        f"workers m={config.assignment.num_workers}, load={config.assignment.load}, "
        f"ell={config.protocol.ell}, protocol={config.protocol.name}, mode={config.step.mode}, "
        f"batch={config.batch_size}, num_candidates="
        f"{config.protocol.partial_straggler.num_candidates or 'default'}")

  lm = config.model.name == "transformer_lm"
  if lm:
    opts = config.model.transformer_lm
    models_arg = args.models or f"{opts.d_model},{opts.num_layers};128,4"
  else:
    models_arg = args.models or (",".join(map(str, config.model.mlp.hidden)) + ";512,512,512")
  for hidden in models_arg.split(";"):
    hidden = tuple(int(h) for h in hidden.split(","))
    if lm:
      config.model.transformer_lm.d_model, config.model.transformer_lm.num_layers = hidden
      what = (f"LM d_model={hidden[0]} layers={hidden[1]} "
              f"seq_len={experiment.sequence_length(ds)}")
    else:
      config.model.mlp.hidden = hidden
      what = f"MLP hidden={hidden}"
    model = experiment.make_model(config, ds.num_classes, experiment.sequence_length(ds))
    tx = experiment.make_optimizer(config)
    loss_fn = models.chunk_loss_fn(model.apply, config.batch_size)
    protocol = experiment.make_protocol(config, experiment.make_assignment(config))
    coded = parallel.make_coded_step(
        protocol, experiment.make_straggler_model(config), loss_fn, tx, mesh,
        mode=config.step.mode, deadline=config.step.deadline,
        report_condition=config.step.report_condition)
    plain = parallel.make_plain_step(protocol.assignment, loss_fn, tx, mesh,
                                     compute_slots=coded.layout.slots)
    params = jax.jit(lambda model=model: models.init_params(model, jax.random.key(0),
                                                            ds.x_train[:1]),
                     out_shardings=rep)()
    step_key = experiment.keys(0)[2]
    states = {"coded": jax.jit(coded.init_state, out_shardings=rep)(params, step_key),
              "uncoded": jax.jit(lambda p, tx=tx: parallel.TrainState.create(p, tx),
                                 out_shardings=rep)(params)}
    fns = {name: jax.jit(functools.partial(experiment.train_step, coded_step=s,
                                           batch_size=config.batch_size, seed=0))
           for name, s in (("coded", coded), ("uncoded", plain))}
    # The epoch's example order is drawn once per epoch, outside the timed step (as in
    # jaxgc.experiment).
    perm_for = experiment.epoch_permutations(0, len(ds.x_train), config.batch_size, rep)
    times = {name: [] for name in fns}
    start = time.perf_counter()
    for it in range(args.warmup + args.iters):
      if it > args.warmup + 5 and time.perf_counter() - start > args.max_seconds:
        break
      perm = jax.block_until_ready(perm_for(it))
      for name, fn in fns.items():       # interleaved, so drifts hit both alike
        t = time.perf_counter()
        states[name], metrics = fn(states[name], train_data, perm)
        jax.block_until_ready((states[name], metrics))
        if it >= args.warmup:
          times[name].append(time.perf_counter() - t)
    nparams = sum(x.size for x in jax.tree.leaves(states["coded"].params))
    c, u = (np.asarray(times[k]) for k in ("coded", "uncoded"))
    ratio = np.median(c / u)
    print(f"{what} ({nparams} params, {len(c)} steps): "
          f"coded {1e3 * np.median(c):.2f} ms, "
          f"uncoded {1e3 * np.median(u):.2f} ms, median ratio {ratio:.3f} "
          f"(overhead {100 * (ratio - 1):+.1f}%)")
    # The PS plan of one step (durations, state, coefficient solve) on its own: on
    # real devices it overlaps the gradient work; simulated devices share the
    # host's cores, so there it adds to the step.
    plan = jax.jit(coded.plan_step)
    jax.block_until_ready(plan(step_key, 1))
    pt = []
    for it in range(100):
      t = time.perf_counter()
      jax.block_until_ready(plan(step_key, it))
      pt.append(time.perf_counter() - t)
    print(f"  PS plan alone (one device): {1e3 * np.median(pt):.2f} ms "
          f"= {100 * np.median(pt) / np.median(u):.1f}% of the uncoded step")


if __name__ == "__main__":
  main()

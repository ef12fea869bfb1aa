"""Message precision (PROTOCOL.md §15): bytes, decode error and final accuracy per wire dtype.

For each ``message_dtype`` (float32, bfloat16, int8 with one float32 scale per 256 numbers):

* **bytes per message** of the default config (digits MLP, ``m = 20``, cyclic load 4,
  partial straggler ``ℓ = 2``): :func:`jaxgc.network.message_bytes`;
* **decode error**: ``draws`` states drawn as a step draws them (the default straggler
  model, stopped at the exact completion time), chunk gradients ``g_i = μ + ξ_i``
  (``μ, ξ_i ~ N(0, I_d)``: a shared mean and per-chunk noise, as in a batch), encoded in
  float32, cast to the wire dtype and back, decoded in float32
  (:mod:`jaxgc.precision`); the relative error ``‖ĝ − g‖/‖g‖`` against the exact
  sum ``g = Σ_i g_i`` (float64), median over draws, next to the median of
  ``condition_number × ε`` (:func:`jaxgc.precision.epsilon`) and the largest ratio
  of the two;
* **final test accuracy** of the default config (``train.py``'s defaults, 300 steps) trained
  with ``step.message_dtype`` set (:func:`jaxgc.experiment.train_and_evaluate`, temporary
  workdirs, no checkpoints), and its difference to float32.

    python benchmarks/precision.py                          # ~3 training runs, minutes
    python benchmarks/precision.py --draws 64 --json precision.json
    python benchmarks/precision.py --no-train               # the error table only
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from jaxgc import data, models, network, precision, protocols, timing
from jaxgc.experiment import default_config, train_and_evaluate
from jaxgc.experiment.build import (
  make_assignment,
  make_dataset,
  make_protocol,
  make_straggler_model,
)

DTYPES = precision.MESSAGE_DTYPES


def train_accuracy(message_dtype: str, num_steps: int) -> float:
  """Final test accuracy of the default config with ``step.message_dtype``."""
  cfg = default_config()
  cfg.num_steps = num_steps
  cfg.checkpoint_every = 0
  cfg.tensorboard = False
  cfg.step.message_dtype = message_dtype
  with tempfile.TemporaryDirectory() as workdir:
    train_and_evaluate(cfg, workdir)
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
      return float(json.load(f)["test_accuracy"])


def model_chunk_grads(cfg, seed: int):
  """``grads(step) -> [N, d]``: the default model's chunk gradients at its initial
  parameters on step ``step``'s batch (the default data, batch size and chunks)."""
  ds = make_dataset(cfg)
  model = models.mlp(ds.num_classes, tuple(cfg.model.mlp.hidden))
  params = models.init_params(model, jax.random.key(seed), ds.x_train[:1])
  loss_fn = models.chunk_loss_fn(model.apply, cfg.batch_size)
  train = (jnp.asarray(ds.x_train), jnp.asarray(ds.y_train))
  n = cfg.assignment.num_workers
  flat = lambda p, c: jax.flatten_util.ravel_pytree(jax.grad(loss_fn)(p, c))[0]
  return jax.jit(lambda step: jax.vmap(lambda c: flat(params, c))(
      data.step_chunks(train, jax.random.key(seed), step, cfg.batch_size, n)))


def decode_errors(cfg, draws: int, seed: int) -> tuple[dict, dict, np.ndarray, int]:
  """Relative decode errors ``[draws]`` per dtype, of the model's chunk gradients and of
  synthetic ones, the condition numbers ``[draws]``, and ``d``."""
  proto = make_protocol(cfg, make_assignment(cfg))
  a = proto.assignment
  straggler = make_straggler_model(cfg)
  grads_of = model_chunk_grads(cfg, seed)
  d = int(grads_of(0).shape[-1])

  @jax.jit
  def one(key, grads):
    k1, k2, k3 = jax.random.split(key, 3)
    tau = straggler.sample(k1, a)
    c = proto.solve(timing.progress(tau, protocols.stop_time(proto, tau, "exact")))
    synthetic = jax.random.normal(k2, (d,)) + jax.random.normal(k3, (a.num_chunks, d))
    errs = []
    for g_i in (grads, synthetic):
      exact = jnp.sum(g_i, 0)      # float32, rounding ~1e-7: far below what is measured
      z = protocols.encode(g_i[jnp.maximum(jnp.asarray(a.order), 0)], c.enc)
      for name in DTYPES:
        g = protocols.decode(precision.round_trip(z, name), c.dec, d)
        errs.append(jnp.linalg.norm(g - exact) / jnp.linalg.norm(exact))
    return jnp.stack(errs), c.condition

  keys = jax.random.split(jax.random.key(seed), draws)
  out = [jax.device_get(one(k, grads_of(s))) for s, k in enumerate(keys)]
  errs = np.asarray([e for e, _ in out], np.float64)
  cond = np.asarray([c for _, c in out], np.float64)
  k = len(DTYPES)
  return ({name: errs[:, i] for i, name in enumerate(DTYPES)},
          {name: errs[:, k + i] for i, name in enumerate(DTYPES)}, cond, d)


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--draws", type=int, default=200, help="states and gradients per dtype")
  p.add_argument("--num_steps", type=int, default=300, help="training steps per dtype")
  p.add_argument("--no-train", dest="train", action="store_false",
                 help="skip the training runs (no accuracy column)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", metavar="PATH", help='write {"rows": [{"message_dtype", ...}]}')
  args = p.parse_args()

  cfg = default_config()
  # Training first: it sets up the default config's 8 CPU devices before JAX starts.
  acc = {name: train_accuracy(name, args.num_steps) for name in DTYPES} if args.train else {}
  errs, synthetic, cond, d = decode_errors(cfg, args.draws, args.seed)
  proto = make_protocol(cfg, make_assignment(cfg))
  rows = []
  for name in DTYPES:
    bound = cond * precision.epsilon(name)
    row = {
        "message_dtype": name, "bytes_per_message": network.message_bytes(proto, d,
                                                                          message_dtype=name),
        "eps": precision.epsilon(name),
        "median_rel_error": float(np.median(errs[name])),
        "median_cond_times_eps": float(np.median(bound)),
        "max_error_over_cond_eps": float(np.max(errs[name] / bound)),
        "median_rel_error_synthetic": float(np.median(synthetic[name])),
        "max_error_over_cond_eps_synthetic": float(np.max(synthetic[name] / bound)),
    }
    if acc:
      row["final_accuracy"] = acc[name]
      row["accuracy_minus_float32"] = acc[name] - acc["float32"]
    rows.append(row)

  print(f"default config: d = {d}, m = {proto.assignment.num_workers}, load "
        f"{proto.assignment.max_load}, ell = {proto.ell}; {args.draws} draws; median "
        f"condition number {np.median(cond):.3g} (max {np.max(cond):.3g})")
  print("rel err: median over draws of |g_hat - g|/|g|, the model's chunk gradients "
        "(synthetic mu + xi_i in the last two columns)")
  head = (f"{'dtype':<10}{'bytes/msg':>10}{'eps':>10}{'rel err':>11}{'cond x eps':>12}"
          f"{'max err/(cond eps)':>20}{'synth err':>11}{'synth max':>11}"
          + (f"{'accuracy':>10}{'vs f32':>9}" if acc else ""))
  print(head)
  print("-" * len(head))
  for r in rows:
    line = (f"{r['message_dtype']:<10}{r['bytes_per_message']:>10}{r['eps']:>10.3g}"
            f"{r['median_rel_error']:>11.3g}{r['median_cond_times_eps']:>12.3g}"
            f"{r['max_error_over_cond_eps']:>20.3g}{r['median_rel_error_synthetic']:>11.3g}"
            f"{r['max_error_over_cond_eps_synthetic']:>11.3g}")
    if acc:
      line += f"{r['final_accuracy']:>10.4f}{r['accuracy_minus_float32']:>+9.4f}"
    print(line)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"d": d, "draws": args.draws, "num_steps": args.num_steps,
                 "median_condition_number": float(np.median(cond)), "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()

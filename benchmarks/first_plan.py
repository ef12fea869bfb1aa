"""Start-up of a coded step in a fresh process: ``init_state`` against the eager first plan.

``CodedStep.init_state`` plans step 0 as one compiled program. Planning it op by op
(``step.plan_step(key, params=params)`` called eagerly, as ``init_state`` did before)
compiles each of the draw's, the stop rule's and the state's small operations on its
own. Each variant runs in its own fresh Python process (JAX imported, nothing
compiled), ``--repeats`` times; the script prints the medians and their ratio.

    python benchmarks/first_plan.py                # the digits MLP, 20 workers, cyclic load 4
    python benchmarks/first_plan.py --repeats 5 --fast_compile   # the tests' XLA flags
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time
import jax
from jaxgc import parallel
parallel.set_cpu_device_count(8)
import optax, jaxgc
from jaxgc import assignments, data, models, timing
ds = data.load("digits")
net = models.get_model("mlp", ds.num_classes, (64, 64))
params = models.init_params(net, jax.random.key(0), ds.x_train[:1])
proto = jaxgc.get_protocol("partial_straggler", assignments.cyclic(20, 4), 2)
step = parallel.make_coded_step(proto, timing.get_model("slowdown"),
                                models.chunk_loss_fn(net.apply, 320), optax.adam(3e-3),
                                parallel.make_mesh(8))
t0 = time.perf_counter()
if sys.argv[1] == "init_state":
  out = step.init_state(params, jax.random.key(1))
else:                       # the first plan op by op, then the same state
  plan, s, a = step.plan_step(jax.random.key(1), params=params)
  out = parallel.TrainState.create(params, step.tx, plan=plan, straggler_state=s,
                                   adaptive_state=a)
jax.block_until_ready(out)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def run(variant: str, env: dict) -> float:
  out = subprocess.run([sys.executable, "-c", CHILD, variant], env=env, check=True,
                       capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])["seconds"]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--fast_compile", action="store_true",
                  help="JAX_DISABLE_MOST_OPTIMIZATIONS=1, as tests/conftest.py sets it")
  args = ap.parse_args()
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
  if args.fast_compile:
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
  times = {v: [] for v in ("eager_plan", "init_state")}
  for i in range(args.repeats):
    for v in (times if i % 2 == 0 else reversed(list(times))):   # alternate the order
      times[v].append(run(v, env))
      print(f"repeat {i + 1}: {v:<11} {times[v][-1]:6.2f} s", flush=True)
  med = {v: sorted(t)[len(t) // 2] for v, t in times.items()}
  print(f"median over {args.repeats}: eager first plan {med['eager_plan']:.2f} s, init_state "
        f"{med['init_state']:.2f} s: {med['eager_plan'] / med['init_state']:.1f}x faster")


if __name__ == "__main__":
  main()

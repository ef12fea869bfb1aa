"""Every ```python block of the own-model guide and the README runs (issue #27.5).

One subprocess per file, with 8 simulated CPU devices set before JAX starts: the blocks
run in order in one namespace, as a reader pastes them, so one JAX start (and the
programs compiled by earlier blocks) serves the whole file. A block that fails is named
with its first line.
"""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run after a file's own blocks: the README's training step is defined, not called, there.
AFTER = {
    "README.md": """
import numpy as np
ds = jaxgc.data.load("digits")
x, y = ds.x_train[:batch_size], ds.y_train[:batch_size]
chunks = {"x": x.reshape(16, -1, 64), "y": y.reshape(16, -1)}
params, stats = jaxgc.models.init_variables(model, jax.random.key(0), x[:1])
stats = stats["batch_stats"]
opt_state = tx.init(params)
for step in range(2):
  params, stats, opt_state, loss, exact = train_step(params, stats, opt_state, chunks,
                                                     jax.random.key(step))
  assert bool(exact) and np.isfinite(float(loss)), (step, loss)
""",
}


def python_blocks(path: str) -> list[str]:
  """The ```python fenced blocks of a markdown file, in order."""
  with open(path) as f:
    return re.findall(r"^```python\n(.*?)^```\s*$", f.read(), re.S | re.M)


RUNNER = """
import json, sys
blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
for i, (name, source) in enumerate(blocks):
  try:
    exec(compile(source, name, "exec"), namespace)
  except BaseException:
    first = next((line for line in source.splitlines() if line.strip()), "")
    print(f"SNIPPET FAILED: {name}, starting {first!r}", file=sys.stderr)
    raise
print(f"{len(blocks)} snippets ran")
"""


@pytest.mark.parametrize("doc", ["docs/guides/own-model.md", "README.md"])
def test_every_python_snippet_runs(doc, tmp_path):
  blocks = [(f"{doc} python block {i + 1}", b)
            for i, b in enumerate(python_blocks(os.path.join(ROOT, doc)))]
  assert len(blocks) >= 2, doc
  name = os.path.basename(doc)
  if name in AFTER:
    blocks.append((f"{doc} check", AFTER[name]))
  (tmp_path / "blocks.json").write_text(json.dumps(blocks))
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT)
  run = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path / "blocks.json")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-4000:]
  assert f"{len(blocks)} snippets ran" in run.stdout

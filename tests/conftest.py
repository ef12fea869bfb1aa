"""Test setup: 8 CPU devices (before JAX starts its backend), one JAX compilation cache for
the whole run, the repo root on sys.path, and how xdist's processes share two cores."""
import os
import sys
import tempfile

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8".strip()

# train.py and configs/ live at the repo root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# One persistent compilation cache for the session: the train.py subprocesses of many
# tests compile the same programs, and the xdist workers (spawned after this runs,
# so they inherit it) share it. A fresh folder per run: timings stay honest.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxgc-tests-jax-cache-")
# Every program goes into it, not only those over JAX's default one-second compile: most of
# the suite's programs are small, and the same ones recur across files and processes.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# XLA compiles faster with its optimisation passes off (the suite: 1105 s -> 853 s on 2
# cores). The tests assert values, exactness and invariants, which hold either way (both
# programs of every bit-for-bit comparison are compiled alike); the README's first command
# and the benchmarks run with full optimisation. JAXGC_TEST_XLA_OPT=1 keeps them on.
if os.environ.get("JAXGC_TEST_XLA_OPT") != "1":
  os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# Ray lowers its workers' priority to nice 15 by default, below the CPU-bound test files
# (nice 10, see the end of this file); at 0 the actors come first, as the Ray files'
# wall-clock deadlines need.
os.environ.setdefault("RAY_worker_niceness", "0")

import pytest  # noqa: E402

# -- scheduling -----------------------------------------------------------------------------
# pyproject runs three xdist processes on two cores with --dist loadgroup: each file is one
# unit (module fixtures such as a built experiment are set up once), except the files below,
# which are one unit together. They spend most of their time waiting on Ray actors, sleeps
# and wall-clock deadlines, so the third process keeps both cores busy meanwhile, and only one
# Ray instance runs at a time.
RAY_FILES = ("test_ray.py", "test_ray_chaos.py", "test_ray_elastic.py", "test_ray_parity.py",
             "test_race.py")
# Longest first, so that no long file starts last (measured: the slowest files of a run).
LONG_FILES = ("test_notebooks.py", "test_step.py", "test_own_loop.py", "test_train.py",
              "test_pmap_models.py", "test_mesh2d.py", "test_guide_snippets.py",
              "test_resilience.py", "test_multihost.py", "test_runs.py", "test_lm.py",
              "test_run_safety.py", "test_protocols.py", "test_message_dtype.py")


def _unit(item) -> str:
  name = item.path.name
  return "ray" if name in RAY_FILES else name


@pytest.hookimpl(tryfirst=True)   # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
  order = {name: i for i, name in enumerate(("ray", *LONG_FILES))}
  for item in items:
    item.add_marker(pytest.mark.xdist_group(_unit(item)))
  items.sort(key=lambda it: order.get(_unit(it), len(order)))   # stable: files keep their order


_niced = False


def pytest_runtest_setup(item):
  # The CPU-bound files yield to the Ray unit: its actors, sleeps and deadlines are timed in
  # wall-clock seconds, and a starved actor would miss them. Only xdist workers lower their
  # priority (a nice value cannot be raised back); the Ray unit is scheduled first, on a
  # worker that has not lowered it.
  global _niced
  if not _niced and os.environ.get("PYTEST_XDIST_WORKER") and _unit(item) != "ray":
    os.nice(10)
    _niced = True

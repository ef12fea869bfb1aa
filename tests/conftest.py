"""Test setup: 8 CPU devices (before JAX starts its backend), one JAX compilation cache for
the whole run, and the repo root on sys.path."""
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
# tests compile the same programs, and the two xdist workers (spawned after this runs,
# so they inherit it) share it. A fresh folder per run: timings stay honest.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxgc-tests-jax-cache-")

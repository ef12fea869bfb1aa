"""The API reference (docs/api.md) covers every public module, and each ``__all__`` is real.

mkdocstrings renders each ``::: module`` from the names in its ``__all__``, so a module
missing from the page, or an ``__all__`` entry that does not exist, is a hole in the docs.
"""
import importlib
import pathlib
import re
import types

import pytest

import jaxgc

ROOT = pathlib.Path(__file__).resolve().parents[1]
API_PAGE = (ROOT / "docs" / "api.md").read_text()
DOCUMENTED = re.findall(r"^::: (jaxgc[\w.]*)\s*$", API_PAGE, flags=re.M)
# Public modules: those in jaxgc.__all__, plus the ones users import by path.
PUBLIC = sorted({f"jaxgc.{n}" for n in jaxgc.__all__
                 if isinstance(getattr(jaxgc, n), types.ModuleType)}
                | {"jaxgc", "jaxgc.experiment", "jaxgc.ray_backend", "jaxgc.ray_faults",
                   "jaxgc.registry", "jaxgc.errors", "jaxgc.faults",
                   "jaxgc.backends", "jaxgc.backends.ray"})


def test_the_api_page_documents_every_public_module():
  assert len(PUBLIC) >= 14
  missing = [m for m in PUBLIC if m not in DOCUMENTED]
  assert not missing, f"docs/api.md has no '::: module' entry for {missing}"


@pytest.mark.parametrize("name", PUBLIC)
def test_all_lists_only_real_names(name):
  if name in ("jaxgc.ray_backend", "jaxgc.ray_faults"):
    pytest.importorskip("ray")
  module = importlib.import_module(name)
  assert module.__all__, f"{name} has an empty __all__"
  absent = [n for n in module.__all__ if not hasattr(module, n)]
  assert not absent, f"{name}.__all__ lists {absent}, which do not exist"
  assert len(set(module.__all__)) == len(module.__all__), f"{name}.__all__ repeats a name"


def test_the_top_level_names_users_call_today():
  for n in ("PartialStraggler", "Original", "encode", "decode", "make_coded_step"):
    assert hasattr(jaxgc, n), n
  from jaxgc.timing import Failures, GilbertElliott, ShiftedExponential, Slowdown
  assert Slowdown(ShiftedExponential(1.0, 2.0), 0.2, 5.0).base == ShiftedExponential(1.0, 2.0)
  assert Failures(ShiftedExponential(), 0.1).p == 0.1 and GilbertElliott().stateful

"""The README's Public API table lists every name in each module's ``__all__``, and only real ones."""
import importlib
import pathlib
import re

import pytest

README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
ROWS = dict(re.findall(r"^\| `(jaxgc[\w.]*)`[^|]*\| (.*) \|$", README, flags=re.M))
MODULES = ["jaxgc", "jaxgc.protocols", "jaxgc.assignments", "jaxgc.ordering", "jaxgc.timing",
           "jaxgc.adaptive", "jaxgc.spectral", "jaxgc.parallel", "jaxgc.models", "jaxgc.data",
           "jaxgc.experiment", "jaxgc.ray_backend"]


@pytest.mark.parametrize("name", MODULES)
def test_readme_api_row_matches_all(name):
  if name == "jaxgc.ray_backend":
    pytest.importorskip("ray")
  module = importlib.import_module(name)
  assert name in ROWS, f"README's Public API table has no row for {name}"
  listed = set(re.findall(r"`(\w+)", ROWS[name]))
  missing = [n for n in module.__all__ if n not in listed]
  assert not missing, f"{name}.__all__ names missing from the README row: {missing}"
  for n in module.__all__:
    assert hasattr(module, n), f"{name}.__all__ lists {n}, which does not exist"

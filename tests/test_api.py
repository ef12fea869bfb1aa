"""The API reference (docs/api.md) covers every public module, and each ``__all__`` is real.

mkdocstrings renders each ``::: module`` from the names in its ``__all__``, so a module
missing from the page, or an ``__all__`` entry that does not exist, is a hole in the docs.
"""
import importlib
import pathlib
import re
import types
import warnings

import pytest

import jaxgc
from jaxgc import backends

ROOT = pathlib.Path(__file__).resolve().parents[1]
API_PAGE = (ROOT / "docs" / "api.md").read_text()
DOCUMENTED = re.findall(r"^::: (jaxgc[\w.]*)\s*$", API_PAGE, flags=re.M)
# Public modules: those in jaxgc.__all__, plus the ones users import by path.
PUBLIC = sorted({f"jaxgc.{n}" for n in jaxgc.__all__
                 if isinstance(getattr(jaxgc, n), types.ModuleType)}
                | {"jaxgc", "jaxgc.experiment", "jaxgc.registry", "jaxgc.errors", "jaxgc.faults",
                   "jaxgc.backends", "jaxgc.backends.ray"})
# Deprecated aliases (one release): each name warns and is jaxgc.backends.ray's.
DEPRECATED = ("jaxgc.ray_backend", "jaxgc.ray_faults")


def test_the_api_page_documents_every_public_module():
  assert len(PUBLIC) >= 14
  missing = [m for m in PUBLIC if m not in DOCUMENTED]
  assert not missing, f"docs/api.md has no '::: module' entry for {missing}"


def test_the_deprecated_aliases_are_not_documented():
  assert not set(DEPRECATED) & set(DOCUMENTED)


@pytest.mark.parametrize("name", PUBLIC + list(DEPRECATED))
def test_all_lists_only_real_names(name):
  module = importlib.import_module(name)
  assert module.__all__, f"{name} has an empty __all__"
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)   # the aliases' own test checks them
    absent = [n for n in module.__all__ if not hasattr(module, n)]
  assert not absent, f"{name}.__all__ lists {absent}, which do not exist"
  assert len(set(module.__all__)) == len(module.__all__), f"{name}.__all__ repeats a name"


def test_the_top_level_names_users_call_today():
  for n in ("PartialStraggler", "Original", "encode", "decode", "make_coded_step"):
    assert hasattr(jaxgc, n), n
  from jaxgc.timing import Failures, GilbertElliott, ShiftedExponential, Slowdown
  assert Slowdown(ShiftedExponential(1.0, 2.0), 0.2, 5.0).base == ShiftedExponential(1.0, 2.0)
  assert Failures(ShiftedExponential(), 0.1).p == 0.1 and GilbertElliott().stateful


@pytest.mark.parametrize("name", DEPRECATED)
def test_the_old_ray_paths_warn_and_are_the_backends_names(name):
  module = importlib.import_module(name)
  for attr in module.__all__:
    with pytest.warns(DeprecationWarning, match=rf"jaxgc\.backends\.ray\.{attr}\b"):
      value = getattr(module, attr)
    assert value is getattr(backends.ray, attr), attr
  with pytest.raises(AttributeError):
    module.not_a_name  # noqa: B018  pylint: disable=pointless-statement


def test_one_path_per_name():
  """Each name a facade lists is its implementation's object, and a module is one file."""
  from jaxgc import parallel, planner  # pylint: disable=import-outside-toplevel
  from jaxgc.backends import spmd  # pylint: disable=import-outside-toplevel
  assert parallel.TrainState is backends.TrainState is jaxgc.TrainState
  assert all(getattr(parallel, n) is getattr(spmd, n) for n in parallel.__all__)
  assert all(getattr(jaxgc, n) is getattr(parallel, n) for n in jaxgc.__all__
             if n in parallel.__all__)
  assert not hasattr(parallel, "__path__"), "jaxgc.parallel has submodules again"
  assert jaxgc.plan is planner.plan and callable(jaxgc.plan)
  with warnings.catch_warnings():
    warnings.simplefilter("error")      # the facades themselves warn about nothing
    for n in parallel.__all__ + planner.__all__:
      getattr(parallel if n in parallel.__all__ else planner, n)

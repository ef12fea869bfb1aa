"""A module whose names moved: each read warns (``DeprecationWarning``) and returns the
name from its new home (PEP 562 module ``__getattr__``)."""
from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


def moved(old: str, new: str, names: tuple[str, ...]
          ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
  """``(__getattr__, __dir__)`` for module ``old``, whose ``names`` now live in ``new``."""
  def getattr_(name: str) -> Any:
    if name not in names:
      raise AttributeError(f"module {old!r} has no attribute {name!r}")
    warnings.warn(f"{old} is deprecated and goes in the next release; use {new}.{name} "
                  f"(from {new} import {name}).", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(new), name)

  def dir_() -> list[str]:
    return sorted(names)
  return getattr_, dir_

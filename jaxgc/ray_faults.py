"""Deprecated: use :mod:`jaxgc.backends.ray` (the same names); this path goes next release.

Each name read here warns (``DeprecationWarning``) and is the one in
:mod:`jaxgc.backends.ray`: ``from jaxgc.backends.ray import KillLoop, ActorLiveness``.
"""
from __future__ import annotations

import warnings
from typing import Any

# Resolved on first use by __getattr__, each with a DeprecationWarning.
_MOVED = ("ActorLiveness", "KillLoop", "Restart", "actor_state", "ERROR_GRACE_S")
__all__ = list(_MOVED)


def __getattr__(name: str) -> Any:
  if name not in _MOVED:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  warnings.warn(f"jaxgc.ray_faults is deprecated and goes in the next release; use "
                f"jaxgc.backends.ray.{name} (from jaxgc.backends.ray import {name}).",
                DeprecationWarning, stacklevel=2)
  from jaxgc.backends import ray  # pylint: disable=import-outside-toplevel
  return getattr(ray, name)


def __dir__() -> list[str]:
  return sorted(_MOVED)

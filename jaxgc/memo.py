"""One memo for values that belong to an object: compiled functions, placements.

``per_object(owner, key, make)`` returns ``make()`` the first time it is asked for
``(owner, key)`` and the same value afterwards; the entries go when ``owner`` is
garbage-collected. A ``make`` whose value holds ``owner`` strongly keeps the entry
(and the owner) alive for the life of the process: hold a ``weakref.ref`` instead
where the owner is short-lived.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

__all__ = ["per_object"]

T = TypeVar("T")

_HELD: weakref.WeakKeyDictionary[Any, dict[Hashable, Any]] = weakref.WeakKeyDictionary()


def per_object(owner: Any, key: Hashable, make: Callable[[], T]) -> T:
  """``make()``, once per ``(owner, key)`` while ``owner`` lives (``owner``: hashable,
  weak-referenceable)."""
  held = _HELD.setdefault(owner, {})
  if key not in held:
    held[key] = make()
  return held[key]

"""What each step backend supports, declared with its registry entry.

A backend's constructor in :data:`jaxgc.backends.BACKENDS` carries a
:class:`Capabilities` (set by :func:`declare`), so a caller asks "does the chosen
backend support X" (:func:`of`, :func:`supporting`) instead of testing its name::

    @BACKENDS.register("spmd")
    @declare(Capabilities(adaptive=True, model_state=True))
    def spmd_step(protocol, straggler, loss_fn, tx, mesh=None, **options): ...
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

__all__ = ["Capabilities", "FEATURES", "declare", "of", "supporting"]

F = TypeVar("F", bound=Callable[..., Any])


class Capabilities(NamedTuple):
  """A backend's optional features (beyond the common step every backend runs).

  Attributes:
    adaptive: takes ``adaptive=`` (a :class:`jaxgc.adaptive.AdaptivePS` that
      re-places the chunk lists between steps).
    model_state: takes ``has_aux=True`` (a loss with model state: batch norm), with the
      per-chunk rule of :mod:`jaxgc.backends.chunk_rule`.
    model_axis: runs workers that are groups of devices (a ``workers × model`` mesh; on
      Ray, ``model=k`` devices of each actor).
    network_model: takes ``network=`` (a :mod:`jaxgc.network` model of message time).
    requires: a module the backend needs beyond jaxgc's own dependencies (``None``:
      nothing), imported to check before building.
    install: how to get ``requires`` (``"Ray: pip install 'jaxgc[ray]'"``).
  """
  adaptive: bool = False
  model_state: bool = False
  model_axis: bool = False
  network_model: bool = False
  requires: str | None = None
  install: str = ""


FEATURES: dict[str, str] = {
    "adaptive": "the adaptive PS",
    "model_state": "a model with state (batch norm)",
    "model_axis": "workers that are groups of devices",
    "network_model": "a network model",
}
"""Each boolean capability of :class:`Capabilities`, as a message names it."""


def declare(capabilities: Capabilities) -> Callable[[F], F]:
  """Decorator: attaches ``capabilities`` to a backend constructor; returns it unchanged."""
  def attach(fn: F) -> F:
    setattr(fn, "capabilities", capabilities)  # noqa: B010  (a function has no such slot)
    return fn
  return attach


def of(name: str) -> Capabilities:
  """The capabilities backend ``name`` declares (none declared: :class:`Capabilities` ()).

  Raises:
    jaxgc.errors.ParamError: an unknown name, listing the registered ones.
  """
  from jaxgc.backends import BACKENDS  # pylint: disable=import-outside-toplevel
  caps = getattr(BACKENDS.get(name), "capabilities", None)
  return caps if isinstance(caps, Capabilities) else Capabilities()


def supporting(feature: str) -> list[str]:
  """The registered backends that declare ``feature`` (a key of :data:`FEATURES`), sorted."""
  if feature not in FEATURES:
    raise ValueError(f"unknown backend feature {feature!r}; choose one of {list(FEATURES)}.")
  from jaxgc.backends import BACKENDS  # pylint: disable=import-outside-toplevel
  return [name for name in BACKENDS if getattr(of(name), feature)]

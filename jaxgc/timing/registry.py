"""Straggler models by name, as the command line and configs give them.

Each name maps to a constructor whose keyword parameters are the model's options
(``--config.straggler.<name>.<option>``); composite models register a small
builder that takes their base's ``shift``/``rate`` flat. Adding a model is one
class and one ``@STRAGGLER_MODELS.register(name)``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from jaxgc.errors import ParamError
from jaxgc.timing.base import STRAGGLER_MODELS
from jaxgc.timing.failures import Failures

__all__ = ["STRAGGLER_MODELS", "MODEL_PARAMS", "get_straggler_model", "get_model",
           "check_model"]

MODEL_PARAMS: Mapping[str, tuple[str, ...]] = STRAGGLER_MODELS.table()
"""Options each registered straggler model takes (``--config.straggler.<name>.<option>``);
a live view of :data:`STRAGGLER_MODELS`."""


def check_model(model: Any) -> Any:
  """Re-checks ``model``'s parameters and those of the models inside it; returns ``model``.

  Models check themselves when they are built, so this raises only for a model
  whose fields were changed afterwards. Raises :class:`~jaxgc.errors.ParamError`
  naming the parameter.
  """
  if dataclasses.is_dataclass(model) and not isinstance(model, type):
    post_init = getattr(model, "__post_init__", None)
    if post_init is not None:
      post_init()
  for inner in ("base", "noise"):
    sub = getattr(model, inner, None)
    if sub is not None:
      check_model(sub)
  return model


def get_straggler_model(name: str, failure_prob: float = 0.0, **params: Any) -> Any:
  """Builds a straggler model from its registered name; ``failure_prob > 0`` wraps it in
  :class:`~jaxgc.timing.Failures`.

  Options per name: :data:`MODEL_PARAMS`. ``slowdown`` and ``gilbert_elliott``
  take the shifted-exponential ``shift``/``rate`` of their base; ``trace`` takes
  ``trace`` (a name in :data:`~jaxgc.timing.TRACES` or a CSV path), ``mapping``,
  ``seed`` and ``noise`` (bool: per-chunk mean-one shifted-exponential noise from
  ``shift``/``rate``). An unknown name or option, or an out-of-range value, raises
  :class:`~jaxgc.errors.ParamError` naming the parameter and the fix.
  """
  model = STRAGGLER_MODELS.build(name, **params)
  if not 0.0 <= failure_prob <= 1.0:
    raise ParamError(f"failure_prob must be in [0, 1], got {failure_prob}; give the "
                     "probability that a worker fails for a whole step.", "failure_prob")
  return Failures(model, failure_prob) if failure_prob > 0 else model


get_model = get_straggler_model
"""Alias of :func:`get_straggler_model` (not :func:`jaxgc.models.get_model`, which builds
networks); prefer the longer name."""

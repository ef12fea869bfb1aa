"""Errors that carry what went wrong as data, so callers need not parse messages."""
from __future__ import annotations

__all__ = ["ParamError"]


class ParamError(ValueError):
  """A bad parameter value: a ``ValueError`` whose ``param`` names the parameter.

  ``str(e)`` is the message (the problem and the fix); ``e.param`` is the
  parameter's name as the caller spelled it (``"shift"``, ``"p_slow"``), so a front
  end can point at its own spelling of it (a command-line flag) without reading
  the message. ``e.suggestion`` is the valid value closest to a misspelt one (a
  registry's unknown name), which ``str(e)`` ends with as ``Did you mean 'x'?``;
  ``e.message`` is the message without it.
  """

  def __init__(self, message: str, param: str | None = None, suggestion: str | None = None):
    super().__init__(message if suggestion is None else f"{message} Did you mean "
                     f"{suggestion!r}?")
    self.message = message
    self.param = param
    self.suggestion = suggestion

  def __reduce__(self):
    # The default pickling replays only ``args``; keep ``param`` across processes (Ray).
    return (type(self), (self.message, self.param, self.suggestion))

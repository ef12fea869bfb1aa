"""One registry mechanism: names to constructors, options read from their signatures.

A :class:`Registry` maps a name (as typed on a command line) to a constructor, a
class or a function. The options a name takes are the constructor's keyword
parameters, so declaring a new choice is one decorator::

    STRAGGLER_MODELS = Registry("straggler model")

    @STRAGGLER_MODELS.register("pareto")
    class Pareto: ...

    STRAGGLER_MODELS.build("pareto", alpha=3.0)

:meth:`Registry.build` rejects an unknown name or option with a
:class:`~jaxgc.errors.ParamError` that lists the valid ones.
"""
from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar, overload

from jaxgc.errors import ParamError

__all__ = ["Registry", "signature_options"]

T = TypeVar("T")
D = TypeVar("D")
_MISSING: Any = object()
_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def signature_options(fn: Callable[..., Any], skip: int = 0) -> tuple[str, ...]:
  """Names of ``fn``'s keyword-capable parameters, after the first ``skip`` positional ones."""
  params = [p for p in inspect.signature(fn).parameters.values() if p.kind in _KEYWORD]
  return tuple(p.name for p in params[skip:])


class Registry(Generic[T]):
  """Names to constructors of one kind (``kind`` is used in error messages).

  ``positional``: how many leading parameters every constructor takes from the
  caller rather than as options (e.g. ``1`` for a protocol's ``assignment``); they
  are not listed by :meth:`options`.
  """

  def __init__(self, kind: str, positional: int = 0):
    self.kind = kind
    self.positional = positional
    self._entries: dict[str, Callable[..., T]] = {}
    self._declared: dict[str, tuple[str, ...]] = {}

  def register(self, name: str, *, options: Sequence[str] | None = None
               ) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator: registers a class or function under ``name`` and returns it unchanged.

    ``options`` declares the option names of a constructor that takes ``**options``
    (whose signature cannot list them); otherwise they are read from the signature.
    """
    def add(fn: Callable[..., T]) -> Callable[..., T]:
      if name in self._entries and self._entries[name] is not fn:
        raise ValueError(f"{self.kind} {name!r} is already registered "
                         f"({self._entries[name]!r}); choose another name.")
      self._entries[name] = fn
      if options is not None:
        self._declared[name] = tuple(options)
      return fn
    return add

  def __contains__(self, name: object) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(sorted(self._entries))

  def __len__(self) -> int:
    return len(self._entries)

  def __getitem__(self, name: str) -> Callable[..., T]:
    """``registry[name]``: the constructor, as a dict gives it (``KeyError`` if unknown)."""
    if name not in self._entries:
      raise KeyError(name)
    return self._entries[name]

  def __setitem__(self, name: str, fn: Callable[..., T]) -> None:
    """``registry[name] = fn`` registers or replaces ``fn``, as in a dict
    (:meth:`register` refuses to replace)."""
    self._declared.pop(name, None)
    self._entries[name] = fn

  def __delitem__(self, name: str) -> None:
    del self._entries[name]
    self._declared.pop(name, None)

  def names(self) -> list[str]:
    """The registered names, sorted."""
    return sorted(self._entries)

  @overload
  def get(self, name: str) -> Callable[..., T]: ...
  @overload
  def get(self, name: str, default: D) -> Callable[..., T] | D: ...

  def get(self, name: str, default: Any = _MISSING) -> Any:
    """The constructor registered as ``name``; an unknown name raises ``ParamError("name")``,
    or returns ``default`` if one is given (as a dict's ``get`` does)."""
    if name not in self._entries and default is not _MISSING:
      return default
    if name not in self._entries:
      near = difflib.get_close_matches(str(name), self.names(), n=1)
      raise ParamError(f"unknown {self.kind} {name!r}; choose one of {self.names()}.", "name",
                       near[0] if near else None)
    return self._entries[name]

  def options(self, name: str) -> tuple[str, ...]:
    """The options ``name`` takes: declared at registration, else its constructor's
    keyword parameters (after the ``positional`` leading ones)."""
    fn = self.get(name)
    if name in self._declared:
      return self._declared[name]
    return signature_options(fn, self.positional)

  def _open(self, name: str) -> bool:
    """Whether ``name``'s constructor takes ``**kwargs`` with no declared options: then
    it, not the registry, rejects unknown ones."""
    if name in self._declared:
      return False
    params = inspect.signature(self._entries[name]).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)

  def table(self) -> Mapping[str, tuple[str, ...]]:
    """A live read-only view ``{name: options}`` (includes later registrations)."""
    return _OptionTable(self)

  def build(self, name: str, /, *args: Any, **options: Any) -> T:
    """``constructor(*args, **options)`` for ``name``, after checking the option names.

    An unknown option raises :class:`~jaxgc.errors.ParamError` with ``param`` set to
    it and the valid options listed.
    """
    fn = self.get(name)
    unknown = self.unknown(name, options)
    if unknown:
      raise ParamError(f"{self.kind} {name!r} takes no parameter(s) {unknown}; it takes "
                       f"{list(self.options(name))}.", unknown[0])
    return fn(*args, **options)

  def unknown(self, name: str, options: Iterable[str]) -> list[str]:
    """The names in ``options`` that ``name`` does not take, sorted; ``[]`` when its
    constructor takes ``**kwargs`` and declares no options (it decides itself).
    An unknown ``name`` raises ``ParamError("name")``."""
    unknown = sorted(set(options) - set(self.options(name)))
    return [] if self._open(name) else unknown

  def __repr__(self) -> str:
    return f"Registry({self.kind!r}, {self.names()})"


class _OptionTable(Mapping[str, tuple[str, ...]]):
  def __init__(self, registry: Registry[Any]):
    self._registry = registry

  def __getitem__(self, name: str) -> tuple[str, ...]:
    if name not in self._registry:
      raise KeyError(name)
    return self._registry.options(name)

  def __iter__(self) -> Iterator[str]:
    return iter(self._registry)

  def __len__(self) -> int:
    return len(self._registry)

  def __repr__(self) -> str:
    return repr(dict(self))

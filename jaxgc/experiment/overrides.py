"""``--config.a.b=value`` on the command line: split from absl's flags, parsed as the
field's type, checked against the fields that exist (with a suggestion), and applied.

Old flag names (:data:`~jaxgc.experiment.config.ALIASES`) are accepted; every bad
override is a :class:`~jaxgc.experiment.config.ConfigError` naming its flag.
"""
from __future__ import annotations

import ast
from collections.abc import Iterable
from typing import Any

import ml_collections

from jaxgc.experiment.config import ALIASES, ConfigError, _suggest

__all__ = ["apply_overrides", "split_config_flags"]


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _parse(flag: str, text: str, kind) -> Any:
  """``text`` as a value of ``kind`` (the field's type; ``None`` when untyped)."""
  try:
    if kind is bool:
      low = text.lower()
      if low in ("true", "1", "yes"):
        return True
      if low in ("false", "0", "no"):
        return False
      raise ValueError
    if kind is int:
      return int(text)
    if kind is float:
      return float(text)
    if kind is str:
      return text
    if kind in (tuple, list):
      value = _literal(text)
      if isinstance(value, (int, float, str)):
        value = (value,)
      if not isinstance(value, (tuple, list)):
        raise ValueError
      return tuple(value)
  except ValueError:
    raise ConfigError(flag, f"{text!r} is not a {kind.__name__}.") from None
  return _literal(text)


def _set(config, path: list[str], text: str, flag: str) -> None:
  node, prefix = config, ""
  for i, key in enumerate(path[:-1]):
    if key not in node:
      # A choice block takes option blocks for choices the file does not list.
      if "name" in node and i == len(path) - 2:
        node[key] = ml_collections.ConfigDict()
      else:
        raise ConfigError(flag, "no such config field." + _suggest(key, node.keys(), prefix))
    node, prefix = node[key], prefix + key + "."
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(flag, f"--config.{prefix[:-1]} is a value, not a block.")
  key = path[-1]
  if key not in node:
    choice_options = len(path) >= 2 and "name" in _parent(config, path[:-2])
    if not choice_options:
      hint = _suggest(key, list(node.keys()) + (list(ALIASES) if not prefix else []), prefix)
      raise ConfigError(flag, "no such config field." + hint)
    node[key] = _literal(text)      # an option of a choice: its constructor checks it
    return
  if isinstance(node[key], ml_collections.ConfigDict):
    if "name" in node[key]:         # --config.protocol=original
      return _set(config, path + ["name"], text, flag)
    raise ConfigError(flag, f"--config.{prefix}{key} is a block; set one of its fields, "
                      f"e.g. --config.{prefix}{key}.{next(iter(node[key].keys()))}=...")
  kind = node.get_type(key)
  if text == "None" and kind is not str:
    value = None                    # unset an optional field, e.g. --config.step.timeout=None
  else:
    value = _parse(flag, text, None if kind is type(None) else kind)
  try:
    node[key] = value
  except TypeError:
    raise ConfigError(flag, f"{text!r} is not a {kind.__name__}.") from None


def _parent(config, path):
  node = config
  for key in path:
    node = node[key]
  return node


def _canonical(path: list[str]) -> list[str]:
  """Maps an old field path to its place now."""
  dotted = ".".join(path)
  return ALIASES[dotted].split(".") if dotted in ALIASES else path


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Iterable[tuple[str, str]]) -> ml_collections.ConfigDict:
  """Applies ``(dotted_path, text)`` pairs (``--config.a.b=text``); returns the config.

  Text is parsed as the field's type. Old flag names (:data:`ALIASES`) are
  accepted. Raises :class:`ConfigError` naming the flag.
  """
  config.unlock()
  deferred = []
  for dotted, text in overrides:
    flag = f"--config.{dotted}"
    path = dotted.split(".")
    if len(path) == 2 and path[0] in ("straggler", "synthetic"):
      block = ALIASES[path[0] + ".*"].split(".")[0]
      if path[1] not in config[block] or path[0] == "synthetic":
        deferred.append((block, path[1], text, flag))   # old flat straggler/synthetic params
        continue
    _set(config, _canonical(path), text, flag)
  for block, key, text, flag in deferred:
    _set(config, [block, config[block].name, key], text, flag)
  return config


def split_config_flags(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """Separates ``--config.a.b=v`` (or ``--config.a.b v``) from the other arguments.

  Returns ``(other_args, [("a.b", "v"), ...])`` in command-line order; ``--config=FILE``
  stays with the other arguments.
  """
  rest, overrides, i = [], [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      if "=" in arg:
        key, text = arg[len("--config."):].split("=", 1)
      elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
        key, text = arg[len("--config."):], argv[i + 1]
        i += 1
      else:
        key, text = arg[len("--config."):], "true"
      overrides.append((key, text))
    else:
      rest.append(arg)
    i += 1
  return rest, overrides

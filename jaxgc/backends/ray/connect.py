"""Connecting to Ray: the lazy import, the install hint, and joining or starting a cluster.

Ray is imported only here and only when a pool is built (:func:`import_ray`), so
``import jaxgc.backends.ray`` works without Ray and a user without it gets the
one-line install hint when the backend is first used.
"""
from __future__ import annotations

import socket

__all__ = ["INSTALL_HINT", "connect", "import_ray", "one_line"]

INSTALL_HINT = "pip install 'jaxgc[ray]'"


def import_ray():
  """The ``ray`` module; a one-line ``ValueError`` with :data:`INSTALL_HINT` without it."""
  try:
    import ray  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ValueError(f"the Ray backend needs Ray: {INSTALL_HINT}") from None
  return ray


def one_line(err: BaseException) -> str:
  """The first line of ``err``'s message (its type's name if it has none)."""
  text = str(err).strip().splitlines()
  return text[0] if text else type(err).__name__


def _check_reachable(address: str, timeout: float) -> None:
  """Fails in ``timeout`` seconds, not Ray's minute, when nothing listens at ``address``."""
  if address in ("auto", "local"):
    return
  hostport = address.split("://", 1)[-1]
  host, sep, port = hostport.rpartition(":")
  if not sep or not port.isdigit():
    raise ValueError(f"Ray address {address!r} is not host:port (or ray://host:port, or 'auto'); "
                     "fix --config.ray.address, or leave it unset to start a local Ray instance.")
  try:
    socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
  except OSError as err:
    raise ValueError(f"cannot reach the Ray cluster at {address!r} ({one_line(err)}); fix "
                     "the address, or leave it unset to start a local Ray instance.") from None


def connect(address: str | None = None, *, num_cpus: int | None = None,
            connect_timeout: float = 5.0) -> bool:
  """Joins the Ray cluster at ``address``, or starts a local one; returns whether it started one.

  Args:
    address: ``None`` uses the Ray instance this process already joined, else
      starts a local one; ``"host:port"``, ``"ray://host:port"`` or ``"auto"``
      joins an existing cluster.
    num_cpus: logical CPUs of a local instance.
    connect_timeout: seconds before an unreachable address is an error.
  Raises:
    ValueError: Ray missing, or the address is malformed or unreachable (one line each).
  """
  ray = import_ray()
  if address is None:
    if ray.is_initialized():
      return False
    # address="local": a new instance, never a cluster that another process on this
    # machine started (a bare ray.init() would join it, and then refuse num_cpus).
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    return True
  _check_reachable(address, connect_timeout)
  if ray.is_initialized():
    raise ValueError(f"this process already joined a Ray instance, so it cannot join {address!r}; "
                     "leave the address unset to use the current one.")
  try:
    ray.init(address=address, configure_logging=False, log_to_driver=False)
  except Exception as err:  # pylint: disable=broad-except
    raise ValueError(f"cannot join the Ray cluster at {address!r}: {one_line(err)}") from None
  return False

"""Devices and meshes for the coded step.

The CPU device count must be fixed before JAX starts its backend: the first
``jax.devices()`` (or any computation) freezes it. :func:`set_cpu_device_count`
does it the supported way (``jax_num_cpu_devices``) and refuses loudly when it is
too late, instead of silently running on fewer devices than the config asks for.
Whether the backend started is read from the public config alone: JAX validates
``jax_num_cpu_devices`` and refuses a change once its backends exist.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

__all__ = [
    "AXIS", "MODEL_AXIS", "backend_started", "set_cpu_device_count", "use_gloo", "make_mesh",
    "workers_per_device",
]

AXIS = "workers"
"""Name of the mesh axis along which simulated workers are laid out."""

MODEL_AXIS = "model"
"""Name of the mesh axis along which a worker's group of devices is laid out."""


def _set_num_cpu_devices(n: int) -> bool:
  """Sets ``jax_num_cpu_devices``; False (nothing changed) when the backend has started."""
  try:
    jax.config.update("jax_num_cpu_devices", int(n))
  except RuntimeError:   # JAX's own check: backends are already initialized
    return False
  return True


def backend_started() -> bool:
  """Whether JAX has already created its backends (device counts are then fixed).

  Probes with a change of ``jax_num_cpu_devices`` that JAX refuses once its
  backends exist, and puts the value back when it was accepted.
  """
  # jax.config's options are attributes created at run time, unknown to mypy.
  current = int(jax.config.jax_num_cpu_devices)  # type: ignore[attr-defined]
  if not _set_num_cpu_devices(current + 1 if current < 1 else current - 1):
    return True
  _set_num_cpu_devices(current)
  return False


def set_cpu_device_count(n: int) -> None:
  """Asks for ``n`` CPU devices in this process. Call before any JAX computation.

  Raises:
    ValueError: ``n`` is not a positive integer.
    RuntimeError: the backend already started with fewer than ``n`` CPU devices.
  """
  if not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"CPU device count must be a positive integer, got {n!r}.")
  if not _set_num_cpu_devices(n):
    have = len(jax.local_devices(backend="cpu"))
    if have < n:
      raise RuntimeError(
          f"Asked for {n} CPU devices, but JAX already started its backend with "
          f"{have}. The device count is fixed by the first JAX operation, so call "
          "jaxgc.parallel.set_cpu_device_count(n) right after `import jax` (before "
          "anything touches jax.devices() or computes), or start Python with "
          f"XLA_FLAGS=--xla_force_host_platform_device_count={n}.")


def use_gloo() -> None:
  """Selects gloo CPU collectives, needed when several processes form one CPU cluster."""
  if backend_started():
    # jax.config's options are attributes created at run time, unknown to mypy.
    if jax.config.jax_cpu_collectives_implementation != "gloo":  # type: ignore[attr-defined]
      raise RuntimeError(
          "gloo CPU collectives must be selected before the JAX backend starts; "
          "call jaxgc.parallel.use_gloo() before jax.distributed.initialize() and "
          "before any JAX operation.")
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")


def make_mesh(num_devices: int | None = None, platform: str | None = None,
              axis_name: str = AXIS, *, model: int = 1) -> Mesh:
  """The mesh of the coded step over the first ``num_devices`` global devices of ``platform``.

  ``model=1``: a 1-D mesh ``(axis_name,)``, one worker position per device.
  ``model=k``: a 2-D mesh ``(axis_name, "model")`` of shape ``(n // k, k)``; a
  worker is a group of ``k`` devices holding one sharded model replica
  (PROTOCOL.md §13). A group's devices are adjacent in the device order, which
  is how JAX lists the devices of one host (and, on GPU/TPU, of one fast
  interconnect domain: NVLink, a TPU slice's ICI): the ``model`` axis carries
  the per-layer collectives of every chunk gradient, the ``workers`` axis only
  one all-reduce of the messages per step, so the group must sit on the fast
  links. With several processes a group must lie within one process.

  With several processes the global device list spans all of them, so the
  same call on every process builds the same mesh.
  """
  devices = jax.devices(platform) if platform else jax.devices()
  n = len(devices) if num_devices is None else int(num_devices)
  if n < 1:
    raise ValueError(f"num_devices must be >= 1, got {n}.")
  if n > len(devices):
    kind = platform or jax.default_backend()
    hint = (" For CPU, ask for more devices with jaxgc.parallel.set_cpu_device_count(n) "
            "before JAX starts." if kind == "cpu" else "")
    raise RuntimeError(
        f"asked for {n} devices but only {len(devices)} {kind} device(s) "
        f"exist across {jax.process_count()} process(es).{hint}")
  if not isinstance(model, (int, np.integer)) or model < 1 or n % model:
    raise ValueError(f"model={model!r} must be a positive integer dividing the {n} devices "
                     "(a worker is a group of model devices).")
  if model == 1:
    return Mesh(np.asarray(devices[:n]), (axis_name,))
  grid = np.asarray(devices[:n]).reshape(n // model, model)
  for group in grid:
    if len({d.process_index for d in group}) > 1:
      raise ValueError(f"model={model}: a group of devices would span several processes; "
                       "choose model dividing the devices per process.")
  return Mesh(grid, (axis_name, MODEL_AXIS))


def workers_per_device(num_workers: int, num_devices: int) -> int:
  """Simulated workers per device, ``ceil(m / devices)``; the rest are phantom workers."""
  return -(-int(num_workers) // int(num_devices))

"""Communication in simulated time (PROTOCOL.md §11): a step costs ``stop + comm``.

Each sending worker's message holds ``n = ⌈d/ℓ⌉`` numbers of ``b`` bytes (``b`` from the
gradient dtype: 4 in float32, 2 in bfloat16). Uncoded, backup workers and graph codes send
whole gradients, ``n = d``: they run with ``ℓ = 1`` whatever ``ell`` they were given, so
:func:`message_numbers` reads the one message size every protocol declares,
:meth:`jaxgc.Protocol.message_size`. With bandwidth ``B`` (bytes per second: seconds are the
unit of the chunk durations) and latency ``L`` (seconds):

* :class:`PSIngress`: every message crosses the PS's link, one after another,
  ``comm = L + S · n · b / B`` with ``S`` senders;
* :class:`RingAllReduce` among the ``m`` workers (decentralised decode),
  ``comm = 2(m − 1) · (L + n · b / (m · B))``, whoever sends;
* :class:`NoNetwork` (the default): ``comm = 0``, so every figure made without a network
  model stays valid.

A re-encoding round after erasures (the PS re-solves and the round-2 senders send again)
costs a second round: :func:`step_comm_time`.

Deadline mode: the deadline bounds the *computation*, ``stop = min(deadline, t*)``, and the
step costs ``stop + comm``. The PS's stop rule acts on the state it sees, and the messages
are encoded from the state at the stop, so their cost follows from the stop and is not
something the PS can trade against it without knowing ``S`` in advance; bounding the whole
step would couple the deadline to the sender count (``t + comm(S(t)) ≤ T`` has to be solved
per draw) and would change every deadline figure made without a network. A user with a
whole-step budget ``T`` sets ``deadline = T − comm`` with the worst-case ``S = m``.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import jax.numpy as jnp
import numpy as np

from jaxgc import precision as _precision
from jaxgc.errors import ParamError

__all__ = [
    "Network", "NoNetwork", "PSIngress", "RingAllReduce", "NETWORKS", "get_network",
    "message_numbers", "bytes_per_number", "message_bytes", "step_comm_time",
]


def _check_link(bandwidth, latency) -> tuple[float, float]:
  """``(bandwidth, latency)`` as floats; a ``ValueError`` naming the bad parameter."""
  def number(name, x):
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x):
      raise ParamError(f"{name} must be a finite number, got {x!r}.", name)
    return float(x)
  if bandwidth is None:
    raise ParamError("bandwidth is required (bytes per second, e.g. 1.25e10 for 100 Gbit/s); "
                     "or use the network 'none' to leave communication out.", "bandwidth")
  bandwidth, latency = number("bandwidth", bandwidth), number("latency", latency)
  if bandwidth <= 0:
    raise ParamError(f"bandwidth must be positive (bytes per second), got {bandwidth!r}.",
                     "bandwidth")
  if latency < 0:
    raise ParamError(f"latency must be >= 0 (seconds), got {latency!r}.", "latency")
  return bandwidth, latency


class Network:
  """A network model: the time of one communication round, ``time(S, n, b, m)``."""

  name = "network"
  depends_on_senders = True   # whether time() reads S (the planner skips the solve if not)

  def time(self, senders, numbers: int, bytes_per_number: int, num_workers: int):
    """Seconds of one round, ``[...]``, for ``senders`` ``[...]`` messages of ``numbers``
    numbers of ``bytes_per_number`` bytes among ``num_workers`` workers."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class NoNetwork(Network):
  """Messages are free: ``comm = 0`` (the default)."""

  name = "none"
  depends_on_senders = False

  def time(self, senders, numbers, bytes_per_number, num_workers):
    del numbers, bytes_per_number, num_workers
    return jnp.zeros(jnp.shape(senders), jnp.float32)


@dataclasses.dataclass(frozen=True)
class PSIngress(Network):
  """Every message crosses the PS's link in turn: ``L + S · n · b / B``.

  Args:
    bandwidth: ``B``, bytes per second of the PS's ingress link (``> 0``).
    latency: ``L``, seconds per round (``≥ 0``).
  """

  bandwidth: float
  latency: float = 0.0
  name = "ps"

  def __post_init__(self):
    b, lat = _check_link(self.bandwidth, self.latency)
    object.__setattr__(self, "bandwidth", b)
    object.__setattr__(self, "latency", lat)

  def time(self, senders, numbers, bytes_per_number, num_workers):
    del num_workers
    # In Python floats: n · b overflows int32 from half a billion float32 parameters on.
    per_message = float(numbers) * float(bytes_per_number) / self.bandwidth
    return (self.latency + jnp.asarray(senders, jnp.float32) * per_message).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class RingAllReduce(Network):
  """Ring all-reduce among the ``m`` workers: ``2(m − 1) · (L + n · b / (m · B))``.

  Every worker takes part (a non-sender contributes zeros), so the time does not depend
  on ``S``. Args as :class:`PSIngress`, ``B`` being each link's bandwidth.
  """

  bandwidth: float
  latency: float = 0.0
  name = "ring"
  depends_on_senders = False

  def __post_init__(self):
    b, lat = _check_link(self.bandwidth, self.latency)
    object.__setattr__(self, "bandwidth", b)
    object.__setattr__(self, "latency", lat)

  def time(self, senders, numbers, bytes_per_number, num_workers):
    m = int(num_workers)
    per_round = 2 * (m - 1) * (self.latency + float(numbers) * float(bytes_per_number)
                               / (m * self.bandwidth))
    return jnp.full(jnp.shape(senders), per_round, jnp.float32)


NETWORKS = {"none": NoNetwork, "ps": PSIngress, "ring": RingAllReduce}


def get_network(name: str = "none", bandwidth: float | None = None,
                latency: float | None = None) -> Network:
  """The network model registered as ``name`` in :data:`NETWORKS` (``none``, ``ps``, ``ring``).

  ``bandwidth`` (bytes per second) is required for ``ps`` and ``ring``; ``latency``
  (seconds) defaults to 0. For ``none`` they are checked when given, then unused.
  """
  if name not in NETWORKS:
    raise ParamError(f"unknown network {name!r}; choose one of {sorted(NETWORKS)} "
                     "(ps: PS ingress, ring: ring all-reduce, none: free messages).", "name")
  latency = 0.0 if latency is None else latency
  if name == "none":
    if bandwidth is not None:
      _check_link(bandwidth, latency)
    return NoNetwork()
  return NETWORKS[name](bandwidth, latency)


def message_numbers(protocol, d: int) -> int:
  """Numbers per message, ``⌈d/ℓ⌉`` for the coded protocols and ``d`` for those with ``ℓ = 1``."""
  return int(protocol.message_size(int(d)))


def bytes_per_number(dtype) -> int:
  """``b``: bytes of one number of the gradient dtype (4 for float32, 2 for bfloat16)."""
  return int(np.dtype(jnp.dtype(dtype)).itemsize)


def message_bytes(protocol, d: int, dtype=jnp.float32, message_dtype=None) -> int:
  """Bytes of one worker's message, ``⌈d/ℓ⌉ · b`` (``d · b`` for the uncoded protocols).

  ``message_dtype``: the precision on the wire (PROTOCOL.md §15,
  :func:`jaxgc.precision.wire_bytes`): ``None`` or ``"float32"`` keeps the
  gradient's ``dtype``; ``"bfloat16"`` is 2 bytes a number; ``"int8"`` 1 byte a number
  and a float32 scale per 256.
  """
  return _precision.wire_bytes(message_numbers(protocol, d), message_dtype, dtype)


def step_comm_time(network: Network | None, protocol, d: int, dtype, senders,
                   resenders=None, redone=None, message_dtype=None):
  """The communication of one step, ``[...]`` float32 seconds.

  Args:
    network: the model (``None``: :class:`NoNetwork`).
    protocol: fixes the message size (:func:`message_numbers`).
    d: gradient length.
    dtype: the gradient's dtype (``b``).
    senders: ``[...]`` workers that send in the first round.
    resenders: ``[...]`` senders of the re-encoding round after erasures, which
      costs a second round (``None``: no round 2).
    redone: ``[...]`` whether that round took place (``None`` with ``resenders``).
    message_dtype: the precision on the wire (:func:`message_bytes`); the network
      model prices its real bytes, so bfloat16 halves float32's transfer time.
  """
  network = NoNetwork() if network is None else network
  # The message's bytes as one number of one byte: n · b exactly (an integer), so a
  # float32 message costs what it did and a bfloat16 one exactly half of it.
  n, b = message_bytes(protocol, d, dtype, message_dtype), 1
  m = protocol.assignment.num_workers
  comm = network.time(senders, n, b, m)
  if resenders is not None:
    comm = comm + jnp.where(redone, network.time(resenders, n, b, m), 0.0)
  return comm.astype(jnp.float32)

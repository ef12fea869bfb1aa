"""Workers that are groups of devices: parameter placement and sharded messages (PROTOCOL.md §13).

On a 2-D mesh ``workers × model`` one worker is a group of ``k`` devices holding
one model replica sharded among them. Two things live here:

* the **placement** of parameters (and, following them, the optimizer state)
  over the ``model`` axis (:func:`place_params`). The default FSDP rule
  (:func:`fsdp_rule`) shards each leaf of at least ``min_size`` elements along
  its largest dimension divisible by ``k``; a pytree of ``PartitionSpec``s, or a
  rule function, overrides it. A leaf with no divisible dimension stays
  replicated, and :meth:`Placement.summary` says so.
* the **message layout** (:class:`MessageLayout`): how a gradient pytree is cut
  into the ``ℓ`` blocks of the code, shard by shard, so that a worker's message
  ``z_j = Σ_k c_k g^(k)`` is held as ``k`` shards and the decode
  ``ĝ^(r) = Σ_j A[r,j] z_j`` reduces over ``workers`` shard by shard: no device
  ever holds a full gradient. Leaves sharded over ``model`` are viewed
  shard-major as ``[k, n_i / k]`` and concatenated along the second axis (a
  local operation on each device) into ``[k, n_s]``, split into ``ℓ`` blocks of
  ``[k, ⌈n_s/ℓ⌉]``; the replicated leaves are raveled into ``[n_r]`` and split
  as on a 1-D mesh. With ``k = 1`` every leaf is replicated and the blocks are
  exactly those of ``ravel_pytree`` (today's step). Any partition of the
  gradient into ``ℓ`` equal parts gives an exact decode (PROTOCOL.md §2), so
  this one, which never moves a number between devices, is as good as the flat one.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgc.backends import core
from jaxgc.backends.spmd.devices import MODEL_AXIS
from jaxgc.protocols import base as _base

__all__ = [
    "MODEL_AXIS", "MIN_SHARD_SIZE", "fsdp_rule", "Placement", "place_params",
    "MessageLayout", "device_bytes",
]


MIN_SHARD_SIZE = 1 << 12
"""Leaves with fewer elements stay replicated under the default rule: sharding
them saves little memory and costs a collective per leaf."""


def fsdp_rule(min_size: int = MIN_SHARD_SIZE) -> Callable:
  """The default FSDP rule ``(path, shape, k) -> PartitionSpec``.

  A leaf of at least ``min_size`` elements is sharded along its largest
  dimension divisible by ``k`` (the first such, on ties); others stay replicated.
  """
  def rule(path: str, shape: tuple[int, ...], k: int) -> P:
    del path
    if k == 1 or math.prod(shape) < min_size:
      return P()
    dims = [i for i in np.argsort([-s for s in shape], kind="stable") if shape[i] % k == 0]
    if not dims:
      return P()
    spec: list[str | None] = [None] * len(shape)
    spec[dims[0]] = MODEL_AXIS
    return P(*spec)
  return rule


class _Leaf(NamedTuple):
  path: str
  shape: tuple[int, ...]
  dtype: Any
  dim: int | None       # the dimension sharded over the model axis, None: replicated
  note: str             # why a large leaf stays replicated ("" otherwise)


class Placement:
  """Where each parameter leaf lives on a ``workers × model`` mesh.

  Attributes:
    mesh: the mesh.
    model_axis: its model axis (``None`` on a 1-D mesh).
    k: the group size (devices per worker).
    specs: pytree of ``PartitionSpec`` like the parameters.
    shardings: pytree of ``NamedSharding`` like the parameters (replicated over workers).
    leaves: per leaf ``(path, shape, dtype, sharded dim or None, note)``.
  """

  def __init__(self, mesh: Mesh, model_axis: str | None, treedef, leaves: list[_Leaf]):
    self.mesh, self.model_axis, self.treedef, self.leaves = mesh, model_axis, treedef, leaves
    self.k = 1 if model_axis is None else int(mesh.shape[model_axis])
    specs = [P() if lf.dim is None else
             P(*[model_axis if i == lf.dim else None for i in range(len(lf.shape))])
             for lf in leaves]
    self.specs = jax.tree.unflatten(treedef, specs)
    self.shardings = jax.tree.unflatten(treedef, [NamedSharding(mesh, s) for s in specs])
    self.replicated = NamedSharding(mesh, P())

  @property
  def sharded(self) -> bool:
    """Whether any leaf is sharded over the model axis."""
    return any(lf.dim is not None for lf in self.leaves)

  def bytes_per_device(self) -> int:
    """Parameter bytes one device holds."""
    return sum(math.prod(lf.shape) * np.dtype(lf.dtype).itemsize // (self.k if lf.dim is not None
                                                                     else 1)
               for lf in self.leaves)

  def summary(self) -> str:
    """One line per leaf: path, shape, spec; a replicated large leaf says why."""
    lines = [f"parameters on {dict(self.mesh.shape)}: {self.bytes_per_device()} bytes per device"]
    for lf, spec in zip(self.leaves, jax.tree.leaves(self.specs, is_leaf=_is_spec),
                        strict=True):
      lines.append(f"  {lf.path} {list(lf.shape)} {spec}" + (f"  ({lf.note})" if lf.note else ""))
    return "\n".join(lines)

  def place(self, params):
    """``params`` on their shardings (a constraint under ``jit``, a transfer outside it)."""
    return _put(params, self.shardings)

  def opt_shardings(self, tx: optax.GradientTransformation, opt_state):
    """Shardings of an optimizer state: its copies of the parameters follow them, the rest
    (counts, scalars) is replicated."""
    return optax.tree_map_params(tx, lambda _, s: s, opt_state, self.shardings,
                                 transform_non_params=lambda _: self.replicated)


def _is_spec(x) -> bool:
  return isinstance(x, P)


def _put(tree, shardings):
  def put(x, s):
    if isinstance(x, jax.core.Tracer):
      return jax.lax.with_sharding_constraint(x, s)
    return jax.device_put(x, s)
  return jax.tree.map(put, tree, shardings)


def _spec_dim(path: str, spec, shape, mesh: Mesh, workers_axis: str, model_axis: str | None):
  """The dimension a leaf's ``spec`` shards over the model axis (``None``: replicated)."""
  if not isinstance(spec, P):
    raise ValueError(f"parameter {path}: expected a PartitionSpec, got {spec!r}; give one "
                     "jax.sharding.PartitionSpec per parameter leaf (or a rule function).")
  if len(spec) > len(shape):
    raise ValueError(f"parameter {path} of shape {list(shape)} has a spec {spec} of "
                     f"{len(spec)} entries; give at most one per dimension.")
  dim = None
  for i, entry in enumerate(spec):
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    for name in names:
      if name not in mesh.axis_names:
        raise ValueError(f"parameter {path}: spec {spec} names axis {name!r}, which the mesh "
                         f"{tuple(mesh.axis_names)} does not have; shard parameters over "
                         f"{model_axis!r} only (make_mesh(n, model=k) has it).")
      if name == workers_axis:
        raise ValueError(f"parameter {path}: spec {spec} shards over {workers_axis!r}; every "
                         f"worker holds a whole replica, so shard over {model_axis!r} only.")
      if dim is not None or len(names) > 1:
        raise ValueError(f"parameter {path}: spec {spec} shards more than one dimension; "
                         "shard one dimension over the model axis.")
      dim = i
  if dim is not None and shape[dim] % mesh.shape[model_axis]:
    raise ValueError(f"parameter {path}: dimension {dim} of shape {list(shape)} is not "
                     f"divisible by the {mesh.shape[model_axis]} devices of a group; leave "
                     "it replicated (P()) or shard a divisible dimension.")
  return dim


def place_params(params, mesh: Mesh, sharding=None, *, workers_axis: str = "workers",
                 min_size: int = MIN_SHARD_SIZE) -> Placement:
  """The :class:`Placement` of ``params`` (arrays or shapes) on ``mesh``.

  Args:
    sharding: ``None`` (the FSDP rule, :func:`fsdp_rule`), a rule function
      ``(path, shape, k) -> PartitionSpec``, or a pytree of ``PartitionSpec``
      like ``params``.
  Raises:
    ValueError: a spec names an axis the mesh does not have (or ``workers``),
      shards several dimensions, or a dimension the group size does not divide.
  """
  others = [a for a in mesh.axis_names if a != workers_axis]
  if len(others) > 1:
    raise ValueError(f"mesh axes {tuple(mesh.axis_names)}: expected ({workers_axis!r},) or "
                     f"({workers_axis!r}, {MODEL_AXIS!r}); build it with make_mesh(n, model=k).")
  model_axis = others[0] if others else None
  k = 1 if model_axis is None else int(mesh.shape[model_axis])
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  if sharding is None or callable(sharding) and not isinstance(sharding, P):
    rule = fsdp_rule(min_size) if sharding is None else sharding
    specs = [rule(jax.tree_util.keystr(p), tuple(np.shape(x)), k) for p, x in flat]
  else:
    spec_leaves, spec_def = jax.tree.flatten(sharding, is_leaf=_is_spec)
    if spec_def != treedef:  # type: ignore[operator]  # no jaxlib stub for PyTreeDef
      raise ValueError(f"the PartitionSpec pytree has structure {spec_def}, the parameters "
                       f"{treedef}; give one spec per parameter leaf.")
    specs = spec_leaves
  leaves = []
  for (path, x), spec in zip(flat, specs, strict=True):
    name, shape = jax.tree_util.keystr(path), tuple(np.shape(x))
    dim = _spec_dim(name, spec, shape, mesh, workers_axis, model_axis)
    if k > 1 and spec == P() and sharding is None and math.prod(shape) >= min_size:
      note = f"replicated: no dimension divisible by {k}"
    else:
      note = ""
    leaves.append(_Leaf(name, shape, jnp.dtype(x.dtype), dim, note))
  return Placement(mesh, model_axis, treedef, leaves)


def device_bytes(tree) -> int:
  """Bytes of ``tree``'s arrays held by one device (the first addressable one of the first leaf)."""
  arrays = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
  if not arrays:
    return 0
  dev = arrays[0].addressable_shards[0].device
  return sum(s.data.nbytes for x in arrays for s in x.addressable_shards if s.device == dev)


class MessageLayout:
  """A gradient pytree as ``ℓ`` blocks and messages held shard by shard (module docstring).

  A message is a tuple of parts: ``[k, b_s]`` (the sharded leaves, dimension 0
  over the model axis) and/or ``[b_r]`` (the replicated leaves), ``b = ⌈n/ℓ⌉``.
  Methods take and return such tuples, with any leading axes (workers).
  """

  def __init__(self, placement: Placement, ell: int):
    self.placement, self.ell, self.k = placement, int(ell), placement.k
    self.dtype = jnp.result_type(*[lf.dtype for lf in placement.leaves])
    # leaf index -> its dimension sharded over the model axis, for the sharded leaves
    self._dims = {i: lf.dim for i, lf in enumerate(placement.leaves) if lf.dim is not None}
    self._sharded = list(self._dims)
    self._rep = [i for i, lf in enumerate(placement.leaves) if lf.dim is None]
    size = lambda idx, k: sum(math.prod(placement.leaves[i].shape) // k for i in idx)
    self.n_sharded, self.n_replicated = size(self._sharded, self.k), size(self._rep, 1)
    self.blocks = tuple(_base.num_blocks(n, self.ell) for n, on in
                        ((self.n_sharded, self._sharded), (self.n_replicated, self._rep)) if on)
    self.shapes = ((self.k, self.blocks[0]),) * bool(self._sharded) + ((self.blocks[-1],),) * bool(
        self._rep)

  @property
  def num_sharded_parts(self) -> int:
    """1 when a message has a part sharded over the group (it comes first), else 0."""
    return int(bool(self._sharded) and self.k > 1)

  @property
  def size(self) -> int:
    """Numbers in one message (all shards): ``≈ d/ℓ``."""
    return sum(math.prod(s) for s in self.shapes)

  def _constrain(self, parts):
    """Pins a sharded part's group dimension (``-2``) to the model axis and a replicated
    part to every device of the group.

    Left free, XLA may split a replicated part over the group and move it with a
    collective-permute, which every device of the mesh must join: inside the
    step's per-worker branches (groups take different ones) that deadlocks.
    """
    if self.k == 1:
      return parts
    out = []
    for x, shape in zip(parts, self.shapes, strict=True):
      if len(shape) == 2:
        spec = P(*([None] * (x.ndim - 2)), self.placement.model_axis, None)
      else:
        spec = P()
      out.append(jax.lax.with_sharding_constraint(x, spec))
    return tuple(out)

  def _constrain_leaves(self, leaves):
    if self.k == 1:
      return leaves
    specs = jax.tree.leaves(self.placement.specs, is_leaf=_is_spec)
    return [jax.lax.with_sharding_constraint(x, s) for x, s in zip(leaves, specs, strict=True)]

  def split(self, grads):
    """``grads`` (a pytree like the parameters) -> per part ``[ℓ, k, b_s]`` / ``[ℓ, b_r]``."""
    leaves = self._constrain_leaves(jax.tree.leaves(grads))
    out = []
    if self._sharded:
      cols = [self._shard_major(leaves[i], self._dims[i]) for i in self._sharded]
      flat = jnp.concatenate(cols, axis=1) if len(cols) > 1 else cols[0]     # [k, n_s]
      blocks = _base.split_blocks(flat.astype(self.dtype), self.ell)       # [k, ℓ, b_s]
      out.append(jnp.moveaxis(blocks, 1, 0))
    if self._rep:
      flat = jnp.concatenate([jnp.ravel(leaves[i]).astype(self.dtype) for i in self._rep])
      out.append(_base.split_blocks(flat, self.ell))
    return self._constrain(tuple(out))

  def _shard_major(self, x, dim: int):
    """``x`` as ``[k, size/k]``, row ``r`` holding what model device ``r`` holds: local."""
    x = jnp.moveaxis(x, dim, 0)
    return x.reshape((self.k, x.shape[0] // self.k) + x.shape[1:]).reshape(self.k, -1)

  def encode(self, grads, coef):
    """``Σ_r coef[r] g^(r)``: one chunk's contribution to a message (``coef [ℓ]``)."""
    c = coef.astype(self.dtype)
    parts = []
    for x in self.split(grads):
      flat = x.reshape(self.ell, -1)
      parts.append(_base.weighted_sum(c, flat, c != 0).reshape(x.shape[1:]))
    return self._constrain(tuple(parts))

  def zeros(self, *lead):
    """Zero messages with leading axes ``lead``."""
    return self._constrain(tuple(jnp.zeros(lead + s, self.dtype) for s in self.shapes))

  def row_sums(self, msgs):
    """``Σ`` of each message ``[...]`` (over its trailing axes): non-finite iff any entry is."""
    return sum(jnp.sum(x, axis=tuple(range(x.ndim - len(s), x.ndim)))
               for x, s in zip(msgs, self.shapes, strict=True))

  def decode(self, msgs, dec):
    """``Σ_j dec[r, j] z_j`` per part: ``[w, ...] -> [ℓ, ...]`` (linear: psum it over workers).

    The PS's one decode (:func:`jaxgc.backends.core.decode`), shard by shard.
    """
    return self._constrain(tuple(core.decode(x, dec) for x in msgs))

  def join(self, blocks):
    """Decoded blocks (per part ``[ℓ, ...]``) -> a gradient pytree like the parameters."""
    leaves: list[Any] = [None] * len(self.placement.leaves)
    parts = list(self._constrain(tuple(blocks)))
    if self._sharded:
      x = jnp.moveaxis(parts.pop(0), 0, 1).reshape(self.k, -1)[:, : self.n_sharded]
      start = 0
      for i in self._sharded:
        lf, dim = self.placement.leaves[i], self._dims[i]
        n = math.prod(lf.shape) // self.k
        moved = (lf.shape[dim],) + lf.shape[:dim] + lf.shape[dim + 1:]
        y = x[:, start:start + n].reshape((self.k, moved[0] // self.k) + moved[1:])
        leaves[i] = jnp.moveaxis(y.reshape(moved), 0, dim).astype(lf.dtype)
        start += n
    if self._rep:
      x = parts.pop(0).reshape(-1)
      start = 0
      for i in self._rep:
        lf = self.placement.leaves[i]
        n = math.prod(lf.shape)
        leaves[i] = x[start:start + n].reshape(lf.shape).astype(lf.dtype)
        start += n
    return jax.tree.unflatten(self.placement.treedef, self._constrain_leaves(leaves))

"""The Assignment class, its checks and the fixed constructors (see the package docstring)."""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from jaxgc.errors import ParamError
from jaxgc.registry import Registry

__all__ = ["Assignment", "cyclic", "fractional_repetition", "from_order", "from_lists",
           "from_biadjacency", "from_graph", "random_regular", "ASSIGNMENTS", "expander"]

ASSIGNMENTS: Registry[Assignment] = Registry("assignment", positional=2)
"""Name -> builder ``(num_workers, load, **options) -> Assignment`` (a config's
``assignment.name``)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Assignment:
  """Ordered chunk lists ``π_j`` of ``m`` workers over ``N`` chunks.

  Attributes:
    order: int32 ``[m, max_load]``; ``order[j, t] = π_j(t+1)``, ``-1`` = empty.
    num_chunks: ``N``.
    kind: how it was built (``"cyclic"``, ``"fractional_repetition"``,
      ``"graph"``, ``"explicit"``); informational, and lets ``Original`` pick
      the fractional-repetition code.
  """

  order: np.ndarray
  num_chunks: int
  kind: str = "explicit"

  def __post_init__(self):
    _validate(self.order, self.num_chunks)
    order = np.array(self.order, dtype=np.int32)
    order.setflags(write=False)
    object.__setattr__(self, "order", order)

  # -- sizes ---------------------------------------------------------------
  @property
  def num_workers(self) -> int:
    """``m``."""
    return int(self.order.shape[0])

  @property
  def max_load(self) -> int:
    return int(self.order.shape[1])

  @functools.cached_property
  def loads(self) -> np.ndarray:
    """``δ_j``, int32 ``[m]``."""
    return (self.order >= 0).sum(axis=1).astype(np.int32)

  @functools.cached_property
  def slot_mask(self) -> np.ndarray:
    """bool ``[m, max_load]``: slot holds a chunk."""
    return self.order >= 0

  # -- per-chunk views -----------------------------------------------------
  @functools.cached_property
  def positions(self) -> np.ndarray:
    """int32 ``[m, N]``: ``pos_j(i) - 1`` (0-based slot), ``-1`` if not held."""
    pos = np.full((self.num_workers, self.num_chunks), -1, np.int32)
    w, t = np.nonzero(self.slot_mask)
    pos[w, self.order[w, t]] = t
    return pos

  @functools.cached_property
  def replication(self) -> np.ndarray:
    """``|W(i)|``, int32 ``[N]``."""
    return (self.positions >= 0).sum(axis=0).astype(np.int32)

  @functools.cached_property
  def holders(self) -> tuple[np.ndarray, np.ndarray]:
    """``(workers, slots)``, each int32 ``[N, max_replication]``, ``-1`` padded.

    Row ``i`` lists the holders ``W(i)`` (ascending) and the slot of ``i`` in each.
    """
    r = int(self.replication.max())
    workers = np.full((self.num_chunks, r), -1, np.int32)
    slots = np.full((self.num_chunks, r), -1, np.int32)
    for i in range(self.num_chunks):
      (w,) = np.nonzero(self.positions[:, i] >= 0)
      workers[i, : len(w)] = w
      slots[i, : len(w)] = self.positions[w, i]
    return workers, slots

  @functools.cached_property
  def biadjacency(self) -> np.ndarray:
    """bool ``[m, N]``: worker ``j`` holds chunk ``i``."""
    return self.positions >= 0

  def coverage(self, counts):
    """``c_i(k) = #{j : pos_j(i) ≤ k_j}``: int32 ``[..., N]`` from counts ``[..., m]``."""
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    counts = self.check_counts(counts, batched=True, what="coverage")
    return jnp.sum(self.finished(counts), axis=-2, dtype=jnp.int32)

  # "Finished" is one concept at three granularities: a worker has finished chunk
  # ``i`` / slot ``t`` / its whole list once ``k_j`` has passed it.
  def finished(self, counts):
    """bool ``[..., m, N]``: worker ``j`` has finished chunk ``i`` (``j ∈ S_i``)."""
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    counts = self.check_counts(counts, batched=True, what="finished")
    pos = jnp.asarray(self.positions)
    return (pos >= 0) & (pos < jnp.asarray(counts)[..., :, None])

  def finished_slots(self, counts):
    """bool ``[..., m, max_load]``: worker ``j`` has finished slot ``t`` (``t < k_j``)."""
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    counts = self.check_counts(counts, batched=True, what="finished_slots")
    t = jnp.arange(self.max_load)
    return (t < jnp.asarray(counts)[..., :, None]) & jnp.asarray(self.slot_mask)

  def finished_workers(self, counts):
    """bool ``[..., m]``: worker ``j`` has finished its whole list (``k_j = δ_j``)."""
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    counts = self.check_counts(counts, batched=True, what="finished_workers")
    return jnp.asarray(counts) >= jnp.asarray(self.loads)

  # -- validation at the boundary --------------------------------------------
  def check_counts(self, counts, batched: bool = True, what: str = "counts"):
    """Validates a state ``k`` (``[m]``, or ``[..., m]`` if ``batched``) and returns it.

    Under ``jit`` only the shape and dtype are checked (values are unknown);
    concrete states must hold integers ``0 <= k_j <= load_j``. Returns int32.
    """
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    m = self.num_workers
    shape, dtype = np.shape(counts), getattr(counts, "dtype", None)
    if dtype is None:
      counts = np.asarray(counts)
      shape, dtype = counts.shape, counts.dtype
    want = f"[..., num_workers] = [..., {m}]" if batched else f"[num_workers] = [{m}]"
    if shape[-1:] != (m,):
      raise ValueError(
          f"{what}: counts (chunks finished per worker) must have shape {want}, got "
          f"{tuple(shape)}; pass one entry per worker of this {m}-worker assignment.")
    if not batched and len(shape) != 1:
      raise ValueError(
          f"{what}: takes one state of shape [{m}], got a batch of shape {tuple(shape)}; "
          "for a batch of states use jax.vmap over the leading axis.")
    if dtype == np.bool_ or not (np.issubdtype(dtype, np.integer) or
                                 np.issubdtype(dtype, np.floating)):
      raise ValueError(
          f"{what}: counts must be integer chunk counts, got dtype {dtype}; pass e.g. "
          "timing.progress(durations, t), or an int array of chunks finished per worker.")
    if isinstance(counts, jax.core.Tracer):
      if not np.issubdtype(dtype, np.integer):
        raise ValueError(
            f"{what}: counts must have an integer dtype under jit, got {dtype}; cast "
            "with counts.astype(jnp.int32).")
      return counts
    c = np.asarray(counts)
    fractional = np.issubdtype(c.dtype, np.floating) and (
        not np.isfinite(c).all() or (c != np.round(c)).any())
    if fractional:
      bad = c[~np.isfinite(c) | (c != np.round(c))].ravel()[0]
      raise ValueError(
          f"{what}: counts must be whole numbers of chunks, got {bad}; pass integers "
          "0 <= k_j <= load_j (e.g. timing.progress(durations, t)).")
    over = (c < 0) | (c > self.loads)
    if over.any():
      idx = tuple(np.argwhere(over)[0])
      j = int(idx[-1])
      raise ValueError(
          f"{what}: counts must satisfy 0 <= k_j <= load_j; worker {j} has "
          f"k_j={c[idx]:g} but load "
          f"{int(self.loads[j])} (loads {self.loads.tolist()}). A count is the number of "
          "chunks the worker finished, at most its load.")
    return jnp.asarray(c, jnp.int32)

  def check_durations(self, durations):
    """Validates the shape of durations ``[..., m, max_load]`` (static, so also under
    ``jit``) and returns them; their values are checked by ``timing.finish_times``."""
    shape = np.shape(durations)
    want = (self.num_workers, self.max_load)
    if tuple(shape[-2:]) != want:
      hint = " (transposed?)" if tuple(shape[-2:]) == want[::-1] else ""
      raise ValueError(
          f"durations must have shape [..., num_workers, max_load] = [..., {want[0]}, "
          f"{want[1]}] for this assignment, got {tuple(shape)}{hint}; row j holds worker "
          "j's per-slot times, e.g. model.sample(key, assignment).")
    return durations

  def lists(self) -> list[list[int]]:
    """The ordered chunk lists as Python lists."""
    return [[int(c) for c in row if c >= 0] for row in self.order]

  # -- checks and derived assignments -------------------------------------
  def check_ell(self, ell: int) -> None:
    """Raises ``ValueError`` unless every chunk is held by at least ``ell`` workers."""
    if not isinstance(ell, (int, np.integer)) or ell < 1:
      raise ParamError(f"ell must be a positive integer, got {ell!r}.", "ell")
    rmin = int(self.replication.min())
    if ell > rmin:
      i = int(np.argmin(self.replication))
      raise ParamError(
          f"ell={ell} is larger than the replication of chunk {i}, which is held by "
          f"only {rmin} worker(s); exact recovery would be impossible. Use ell <= {rmin}, "
          "or an assignment with a larger load.", "ell")

  def with_order(self, order) -> Assignment:
    """Same chunk sets per worker, new processing order (raises if the sets differ)."""
    new = Assignment(np.asarray(order), self.num_chunks, self.kind)
    if new.order.shape[0] != self.num_workers or not np.array_equal(
        new.biadjacency, self.biadjacency):
      raise ValueError(
          "with_order may only permute chunks within each worker; the new order "
          "holds different chunks.")
    return new

  def __repr__(self) -> str:
    return (f"Assignment(kind={self.kind!r}, num_workers={self.num_workers}, "
            f"num_chunks={self.num_chunks}, loads={_summ(self.loads)}, "
            f"replication={_summ(self.replication)})")


def _summ(x: np.ndarray) -> str:
  lo, hi = int(x.min()), int(x.max())
  return str(lo) if lo == hi else f"{lo}..{hi}"


def _validate(order, num_chunks) -> None:
  order = np.asarray(order)
  if order.ndim != 2 or order.shape[0] < 1 or order.shape[1] < 1:
    raise ValueError(
        f"order must be an int array [num_workers, max_load] with both sizes >= 1, "
        f"got shape {order.shape}.")
  if not np.issubdtype(order.dtype, np.integer) and not np.all(np.equal(np.mod(order, 1), 0)):
    raise ValueError("order must contain integer chunk indices (-1 for an empty slot).")
  if not isinstance(num_chunks, (int, np.integer)) or num_chunks < 1:
    raise ValueError(f"num_chunks must be a positive integer, got {num_chunks!r}.")
  order = order.astype(np.int64)
  bad = (order < -1) | (order >= num_chunks)
  if bad.any():
    j, t = map(int, np.argwhere(bad)[0])
    raise ValueError(
        f"chunk index {order[j, t]} at worker {j}, slot {t} is out of range; "
        f"chunks are 0..{num_chunks - 1} and -1 marks an empty slot.")
  filled = order >= 0
  # An empty slot followed by a chunk would make the processing order ambiguous.
  gap = ~filled[:, :-1] & filled[:, 1:]
  if gap.any():
    j = int(np.argwhere(gap)[0, 0])
    raise ValueError(
        f"worker {j} has an empty slot (-1) before a chunk: {order[j].tolist()}. "
        "Put empty slots after all of a worker's chunks.")
  for j, row in enumerate(order):
    row = row[row >= 0]
    if len(np.unique(row)) != len(row):
      vals, counts = np.unique(row, return_counts=True)
      raise ValueError(
          f"worker {j} lists chunk {int(vals[counts > 1][0])} more than once: "
          f"{row.tolist()}. Each worker must hold distinct chunks.")
  held = np.zeros(num_chunks, bool)
  held[order[filled]] = True
  if not held.all():
    missing = np.nonzero(~held)[0]
    raise ValueError(
        f"chunk(s) {missing[:10].tolist()} are held by no worker, so the gradient sum "
        "can never be recovered. Assign every chunk to at least one worker, or lower "
        "num_chunks.")


# -- constructors ------------------------------------------------------------

def from_order(order, num_chunks: int | None = None, kind: str = "explicit") -> Assignment:
  """From an int array ``[m, max_load]`` with ``-1`` for empty slots."""
  order = np.asarray(order)
  if num_chunks is None:
    num_chunks = int(order.max()) + 1 if order.size else 0
  return Assignment(order, int(num_chunks), kind)


def from_lists(lists: Sequence[Sequence[int]], num_chunks: int | None = None) -> Assignment:
  """From ragged per-worker ordered lists, e.g. ``[[0, 1], [1, 2, 0], [2]]``."""
  lists = [list(map(int, chunks)) for chunks in lists]
  if not lists:
    raise ValueError("need at least one worker.")
  width = max(1, max(len(chunks) for chunks in lists))
  order = np.full((len(lists), width), -1, np.int64)
  for j, chunks in enumerate(lists):
    order[j, : len(chunks)] = chunks
  return from_order(order, num_chunks)


@ASSIGNMENTS.register("cyclic")
def cyclic(num_workers: int, load: int) -> Assignment:
  """Cyclic assignment, ``N = m``: worker ``j`` holds ``j, j+1, …, j+load-1 (mod m)``."""
  _check_sizes(num_workers, load)
  j = np.arange(num_workers)[:, None]
  t = np.arange(load)[None, :]
  return Assignment((j + t) % num_workers, num_workers, "cyclic")


@ASSIGNMENTS.register("fractional_repetition")
def fractional_repetition(num_workers: int, load: int) -> Assignment:
  """Fractional repetition: groups of ``load`` workers share the same ``load`` chunks.

  Requires ``load | num_workers``; ``N = m``. Within a group the lists are cyclic
  shifts, so every chunk sits at each position once (the optimal order, §5).
  """
  _check_sizes(num_workers, load)
  if num_workers % load:
    raise ParamError(
        f"fractional repetition needs load to divide num_workers, got load={load}, "
        f"num_workers={num_workers}. Pick a divisor of num_workers, or use cyclic().", "load")
  j = np.arange(num_workers)[:, None]
  t = np.arange(load)[None, :]
  group, r = j // load, j % load
  return Assignment(group * load + (r + t) % load, num_workers, "fractional_repetition")


def from_biadjacency(adjacency) -> Assignment:
  """From a 0/1 matrix ``[m, N]``; each worker's chunks in ascending order."""
  adj = np.asarray(adjacency)
  if adj.ndim != 2:
    raise ValueError(f"adjacency must be [num_workers, num_chunks], got shape {adj.shape}.")
  order = from_lists([np.nonzero(row)[0].tolist() for row in adj], adj.shape[1]).order
  return Assignment(order, adj.shape[1], "graph")


def from_graph(graph, workers: Sequence | None = None,
               chunks: Sequence | None = None) -> Assignment:
  """From a networkx bipartite graph.

  Workers are the nodes with ``bipartite=0`` (or ``workers``), chunks the others;
  both are sorted to fix indices. Each worker's chunks come in ascending order:
  use :func:`jaxgc.ordering.optimize` to choose a good order.
  """
  import networkx as nx  # pylint: disable=import-outside-toplevel
  if workers is None:
    workers = [n for n, d in graph.nodes(data=True) if d.get("bipartite") == 0]
    if not workers:
      raise ValueError("no node has bipartite=0; pass workers= explicitly.")
  workers = sorted(workers)
  if chunks is None:
    wset = set(workers)
    chunks = [n for n in graph.nodes if n not in wset]
  chunks = sorted(chunks)
  adj = nx.bipartite.biadjacency_matrix(graph, row_order=workers, column_order=chunks)
  return from_biadjacency(np.asarray(adj.todense()) != 0)


@ASSIGNMENTS.register("random_regular")
def random_regular(num_workers: int, load: int, seed: int = 0,
                   num_swaps: int | None = None) -> Assignment:
  """A uniformly-mixed random ``load``-regular bipartite graph with ``N = m``.

  Starts from the cyclic graph and applies random degree-preserving edge swaps
  ``(w1,c1),(w2,c2) -> (w1,c2),(w2,c1)``. Chunks per worker come in ascending order.
  """
  _check_sizes(num_workers, load)
  rng = np.random.default_rng(seed)
  m = num_workers
  adj = np.zeros((m, m), bool)
  adj[np.arange(m)[:, None], (np.arange(m)[:, None] + np.arange(load)) % m] = True
  edges = np.argwhere(adj)
  num_swaps = 10 * len(edges) if num_swaps is None else num_swaps
  picks = rng.integers(0, len(edges), size=(num_swaps, 2))
  for a, b in picks:
    (w1, c1), (w2, c2) = edges[a], edges[b]
    if w1 == w2 or c1 == c2 or adj[w1, c2] or adj[w2, c1]:
      continue
    adj[w1, c1] = adj[w2, c2] = False
    adj[w1, c2] = adj[w2, c1] = True
    edges[a] = (w1, c2)
    edges[b] = (w2, c1)
  return from_biadjacency(adj)


def _check_sizes(num_workers, load):
  if not isinstance(num_workers, (int, np.integer)) or num_workers < 1:
    raise ParamError(f"num_workers must be a positive integer, got {num_workers!r}.",
                     "num_workers")
  if not isinstance(load, (int, np.integer)) or not 1 <= load <= num_workers:
    raise ParamError(
        f"load must be an integer in 1..num_workers={num_workers}, got {load!r}.", "load")


@ASSIGNMENTS.register("expander")
def expander(num_workers: int, load: int, seed: int = 0) -> Assignment:
  """A Ramanujan ``load``-regular bipartite assignment, ``N = m``: worker ``j`` holds its
  neighbours.

  The graph is networkx's ``random_regular_expander_graph(m, load)``: a simple
  ``load``-regular graph (``load/2`` random permutations) kept only once networkx
  certifies it Ramanujan, every non-trivial eigenvalue ``|λ| < 2√(load−1)``.
  Worker ``j`` holds the chunks ``i`` adjacent to vertex ``j`` (the bipartite double
  cover), so the biadjacency's second singular value, the ``λ₂`` of Raviv et al.'s
  bound (:func:`jaxgc.spectral.raviv_bound`), obeys the same ``2√(load−1)``.

  Why this one: networkx's explicit expanders do not give a sparse regular
  assignment at useful sizes. ``margulis_gabber_galil_graph`` and
  ``chordal_cycle_graph`` are multigraphs with self-loops (a worker would hold a
  chunk twice, and merging the copies makes the load irregular), and
  ``paley_graph`` has load ``(p−1)/2``, half of the workers. Any ``m > load``
  works here; ``load`` must be even. Chunks per worker come in ascending order.
  """
  import networkx as nx  # pylint: disable=import-outside-toplevel
  _check_sizes(num_workers, load)
  if load % 2 or load < 2 or load >= num_workers:
    raise ParamError(
        f"expander needs an even load with 2 <= load < num_workers={num_workers} (it is "
        f"built from load/2 permutations), got load={load}. Use an even load, or "
        "random_regular() for an odd one.", "load")
  # Its rejection sampler needs ~e^{load} tries for disjoint cycles; networkx allows 100.
  graph = nx.random_regular_expander_graph(num_workers, load, seed=seed, max_tries=100_000)
  adj = nx.to_numpy_array(graph, nodelist=range(num_workers)) != 0
  return from_biadjacency(adj)

"""The partial-straggler protocol (PROTOCOL.md §2): the paper's contribution.

The PS fixes a decoding matrix ``A ∈ R^{ℓ×m}``. At state ``k``, for each chunk ``i``
with finishers ``S_i``, it takes the minimum-norm ``B_i = pinv(A[:, S_i])``, so
``A[:, S_i] B_i = I_ℓ`` when ``|S_i| ≥ ℓ`` (exact) and the orthogonal projector of
rank ``|S_i|`` otherwise (least-squares optimal, deadline mode).
"""
from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxgc import timing
from jaxgc.assignments import Assignment
from jaxgc.errors import ParamError
from jaxgc.protocols.base import Coefficients, Protocol
from jaxgc.protocols.dynamic_ell import check_ells

__all__ = ["PartialStraggler", "DynamicEll", "MAX_RANK_CHECKS", "decoding_candidates",
           "check_full_rank", "condition_numbers", "min_norm_solve", "holder_columns",
           "holder_condition_numbers", "holder_solve"]

_MATRICES = ("auto", "ones", "gaussian", "orthogonal")
MAX_RANK_CHECKS = 100_000   # ℓ-subsets of holder sets checked exhaustively; sampled beyond


def decoding_candidates(kind, ell: int, m: int, num_candidates: int, seed: int) -> np.ndarray:
  """Candidate decoding matrices ``[K, ℓ, m]`` (float64).

  ``ones``: ``ℓ = 1`` only, ``A = 1ᵀ`` (every ``B_i`` averages, condition number 1).
  ``gaussian``: i.i.d. normal. ``orthogonal``: a random frame with orthonormal rows.
  """
  rng = np.random.default_rng(seed)
  if kind == "ones":
    if ell != 1:
      raise ParamError("decoding_matrix='ones' has rank 1 and only works for ell=1; "
                       "use 'orthogonal' or 'gaussian' for ell > 1.", "decoding_matrix")
    return np.ones((1, 1, m))
  g = rng.standard_normal((num_candidates, m, ell))
  if kind == "gaussian":
    return np.swapaxes(g, 1, 2)
  q, _ = np.linalg.qr(g)
  return np.swapaxes(q, 1, 2) * np.sqrt(m / ell)  # unit-norm columns on average


def ell_subsets(assignment: Assignment, ell: int, limit: int, seed: int = 0) -> np.ndarray:
  """Distinct ``ℓ``-subsets of the chunks' holder sets ``W(i)``, ``[S, ℓ]`` worker ids.

  Exact decoding at every state with all ``c_i ≥ ℓ`` needs ``A[:, T]`` of full
  rank for each of them. All of them when there are at most ``limit``, else
  ``limit`` random ones.
  """
  holder_sets = {tuple(int(w) for w in row if w >= 0) for row in assignment.holders[0]}
  total = sum(math.comb(len(h), ell) for h in holder_sets)
  if total <= limit:
    subsets = {t for h in holder_sets for t in itertools.combinations(h, ell)}
    return np.array(sorted(subsets), np.int64).reshape(-1, ell)
  rng = np.random.default_rng(seed)
  sets = sorted(holder_sets)
  picks = rng.integers(0, len(sets), limit)
  return np.stack([np.sort(rng.choice(sets[i], ell, replace=False)) for i in picks])


def check_full_rank(cands: np.ndarray, assignment: Assignment, rcond: float) -> None:
  """Raises unless every candidate ``A`` ``[ℓ, m]`` has rank ``ℓ`` on every ``ℓ``-subset
  of a chunk's holders (in the solve's own threshold ``s_min > rcond · s_max``).

  Otherwise a state with every ``c_i ≥ ℓ`` could decode with an ``O(1)`` error
  while ``is_decodable`` (a coverage count) calls it exact.
  """
  ell = cands.shape[1]
  subsets = ell_subsets(assignment, ell, MAX_RANK_CHECKS)
  sub = cands[:, :, subsets]                                   # [K, ℓ, S, ℓ]
  s = np.linalg.svd(np.moveaxis(sub, 2, 1), compute_uv=False)  # [K, S, ℓ]
  bad = ~(s[..., -1] > rcond * s[..., 0])
  if bad.any():
    k, t = map(int, np.argwhere(bad)[0])
    workers = subsets[t].tolist()
    chunk = int(np.nonzero(assignment.biadjacency[workers].all(axis=0))[0][0])
    which = f"candidate {k} of decoding_matrix" if cands.shape[0] > 1 else "decoding_matrix"
    raise ParamError(
        f"{which} is rank-deficient on workers {workers}, which hold chunk {chunk}: "
        f"when exactly they finish it, coverage reaches ell={ell} but the decode would be "
        "off by O(1). Use a matrix whose every ell columns among a chunk's holders are "
        "linearly independent, e.g. decoding_matrix='orthogonal' or 'gaussian'.", "decoding_matrix")


def condition_numbers(a, finished):
  """``cond(A[:, S_i])`` on rank ``min(|S_i|, ℓ)``, ``[N]``: singular values only.

  Same values as :func:`min_norm_solve`'s without the solve, so candidate
  matrices are ranked with this and only the winner is solved.
  Args: ``a`` ``[ℓ, m]``; ``finished`` bool ``[m, N]`` (``j ∈ S_i``).
  """
  return _columns_condition(_dense_columns(a, finished), jnp.sum(finished, axis=0))


def holder_columns(a, workers, finished):
  """``A[:, S_i]ᵀ`` restricted to chunk ``i``'s holders: ``[N, r, ℓ]``, zero rows outside ``S_i``.

  ``workers`` int ``[N, r]`` (``assignment.holders[0]``, ``-1`` padded) and
  ``finished`` bool ``[N, r]`` (holder ``q`` of chunk ``i`` has finished it). Only
  holders can be in ``S_i``, so this is the dense ``[N, m, ℓ]`` with its all-zero
  rows left out: the same singular values and pinv at ``r/m`` of the memory.
  """
  return jnp.where(finished[..., None], a.T[jnp.maximum(workers, 0)], 0)


def holder_condition_numbers(a, workers, finished):
  """:func:`condition_numbers` from the holders' view (``[N, r]`` as in :func:`holder_columns`)."""
  return _columns_condition(holder_columns(a, workers, finished), jnp.sum(finished, axis=-1))


def holder_solve(a, workers, finished, rcond):
  """:func:`min_norm_solve` from the holders' view: ``B`` ``[N, r, ℓ]`` and cond ``[N]``.

  ``B[i, q]`` is the coefficient row of holder ``workers[i, q]`` for chunk ``i``.
  """
  return _columns_solve(holder_columns(a, workers, finished), jnp.sum(finished, axis=-1),
                        jnp.max(a[0] ** 2), rcond)


def _dense_columns(a, finished):
  return jnp.where(finished.T[:, :, None], a.T[None], 0)           # A_{S_i}^T: [N, m, ℓ]


def _columns_condition(mat, cov):
  return _condition(_singular_values(mat), jnp.minimum(cov, mat.shape[-1]))


def _rotate2(mat):
  """One Jacobi rotation of the two columns of ``[..., m, 2]``, which makes them orthogonal.

  Returns the rotated columns ``(big, small)``, their squared norms and ``V``
  ``[..., 2, 2]`` (columns: right singular vectors, in the same order). The
  norms come from the columns themselves (one-sided Jacobi), so the singular
  values' absolute error is ``O(eps·s_max)``, as for LAPACK's SVD.
  """
  c1, c2 = mat[..., 0], mat[..., 1]
  a, b, d = jnp.sum(c1 * c1, -1), jnp.sum(c1 * c2, -1), jnp.sum(c2 * c2, -1)
  # tan θ of the rotation zeroing the Gram matrix's off-diagonal (Golub & Van Loan, sym.schur2).
  off = b != 0
  zeta = (d - a) / (2 * jnp.where(off, b, 1))
  t = jnp.where(zeta >= 0, 1.0, -1.0) / (jnp.abs(zeta) + jnp.sqrt(1 + zeta * zeta))
  t = jnp.where(off, t, 0.0)
  c = jax.lax.rsqrt(1 + t * t)
  sn = c * t
  w1, w2 = c[..., None] * c1 - sn[..., None] * c2, sn[..., None] * c1 + c[..., None] * c2
  n1, n2 = jnp.sum(w1 * w1, -1), jnp.sum(w2 * w2, -1)
  first = n1 >= n2
  pick = lambda x, y: jnp.where(first[..., None], x, y)
  v1, v2 = jnp.stack([c, -sn], -1), jnp.stack([sn, c], -1)
  v = jnp.stack([pick(v1, v2), pick(v2, v1)], -1)
  return pick(w1, w2), pick(w2, w1), jnp.maximum(n1, n2), jnp.minimum(n1, n2), v


def _svd(mat):
  """Thin SVD ``mat = U diag(s) Vᵀ`` of ``[..., m, ℓ]``, as ``(W = U diag(s), s, V)``,
  ``s`` descending.

  For ``ℓ = 2`` a closed form (:func:`_rotate2`): a few fused elementwise passes
  instead of one LAPACK call per chunk, which on CPU dominate the PS's per-step work.
  """
  if mat.shape[-1] != 2:
    u, s, vt = jnp.linalg.svd(mat, full_matrices=False)
    return u * s[..., None, :], s, jnp.swapaxes(vt, -1, -2)
  big, small, nb, _, v = _rotate2(mat)
  # The angle is only eps-accurate: the small column keeps an O(eps·s_max) part
  # along the big one, which A_S·B would amplify by cond². One Gram-Schmidt step
  # removes it, so A_S·B − I is O(eps·cond), as with LAPACK.
  small = small - (jnp.sum(big * small, -1) / jnp.where(nb > 0, nb, 1))[..., None] * big
  s = jnp.sqrt(jnp.stack([nb, jnp.sum(small * small, -1)], -1))
  return jnp.stack([big, small], -1), s, v


def _singular_values(mat):
  """Singular values of ``[..., m, ℓ]``, descending (closed form for ``ℓ = 2``)."""
  if mat.shape[-1] != 2:
    return jnp.linalg.svd(mat, compute_uv=False)
  _, _, nb, ns, _ = _rotate2(mat)
  return jnp.sqrt(jnp.stack([nb, ns], -1))


def _condition(s, rank):
  # A tiny singular value dropped by the solve's threshold must still count.
  s_last = jnp.take_along_axis(s, jnp.maximum(rank - 1, 0)[:, None], axis=-1)[:, 0]
  return jnp.where(rank > 0, s[:, 0] / s_last, 1.0)


def min_norm_solve(a, finished, rcond):
  """``B_i = pinv(A[:, S_i])`` for all chunks at once, by SVD.

  Args:
    a: ``[ℓ, m]``; finished: bool ``[m, N]`` (``j ∈ S_i``).
  Returns:
    ``B`` ``[N, m, ℓ]`` (zero rows outside ``S_i``) and ``cond(A[:, S_i])`` over its
    ``min(|S_i|, ℓ)`` leading singular values, ``[N]``. :func:`holder_solve` is
    the same solve on the holders' rows only, which is what scales.
  """
  return _columns_solve(_dense_columns(a, finished), jnp.sum(finished, axis=0),
                        jnp.max(a[0] ** 2), rcond)


def _columns_solve(mat, cov, scale, rcond):
  """pinv of each ``mat[i]`` ``[rows, ℓ]`` (``A_{S_i}ᵀ``, zero rows outside ``S_i``), transposed.

  ``cov`` ``[N]``: ``|S_i|``; ``scale``: ``max_j A[0, j]²``, the ``ℓ = 1`` threshold's unit.
  """
  ell = mat.shape[-1]
  if ell == 1:
    # pinv of a row vector is v / ‖v‖², and its condition number is 1: no SVD needed.
    sq = jnp.sum(mat[..., 0] ** 2, axis=1)
    ok = sq > rcond * scale
    unit = mat / jnp.where(ok, sq, 1.0)[:, None, None] * ok[:, None, None]
    return unit, jnp.ones(sq.shape, mat.dtype)
  w, s, v = _svd(mat)                                              # mat = (W/s) diag(s) Vᵀ
  # Rank is |S_i| generically; the threshold catches structured A (e.g. 0/1 colourings).
  keep = (jnp.arange(ell)[None] < cov[:, None]) & (s > rcond * s[:, :1])
  sinv2 = jnp.where(keep, 1.0 / jnp.where(keep, s * s, 1.0), 0.0)
  b = jnp.einsum("nmk,nk,nlk->nml", w, sinv2, v)                    # U S⁻¹ Vᵀ
  return b, _condition(s, jnp.minimum(cov, ell))


class PartialStraggler(Protocol):
  """Partial-straggler gradient coding with communication parameter ``ℓ``.

  Args:
    assignment: the ordered chunk lists.
    ell: each worker sends ``⌈d/ℓ⌉`` numbers; exact once every ``c_i ≥ ℓ``.
    decoding_matrix: ``"auto"`` (``ones`` for ``ℓ=1``, else ``orthogonal``),
      ``"ones"``, ``"gaussian"``, ``"orthogonal"``, or an array ``[ℓ, m]`` / ``[K, ℓ, m]``.
      An array must have rank ``ℓ`` on every ``ℓ`` of a chunk's holders (checked
      here, exhaustively up to :data:`MAX_RANK_CHECKS` subsets), so that
      ``is_decodable`` implies an exact decode.
    num_candidates: with several random candidates, the PS picks, per state, the
      one whose worst ``cond(A[:, S_i])`` is smallest (it knows the state before
      any gradient is sent). Default 8 for random kinds.
    seed: for the random candidates.
    dtype: arithmetic of the solve (float32, or float64 with x64 enabled).
  """

  name = "partial_straggler"
  reports_condition = True

  def __new__(cls, assignment=None, ell=1, *args, **kwargs):
    # A set of ells is a DynamicEll (PROTOCOL.md §14), which __init__ then builds.
    del assignment, args, kwargs
    if cls is PartialStraggler and isinstance(ell, (tuple, list)):
      return super().__new__(DynamicEll)
    return super().__new__(cls)

  def __init__(self, assignment: Assignment, ell: int = 1, *, decoding_matrix="auto",
               num_candidates: int | None = None, seed: int = 0, dtype=jnp.float32,
               **options):
    super().__init__(assignment, ell, dtype=dtype, **options)
    m = assignment.num_workers
    if isinstance(decoding_matrix, str):
      if decoding_matrix not in _MATRICES:
        raise ParamError(f"unknown decoding_matrix {decoding_matrix!r}; choose one of "
                         f"{_MATRICES} or pass an array [ell, m].", "decoding_matrix")
      kind = decoding_matrix
      if kind == "auto":
        kind = "ones" if ell == 1 else "orthogonal"
      k = num_candidates if num_candidates is not None else (1 if kind == "ones" else 8)
      if k < 1:
        raise ParamError(f"num_candidates must be >= 1, got {k}.", "num_candidates")
      cands = decoding_candidates(kind, ell, m, k, seed)
    else:
      cands = np.asarray(decoding_matrix, np.float64)
      if cands.ndim == 2:
        cands = cands[None]
      if cands.ndim != 3 or cands.shape[1:] != (ell, m):
        raise ParamError(f"decoding_matrix must be [ell, m] = [{ell}, {m}] or "
                         f"[K, ell, m], got shape {np.shape(decoding_matrix)}.", "decoding_matrix")
      if not np.isfinite(cands).all():
        raise ParamError("decoding_matrix contains NaN or Inf.", "decoding_matrix")
    # pinv's threshold, relative to the [r, ℓ] matrix actually inverted (r = max
    # replication); relative to m it grew with the pod and dropped good directions.
    self._rcond = float(10 * max(int(assignment.replication.max()), ell)
                        * jnp.finfo(self.dtype).eps)
    if not isinstance(decoding_matrix, str):
      # Random kinds are generic; a user's matrix may be structured (e.g. 0/1).
      check_full_rank(np.asarray(cands, np.dtype(self.dtype.name)), assignment, self._rcond)
    self.candidates = jnp.asarray(cands, self.dtype)
    # Slot (j, t) holds chunk order[j, t], whose holder row lists j at column q[j, t].
    workers, slots = assignment.holders
    valid = workers >= 0
    q = np.zeros(assignment.order.shape, np.int32)
    q[workers[valid], slots[valid]] = np.nonzero(valid)[1]
    self._holder_column = q

  def _finished_holders(self, counts):
    """bool ``[N, r]``: holder ``q`` of chunk ``i`` has finished it (in
    ``assignment.holders`` order)."""
    workers, slots = (jnp.asarray(h) for h in self.assignment.holders)
    k = jnp.asarray(counts)[jnp.maximum(workers, 0)]
    return (workers >= 0) & (slots < k)

  def _best_candidate(self, fin):
    """The candidate ``A`` whose worst ``cond(A[:, S_i])`` is smallest, and that worst cond."""
    workers = jnp.asarray(self.assignment.holders[0])
    # All candidates at once: [K, N, r, ℓ] is small (16 MB at m = 4096, load 32, ℓ = 4).
    conds = jnp.max(jax.vmap(lambda c: holder_condition_numbers(c, workers, fin))(self.candidates),
                    axis=-1)
    best = jnp.argmin(conds)
    return self.candidates[best], conds[best]

  def _solve(self, counts):
    """(enc [m, max_load, ℓ], A [ℓ, m], cond [N]) for the best candidate at this state.

    Works on each chunk's holders only (``[N, r, ℓ]``, ``r`` = max replication),
    never on ``[N, m, ℓ]``: at ``m = 4096`` the latter is gigabytes per candidate.
    """
    fin = self._finished_holders(counts)
    a = self.candidates[0]
    if self.candidates.shape[0] > 1 and self.ell > 1:   # for ℓ = 1 every cond is 1
      a, _ = self._best_candidate(fin)
    b, cond = holder_solve(a, jnp.asarray(self.assignment.holders[0]), fin,
                           self._rcond)                                # [N, r, ℓ]
    order = jnp.maximum(jnp.asarray(self.assignment.order), 0)
    enc = b[order, jnp.asarray(self._holder_column)]                    # [m, max_load, ℓ]
    enc = jnp.where(self.finished_slots(counts)[..., None], enc, 0).astype(self.dtype)
    return enc, a, cond

  def solve(self, counts) -> Coefficients:
    """:class:`Coefficients` at state ``counts`` ``[m]``; ``condition`` is the worst
    ``cond(A[:, S_i])`` of the chosen candidate, from the same solve."""
    counts = self.check_counts(counts)
    enc, a, cond = self._solve(counts)
    senders = (counts > 0) & jnp.any(a != 0, axis=0)   # a zero column of A has nothing to send
    dec = jnp.where(senders[None, :], a, 0).astype(self.dtype)
    return Coefficients(enc, dec, senders, jnp.max(cond))

  def condition_number(self, counts):
    """Worst ``cond(A[:, S_i])`` over chunks at this state (the numerical-risk diagnostic).

    Candidates' singular values only: cheaper than ``solve(counts).condition``. A concrete
    state runs one compiled program, shared as the solve's is.
    """
    return self._compiled("_worst_condition", counts)

  def _worst_condition(self, counts):
    return self._best_candidate(self._finished_holders(self.check_counts(counts)))[1]

  def is_decodable(self, counts):
    counts = self.check_counts(counts, batched=True, what="is_decodable")
    return jnp.min(self.coverage(counts), axis=-1) >= self.ell

  def completion_time(self, durations):
    """``t* = max_i (ℓ-th smallest of {F_{j,pos_j(i)} : j ∈ W(i)})``, ``[...]``."""
    return self.completion_from_finish(timing.finish_times(self.check_durations(durations)))

  def completion_from_finish(self, f):
    """:meth:`completion_time` from finish times ``F [..., m, max_load]`` (``inf``: never)."""
    m, width = self.assignment.num_workers, self.assignment.max_load
    workers, slots = self.assignment.holders
    idx = np.where(workers >= 0, workers * width + slots, m * width)   # pad → the inf column
    flat = f.reshape(*f.shape[:-2], m * width)
    flat = jnp.concatenate([flat, jnp.full((*flat.shape[:-1], 1), jnp.inf, flat.dtype)], -1)
    per_chunk = timing.kth_smallest(flat[..., jnp.asarray(idx)], self.ell)
    return jnp.max(per_chunk, axis=-1)


class DynamicEll(PartialStraggler):
  """Partial-straggler coding whose ``ℓ`` is chosen per step from ``ells``.

  As a :class:`~jaxgc.protocols.Protocol` (``solve``, ``is_decodable``,
  ``completion_time``, ``message_size``) it is the member of the smallest ``ℓ``:
  the exact-recovery condition and the largest message. The step uses
  :attr:`members` and :func:`choose_ell`. Options as :class:`PartialStraggler`'s;
  a ``decoding_matrix`` array cannot serve several ``ℓ`` (use a kind).
  """

  def __init__(self, assignment: Assignment, ell=(1, 2, 4), *, decoding_matrix="auto",
               num_candidates: int | None = None, seed: int = 0, dtype=jnp.float32,
               **options):
    ells = check_ells(ell)
    if not isinstance(decoding_matrix, str):
      raise ParamError("decoding_matrix must be a kind ('auto', 'orthogonal', 'gaussian') "
                       f"when ell is a set {ells}: an array fits one ell only.",
                       "decoding_matrix")
    for e in ells:
      assignment.check_ell(e)
    kw = dict(decoding_matrix=decoding_matrix, num_candidates=num_candidates, seed=seed,
              dtype=dtype)
    super().__init__(assignment, ells[0], **kw, **options)
    self.ells = ells
    # 'ones' fits ell = 1 only; the larger ells take the 'auto' kind's frame.
    self.members = tuple(PartialStraggler(assignment, e, **dict(
        kw, decoding_matrix="auto" if e > 1 and decoding_matrix == "ones" else decoding_matrix))
        for e in ells)

  def __repr__(self):
    return f"{type(self).__name__}({self.assignment!r}, ell={self.ells})"

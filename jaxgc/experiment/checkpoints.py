"""A run's checkpoints, in one place: save, restore, the logical state, integrity.

* **Sealed in the commit.** orbax writes a checkpoint to a temporary folder and
  renames it into place. Just before the rename, process 0 writes ``SHA256SUMS``
  into that folder (orbax's ``post_finalization_callback``): the sha256 of every
  file of the checkpoint's items, in ``sha256sum -c`` format. So a checkpoint that
  exists under its final name is sealed.
* **Verified before use.** A restore checks the manifest before loading anything.
  A corrupt checkpoint (a file missing or changed, a damaged manifest) and an
  *unsealed* one newer than the newest sealed one move to ``broken_checkpoints/``
  with a note. An unsealed checkpoint (an older jaxgc's, or a manifest deleted by
  hand) is restored only when no sealed one exists, with a note naming it unverified.
* **Free of the layout.** A checkpoint holds the *logical* state: the per-worker
  arrays of the step's plan cut to the ``m`` real workers (:func:`logical_state`;
  the phantom workers that pad ``m`` to a multiple of the device count are zeros
  and never send), so it restores on any device count (:func:`layout_state`).
* **Never over results.** A workdir where no checkpoint restores refuses to start
  over, in one line naming the cause and ``--restart``, if that would lose results:
  it committed checkpoints before (:data:`COMMITTED`) and holds training steps in
  ``metrics.jsonl``, or it holds ``summary.json`` or broken checkpoints. A run killed
  before its first checkpoint starts over with a note.
"""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxgc.backends import spmd
from jaxgc.experiment import runs
from jaxgc.experiment.config import ConfigError
from jaxgc.experiment.files import write_atomic

__all__ = ["MANIFEST", "UNSEALED", "COMMITTED", "write_manifest", "check_manifest", "Checkpoints",
           "CHECKPOINT_FORMAT", "logical_state", "layout_state", "restore", "save"]

# meta["format"] of a checkpoint holding the logical state (absent: an older, padded one).
CHECKPOINT_FORMAT = 2

# -- integrity -----------------------------------------------------------------------------

MANIFEST = "SHA256SUMS"   # `sha256sum -c SHA256SUMS` inside a checkpoint checks it too
UNSEALED = "unsealed"     # check_manifest's verdict for a checkpoint without a manifest

# In the workdir, written once with the first checkpoint committed there: checkpoints were
# kept, so a workdir without one that restores has lost them (it never starts over).
COMMITTED = "checkpoints.committed"

# orbax's commit bookkeeping, written after the manifest (the commit timestamp, the
# success marker): not the checkpoint's content, and a damaged one fails the restore.
_BOOKKEEPING = ("_CHECKPOINT_METADATA", "commit_success.txt")


def _digest(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _files(directory: str) -> list[str]:
  out = []
  for root, _, names in os.walk(directory):
    out += [os.path.relpath(os.path.join(root, n), directory) for n in names]
  return sorted(f for f in out if f not in (MANIFEST, *_BOOKKEEPING) and ".tmp" not in f)


def write_manifest(directory: str) -> None:
  """Writes ``directory/SHA256SUMS``: the sha256 of every file under ``directory``."""
  lines = [f"{_digest(os.path.join(directory, f))}  {f}\n" for f in _files(directory)]
  write_atomic(os.path.join(directory, MANIFEST), "".join(lines))


def check_manifest(directory: str) -> str | None:
  """``None`` if every file listed in ``directory/SHA256SUMS`` is there with its hash,
  :data:`UNSEALED` if there is no manifest, else why it fails (the first bad file)."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    return UNSEALED
  try:
    with open(path) as f:
      entries = [line.rstrip("\n").split("  ", 1) for line in f if line.strip()]
  except (OSError, UnicodeDecodeError) as e:
    return f"its {MANIFEST} does not read ({e})"
  if not entries or any(len(e) != 2 or len(e[0]) != 64 for e in entries):
    return f"its {MANIFEST} is damaged"
  for digest, name in entries:
    file = os.path.join(directory, name)
    if not os.path.isfile(file):
      return f"{name} is missing"
    if _digest(file) != digest:
      return f"{name} does not match its sha256 in {MANIFEST}"
  return None


# -- orbax checkpoints ---------------------------------------------------------------------

class Checkpoints:
  """Orbax checkpoints of the training state plus a small JSON ``meta``, sealed with sha256.

  Process 0 (``lead``) seals each save inside its commit (see the module docstring).
  """

  def __init__(self, directory: str, every: int, keep: int, lead: bool = True):
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    self._ocp, self.directory, self.lead = ocp, directory, lead
    self._saving: int | None = None     # the step whose save is in flight
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=every, create=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._seal_commit))
    self.manager = ocp.CheckpointManager(directory, options=self._options)

  def _path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _seal_commit(self) -> None:
    """orbax's post-finalization callback (process 0, the save's thread): the items are
    written and the folder is not yet renamed, so the manifest commits with them."""
    if self._saving is None:
      return
    suffix = self._ocp.path.atomicity.TMP_DIR_SUFFIX
    for tmp in glob.glob(glob.escape(self._path(self._saving) + suffix) + "*"):
      write_manifest(tmp)
    marker = os.path.join(os.path.dirname(self.directory), COMMITTED)
    if not os.path.exists(marker):     # (before the rename: a kill between errs safe)
      write_atomic(marker, f"first committed checkpoint: step {self._saving}\n")

  def restore(self, abstract_for: Callable[[dict], Any]
              ) -> tuple[Any, dict, list[tuple[int, str]]]:
    """The newest checkpoint that verifies and restores: ``(state or None, meta, set_aside)``.

    ``abstract_for(meta)`` gives the abstract state to restore (shapes, dtypes,
    shardings) from the checkpoint's ``meta``. Sealed checkpoints come first; an
    unsealed one is tried only when no sealed one restores (``meta["unverified"]``
    then names its step). ``set_aside`` lists ``(step, reason)`` of the corrupt ones and of
    the unsealed ones newer than the one restored; they move to ``broken_checkpoints/``.

    Raises:
      ConfigError: a checkpoint of an older jaxgc (``meta`` without ``format``),
        laid out for another device count, does not restore here (it is kept).
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    verdicts = {step: check_manifest(self._path(step)) for step in steps}
    aside = [(s, f"corrupt: {v}") for s, v in verdicts.items() if v not in (None, UNSEALED)]
    found: tuple[int, Any, dict] | None = None
    for unverified in (False, True):
      for step in (s for s in steps if verdicts[s] == (UNSEALED if unverified else None)):
        state, meta, failure = self._load(step, abstract_for)
        if failure is None:
          found = (step, state, {**meta, "unverified": step} if unverified else meta)
          break
        aside.append((step, failure))
      if found:
        break
    restored_step = found[0] if found else -1
    aside += [(s, f"unsealed: it has no {MANIFEST}, so its data cannot be verified")
              for s in steps if verdicts[s] == UNSEALED and s > restored_step
              and s not in {a for a, _ in aside}]
    aside.sort(reverse=True)
    if aside:
      self._remove([s for s, _ in aside])
    return (found[1], found[2], aside) if found else (None, {}, aside)

  def _load(self, step: int, abstract_for) -> tuple[Any, dict, str | None]:
    """``(state, meta, None)``, or ``(None, meta, why)`` if checkpoint ``step`` does not
    restore."""
    ocp, meta = self._ocp, {}
    try:
      meta = dict(self.manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"] or {})
      state = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_for(meta))))["state"]
      return state, meta, None
    except Exception as e:  # pylint: disable=broad-except
      # Anything that stops a restore (garbage metadata, missing items) makes the
      # checkpoint unusable; the older ones may still be fine.
      reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
      if meta and "format" not in meta:
        raise ConfigError(
            f"--workdir={os.path.dirname(self.directory)}",
            f"checkpoint {step} was written by an older jaxgc, whose checkpoints depend "
            f"on the device count, and does not restore on this one ({reason[:120]}); "
            "rerun with the --config.num_devices it was written with, or add --restart "
            "to start over.") from None
      return None, meta, reason

  def _remove(self, steps):
    """Moves checkpoints to ``broken_checkpoints/`` (kept for a look, out of the way of
    the steps that will be saved again)."""
    self.manager.close()
    aside = os.path.join(os.path.dirname(self.directory), "broken_checkpoints")
    if self.lead:
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        target, n = os.path.join(aside, str(step)), 1
        while os.path.exists(target):
          target, n = os.path.join(aside, f"{step}.{n}"), n + 1
        shutil.move(self._path(step), target)
    _sync("jaxgc checkpoints moved aside")
    self.manager = self._ocp.CheckpointManager(self.directory, options=self._options)

  def due(self, step: int) -> bool:
    """Whether :meth:`save` at ``step`` would save (the interval is reached)."""
    return self.manager.should_save(step)

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict, force: bool = False) -> None:
    ocp = self._ocp
    if not (force or self.manager.should_save(step)):
      return
    self.manager.wait_until_finished()   # one save in flight: _saving names it
    self._saving = step if self.lead else None
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


# -- the logical state ---------------------------------------------------------------------

# (path in the plan, worker axis) of the plan's padded per-worker arrays.
_WORKER_AXES = ((("lost",), 0), (("corrupt",), 0), (("solve", "enc"), 0), (("solve", "dec"), 1),
                (("solve", "senders"), 0))


def _map_plan(state, layout, fn):
  plan = state.plan
  if not isinstance(plan, spmd.Plan) or not isinstance(layout, spmd.WorkerLayout):
    return state
  for path, axis in _WORKER_AXES:
    if len(path) == 1:
      plan = plan._replace(**{path[0]: fn(getattr(plan, path[0]), axis)})
    else:
      solve = plan.solve
      plan = plan._replace(solve=solve._replace(**{path[1]: fn(getattr(solve, path[1]), axis)}))
  return state.replace(plan=plan)


def logical_state(state, layout):
  """``state`` with the plan's per-worker arrays cut from ``m_pad`` to the ``m`` real
  workers (what a checkpoint holds); a state without a plan is returned as it is."""
  def cut(x, axis):
    return jax.lax.slice_in_dim(x, 0, layout.m, axis=axis)
  return _map_plan(state, layout, cut)


def layout_state(state, layout, sharding=None):
  """The inverse of :func:`logical_state`: per-worker arrays padded with zeros (phantom
  workers: no coefficients, never send) to ``layout.m_pad``, placed with ``sharding``."""
  def pad(x, axis):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, layout.m_pad - x.shape[axis])
    out = jnp.pad(x, widths)
    return out if sharding is None else jax.device_put(out, sharding)
  return _map_plan(state, layout, pad)


# -- a run's checkpoints -------------------------------------------------------------------

def _layout(exp):
  layout = exp.step.layout
  return layout if isinstance(layout, spmd.WorkerLayout) else None


def _logged_steps(workdir: str) -> int:
  path = os.path.join(workdir, "metrics.jsonl")
  return sum("loss" in r for r in runs.read_metrics(workdir)) if os.path.exists(path) else 0


def _refuse_start_over(workdir: str, set_aside: bool) -> ConfigError | None:
  """The error for a start from step 0 that would lose a run's results, if it would.

  Starting over is safe only where nothing could ever have been resumed: no checkpoint
  was ever committed here (:data:`COMMITTED` is absent: a run killed before its first
  checkpoint, or run without checkpoints) and the run did not finish. The steps it
  logged are then recomputed, identically.
  """
  committed = os.path.exists(os.path.join(workdir, COMMITTED))
  logged = _logged_steps(workdir)
  left = [name for name, there in (
      ("broken checkpoints", set_aside or os.path.isdir(
          os.path.join(workdir, "broken_checkpoints"))),
      (f"metrics.jsonl with {logged} training step(s)", committed and logged > 0),
      ("summary.json", os.path.exists(os.path.join(workdir, "summary.json"))),
  ) if there]
  if not left:
    if logged:
      runs.note(f"{workdir}: no checkpoint was committed before the run stopped; starting "
                f"over from step 0 (its {logged} logged step(s) are computed again).")
    return None
  cause = ("no checkpoint restores" + (" (checkpoints/ was deleted or emptied: checkpoints "
                                       "were committed here)" if committed and not set_aside
                                       else ""))
  return ConfigError(f"--workdir={workdir}", f"holds a run that cannot resume: {cause}, but "
                     f"it holds {' and '.join(left)}. Starting over would overwrite its "
                     "results; add --restart to start over in this workdir, or use a new "
                     "--workdir.")


def restore(exp, workdir: str, state, sharding, lead: bool):
  """``(state, checkpoints or None, meta)``: the newest checkpoint that restores, if any.

  Checkpoints hold the logical state (:func:`logical_state`), laid out here for
  this run's devices.

  Raises:
    ConfigError: no checkpoint restores, and starting over would lose results: the
      workdir committed checkpoints before and holds training steps in
      ``metrics.jsonl``, or it holds ``summary.json`` or broken checkpoints.
  """
  cfg, layout = exp.config, _layout(exp)
  if cfg.checkpoint_every <= 0:
    error = _refuse_start_over(workdir, False) if lead else None
    if error:
      raise error
    return state, None, {}
  ckpt = Checkpoints(os.path.join(workdir, "checkpoints"), cfg.checkpoint_every,
                     cfg.max_checkpoints, lead)

  def abstract_for(meta):
    logical = meta.get("format") == CHECKPOINT_FORMAT
    shapes = jax.eval_shape(lambda s: logical_state(s, layout) if logical else s, state)
    # Each leaf restores where this run keeps it: parameters and optimizer state sharded
    # over a group of devices on a 2-D mesh, the rest replicated. (A host step's state
    # mixes leaves placed on the mesh with fresh ones on one device; it restores all on
    # the mesh, which its jitted update takes together.)
    where = jax.tree.map(lambda x: getattr(x, "sharding", sharding) if exp.step.traced
                         else sharding, state)
    return jax.tree.map(lambda x, w: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=w),
                        shapes, where)

  restored, meta, set_aside = ckpt.restore(abstract_for)
  if lead:
    for step, reason in set_aside:
      runs.note(f"set aside checkpoint {step} (moved to broken_checkpoints/), it is not "
                f"restored: {reason}")
  if restored is None:
    error = _refuse_start_over(workdir, bool(set_aside))
    if error:
      ckpt.close()
      raise error
    return state, ckpt, meta
  if "unverified" in meta and lead:
    runs.note(f"restoring checkpoint {meta['unverified']} UNVERIFIED: it has no {MANIFEST} "
              "(an older jaxgc's, or deleted), and no sealed checkpoint restores.",
              kind="warning")
  if meta.get("format") == CHECKPOINT_FORMAT:
    restored = layout_state(restored, layout, sharding)
  if "membership" in meta and hasattr(exp.step, "resume_membership"):
    # The Ray step's workers (PROTOCOL.md §16): another cluster size re-forms at once.
    exp.step.resume_membership(meta["membership"], int(restored.step))
  return restored, ckpt, meta


def save(ckpt, exp, step: int, state, wall: float, force: bool = False,
         extra_meta: dict | None = None) -> None:
  """Saves the logical state at ``step`` (when due, or ``force``); ``extra_meta`` (JSON,
  e.g. the input iterator's state) goes into the checkpoint's ``meta``, and so does the
  Ray step's membership (epoch, workers, actors, load)."""
  if ckpt is not None and (force or ckpt.due(step)):
    membership = getattr(exp.step, "membership_record", None)
    ckpt.save(step, logical_state(state, _layout(exp)),
              {**(extra_meta or {}), "wall_time": wall, "format": CHECKPOINT_FORMAT,
               **({"membership": membership} if membership is not None else {})},
              force=force)

"""A workdir holds one run: its config, metrics log and checkpoints, crash-safe.

* ``config.json`` is written before anything else; a later invocation must ask
  for the same results-changing fields (:func:`open_workdir`).
* ``metrics.jsonl`` gets one line per step and per evaluation; on resume it is
  cut back to the restored step, and a line cut off by a crash is dropped.
* Checkpoints are orbax's (written to a temporary folder, then renamed). A
  restart takes the newest one that restores cleanly and removes the broken
  ones after it (:class:`Checkpoints`).
* Every other file is written to a temporary name and renamed into place, so
  a ``kill -9`` at any moment leaves either the old or the new version.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

from jaxgc.experiment.config import ConfigError, result_fields_differ

__all__ = [
    "OUTPUTS", "write_atomic", "read_metrics", "open_workdir", "clear_run", "save_config",
    "MetricsLog", "Checkpoints", "note",
]

# What a run writes into its workdir (config.json first, and removed last).
OUTPUTS = ("metrics.jsonl", "summary.json", "final_params.npz", "accuracy_vs_time.png",
           "comparison.json", "checkpoints", "broken_checkpoints", "config.json")


def note(message: str) -> None:
  """A one-line notice on stderr (resumes, skipped checkpoints, nothing to train)."""
  print(f"note: {message}", file=sys.stderr, flush=True)


def write_atomic(path: str, content: str | bytes) -> None:
  """Writes ``path`` through a temporary file and a rename (never half a file)."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb" if isinstance(content, bytes) else "w") as f:
    f.write(content)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _parse_lines(path: str) -> tuple[list[dict], int]:
  """Records of a JSONL log and how many bytes of it parse; a cut-off last line is dropped."""
  with open(path, "rb") as f:
    raw = f.read()
  records, good = [], 0
  lines = raw.split(b"\n")
  for i, line in enumerate(lines):
    if line.strip():
      try:
        records.append(json.loads(line))
      except ValueError:
        if i < len(lines) - 1 and any(l.strip() for l in lines[i + 1:]):
          raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from None
        break                          # a crash cut the last line short
    good += len(line) + 1
  return records, min(good, len(raw))


def read_metrics(workdir: str) -> list[dict]:
  """The records of ``workdir/metrics.jsonl`` (a cut-off last line is ignored)."""
  return _parse_lines(os.path.join(workdir, "metrics.jsonl"))[0]


def open_workdir(config, workdir: str, restart: bool = False) -> dict | None:
  """Checks that ``workdir`` can hold this run; returns the saved config (``None`` if new).

  Touches nothing (with ``restart`` the caller clears the old run with :func:`clear_run`
  once the new config has built).

  Raises:
    ConfigError: ``workdir`` is a file, or holds a run whose results-changing
      fields differ (the message names them and the fix).
  """
  flag = f"--workdir={workdir}"
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(flag, "is a file, not a directory; pass a directory (it is created "
                      "if missing).")
  path = os.path.join(workdir, "config.json")
  if restart:
    return None                      # cleared by clear_run once the config has built
  if not os.path.exists(path):
    leftovers = [n for n in ("metrics.jsonl", "checkpoints")
                 if os.path.exists(os.path.join(workdir, n))]
    if leftovers:
      raise ConfigError(flag, f"holds {' and '.join(leftovers)} but no config.json, so "
                        "whose run they are is unknown; use a new --workdir, or add "
                        "--restart to start over in this one.")
    return None
  try:
    with open(path) as f:
      saved = json.load(f)
  except ValueError:
    raise ConfigError(flag, "has an unreadable config.json; use a new --workdir, or add "
                      "--restart to start over in this one.") from None
  diffs = result_fields_differ(saved, json.loads(config.to_json()))
  if diffs:
    shown = ", ".join(f"{k} ({a!r} there, {b!r} asked)" for k, a, b in diffs[:6])
    more = f" and {len(diffs) - 6} more" if len(diffs) > 6 else ""
    raise ConfigError(flag, f"holds a run with a different config: {shown}{more}. Use a new "
                      "--workdir, or add --restart to start over in this one.")
  return saved


def clear_run(workdir: str) -> None:
  """Removes a previous run's outputs (``--restart``); ``config.json`` goes last, so a
  kill midway still refuses to mix runs."""
  for name in OUTPUTS:
    target = os.path.join(workdir, name)
    if os.path.isdir(target):
      shutil.rmtree(target)
    elif os.path.exists(target):
      os.remove(target)


def save_config(config, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  write_atomic(os.path.join(workdir, "config.json"), config.to_json(indent=2))


class MetricsLog:
  """``workdir/metrics.jsonl``, written by process 0; cut back to a resumed step."""

  def __init__(self, path: str, resume_step: int, enabled: bool):
    self.path, self.enabled, self.last = path, enabled, {}
    if not enabled:
      return
    kept, dropped = [], 0
    if resume_step > 0 and os.path.exists(path):
      records, _ = _parse_lines(path)
      kept = [r for r in records if r.get("step", 0) <= resume_step]
      dropped = len(records) - len(kept)
    if dropped:
      note(f"metrics.jsonl: dropped {dropped} line(s) after step {resume_step}, the "
           "restored checkpoint.")
    steps = [r for r in kept if "loss" in r]
    self.last = steps[-1] if steps else {}
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))

  def write(self, record: dict) -> None:
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")


class Checkpoints:
  """Orbax checkpoints of the training state plus a small JSON ``meta`` (wall time)."""

  def __init__(self, directory: str, every: int, keep: int):
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    self._ocp, self.directory = ocp, directory
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=every, create=True)
    self.manager = ocp.CheckpointManager(directory, options=self._options)

  def restore(self, abstract_state) -> tuple[Any, dict, list[tuple[int, str]]]:
    """The newest checkpoint that restores cleanly: ``(state or None, meta, skipped)``.

    ``skipped`` lists ``(step, reason)`` of newer broken ones, which move to
    ``broken_checkpoints/``.
    """
    ocp = self._ocp
    skipped = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        state, meta = out["state"], dict(out["meta"] or {})
      except Exception as e:  # pylint: disable=broad-except
        # Anything that stops a restore (emptied files, garbage metadata, missing
        # items) makes the checkpoint unusable; the older ones may still be fine.
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        skipped.append((step, reason))
        continue
      if skipped:
        self._remove([s for s, _ in skipped])
      return state, meta, skipped
    if skipped:
      self._remove([s for s, _ in skipped])
    return None, {}, skipped

  def _remove(self, steps):
    """Moves broken checkpoints to ``broken_checkpoints/`` (kept for a look, out of the way
    of the steps that will be saved again)."""
    self.manager.close()
    aside = os.path.join(os.path.dirname(self.directory), "broken_checkpoints")
    os.makedirs(aside, exist_ok=True)
    for step in steps:
      target, n = os.path.join(aside, str(step)), 1
      while os.path.exists(target):
        target, n = os.path.join(aside, f"{step}.{n}"), n + 1
      shutil.move(os.path.join(self.directory, str(step)), target)
    self.manager = self._ocp.CheckpointManager(self.directory, options=self._options)

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict, force: bool = False) -> None:
    ocp = self._ocp
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

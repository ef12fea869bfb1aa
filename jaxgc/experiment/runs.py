"""A workdir holds one run: its config, metrics log and checkpoints, crash-safe.

* ``config.json`` is written before anything else; a later invocation must ask
  for the same results-changing fields (:func:`open_workdir`).
* ``metrics.jsonl`` gets one line per step and per evaluation (non-finite numbers
  as ``null``); on resume it is cut back to the restored step, and lines that do
  not parse (cut off by a crash, or damaged) are dropped with a note.
* Checkpoints: :mod:`jaxgc.experiment.checkpoints` (sealed, verified, free of
  the device layout).
* Every other file is written to a temporary name and renamed into place, so
  a ``kill -9`` at any moment leaves either the old or the new version.
* One process at a time: ``lock`` holds an OS lock (``flock``) and names its
  holder (:class:`WorkdirLock`). A full or read-only disk is one line
  (:func:`disk_error`).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import shutil
import socket
import sys
import time

import numpy as np

from jaxgc.experiment import tensorboard
from jaxgc.experiment.config import ConfigError, result_fields_differ
from jaxgc.experiment.files import write_atomic

__all__ = [
    "OUTPUTS", "write_atomic", "read_metrics", "open_workdir", "clear_run", "save_config",
    "MetricsLog", "note", "json_line", "WorkdirLock", "disk_error", "lock_workdir",
    "hold_workdir",
]

# What a run writes into its workdir (config.json first, and removed last).
OUTPUTS = ("metrics.jsonl", "summary.json", "final_params.npz", "accuracy_vs_time.png",
           "comparison.json", "checkpoints", "checkpoints.committed", "broken_checkpoints",
           "tensorboard", "config.json")


def note(message: str, kind: str = "note") -> None:
  """A one-line notice on stderr (resumes, skipped checkpoints, nothing to train)."""
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  tqdm.write(f"{kind}: {message}", file=sys.stderr)   # on its own line, under a live bar
  sys.stderr.flush()


def _parse_lines(path: str) -> tuple[list[dict], list[int]]:
  """Records of a JSONL log and the (1-based) numbers of its lines that do not parse."""
  with open(path, "rb") as f:
    raw = f.read()
  records, bad = [], []
  for i, line in enumerate(raw.split(b"\n")):
    if line.strip():
      try:
        record = json.loads(line)
      except ValueError:
        record = None
      if isinstance(record, dict):
        records.append(record)
      else:
        bad.append(i + 1)              # cut off by a crash, or damaged
  return records, bad


def read_metrics(workdir: str) -> list[dict]:
  """The records of ``workdir/metrics.jsonl`` (lines that do not parse are skipped)."""
  return _parse_lines(os.path.join(workdir, "metrics.jsonl"))[0]


def json_line(record: dict) -> str:
  """``record`` as one line of JSON; NaN and ±Inf (not JSON) are written as ``null``."""
  def clean(v):
    if isinstance(v, float) and not math.isfinite(v):
      return None
    if isinstance(v, dict):
      return {k: clean(x) for k, x in v.items()}
    return [clean(x) for x in v] if isinstance(v, (list, tuple)) else v
  return json.dumps(clean(record), allow_nan=False) + "\n"


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
  """``workdir/metrics.jsonl``, written by process 0; cut back to a resumed step.

  Attributes:
    last: the last step record kept (``{}`` if none).
    eval_steps: the steps that have an evaluation line.
  """

  def __init__(self, path: str, resume_step: int, enabled: bool):
    self.path, self.enabled, self.last, self.eval_steps = path, enabled, {}, set()
    self.events: tensorboard.EventLog | None = None   # workdir/tensorboard/, its mirror
    if not enabled:
      return
    kept: list[dict] = []
    bad: list[int] = []
    dropped = 0
    if resume_step > 0 and os.path.exists(path):
      records, bad = _parse_lines(path)
      kept = [r for r in records if r.get("step", 0) <= resume_step]
      dropped = len(records) - len(kept)
    if bad:
      shown = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
      note(f"metrics.jsonl: dropped {len(bad)} line(s) that do not parse (line {shown}); "
           "steps and evaluations after the restored step are written again.")
    if dropped:
      note(f"metrics.jsonl: dropped {dropped} line(s) after step {resume_step}, the "
           "restored checkpoint.")
    steps = [r for r in kept if "loss" in r]
    self.last = steps[-1] if steps else {}
    self.eval_steps = {r.get("step") for r in kept if "loss" not in r}
    write_atomic(path, "".join(json_line(r) for r in kept))
    self.events = tensorboard.open_event_log(os.path.dirname(path), kept)

  def write(self, record: dict) -> None:
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json_line(record))
      if self.events is not None:
        self.events.write(record)

  def close(self) -> None:
    """Flushes and closes the event file (a run's files are all closed when it ends: the
    workdir's file system can then be unmounted or made read-only)."""
    if self.events is not None:
      self.events.close()


# -- one process per workdir ------------------------------------------------------------

_HELD: dict[str, list] = {}     # workdir -> [lock, depth]: this process's locks


@contextlib.contextmanager
def lock_workdir(workdir: str, create: bool = True):
  """Holds ``workdir``'s :class:`WorkdirLock` inside the block (re-entrant in a process).

  ``create=False``: a workdir that does not exist yet is not created (nor locked).
  """
  key = os.path.abspath(workdir)
  if key in _HELD:
    _HELD[key][1] += 1
  elif create or os.path.isdir(key):
    _HELD[key] = [WorkdirLock(key).acquire(), 1]
  else:
    yield None
    return
  try:
    yield _HELD[key][0]
  finally:
    _HELD[key][1] -= 1
    if not _HELD[key][1]:
      _HELD.pop(key)[0].release()


def hold_workdir(workdir: str):
  """:func:`lock_workdir` by process 0, and every process learns whether it got it."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1:
    return lock_workdir(workdir)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  error: ConfigError | None = None
  held: contextlib.AbstractContextManager = contextlib.nullcontext()
  if jax.process_index() == 0:
    try:
      held = lock_workdir(workdir)
      held.__enter__()
    except ConfigError as e:
      error = e
  if not int(multihost_utils.broadcast_one_to_all(np.int32(error is None))):
    raise error or ConfigError(f"--workdir={workdir}", "is in use by another run (process 0 "
                               "could not lock it; its error names the holder).")
  return _Entered(held)


class _Entered(contextlib.AbstractContextManager):
  """An entered context manager, exited with the ``with`` block."""

  def __init__(self, held):
    self.held = held

  def __exit__(self, *exc):
    return self.held.__exit__(*exc)


class WorkdirLock:
  """An OS lock (``flock``) on ``workdir/lock``, which names its holder (host, pid).

  The kernel drops the lock when its process dies, however it dies, so a lock
  left by a killed process is free; its stale content only names the process
  taken over from.
  """

  def __init__(self, workdir: str):
    self.workdir, self.path = workdir, os.path.join(workdir, "lock")
    self._fd: int | None = None

  def acquire(self) -> WorkdirLock:
    """Takes the lock.

    Raises:
      ConfigError: another live process holds it (named), or the workdir cannot be written.
    """
    try:
      os.makedirs(self.workdir, exist_ok=True)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise (disk_error(e, self.workdir) or e) from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = _holder(fd)
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      raise ConfigError(f"--workdir={self.workdir}", f"is in use by {holder or 'another process'}; "
                        "wait for it to finish or stop it, or use another --workdir.") from None
    stale = _holder(fd)
    if stale and not stale.startswith(f"pid {os.getpid()} "):
      note(f"{self.workdir}: took over the lock of {stale}, which is no longer running.")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                              "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
                              }).encode(), 0)
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    """Empties and unlocks the lock file (kept: unlinking it would race a new holder)."""
    if self._fd is not None:
      with contextlib.suppress(OSError):
        os.ftruncate(self._fd, 0)
      os.close(self._fd)     # closing drops the flock
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def _holder(fd: int) -> str:
  """``"pid P on host H (since T)"`` from a lock file's content ('' if empty or unreadable)."""
  try:
    info = json.loads(os.pread(fd, 4096, 0) or b"null")
    return f"pid {info['pid']} on host {info['host']} (since {info['since']})"
  except (OSError, ValueError, TypeError, KeyError):
    return ""


# -- disk errors ---------------------------------------------------------------------------

_DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "it is on a read-only file system",
                errno.EACCES: "permission denied", errno.EPERM: "the operation is not permitted"}
_DISK_TEXT = {"No space left on device": errno.ENOSPC, "RESOURCE_EXHAUSTED": errno.ENOSPC,
              "Read-only file system": errno.EROFS, "Disk quota exceeded": errno.EDQUOT,
              "Permission denied": errno.EACCES}


def disk_error(error: BaseException, workdir: str) -> ConfigError | None:
  """A one-line :class:`ConfigError` for a write that a full or read-only ``workdir``
  refused (``None`` for any other error), found anywhere in ``error``'s chain."""
  seen: set[int] = set()
  e: BaseException | None = error
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    code = e.errno if isinstance(e, OSError) else None
    if code is None:
      code = next((c for t, c in _DISK_TEXT.items() if t in str(e)), None)
    if code in _DISK_ERRNOS:
      where = getattr(e, "filename", None)
      where = f" ({where})" if where else ""
      return ConfigError(f"--workdir={workdir}", f"cannot be written: {_DISK_ERRNOS[code]}"
                         f"{where}. What is already saved there is kept; free space or make "
                         "it writable and rerun the same command to resume, or use another "
                         "--workdir.")
    e = e.__cause__ or e.__context__
  return None

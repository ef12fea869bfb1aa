"""Files a run writes safely: atomic replaces, and checksum manifests of checkpoints.

A checkpoint is sealed once its save completes: ``SHA256SUMS`` lists the sha256 of
every file in it, in ``sha256sum -c`` format, and a restore checks it first, so a
flipped bit or an overwritten block is found before anything is loaded.
"""
from __future__ import annotations

import hashlib
import os

__all__ = ["write_atomic", "MANIFEST", "write_manifest", "check_manifest"]


def write_atomic(path: str, content: str | bytes) -> None:
  """Writes ``path`` through a temporary file and a rename (never half a file)."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb" if isinstance(content, bytes) else "w") as f:
    f.write(content)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


MANIFEST = "SHA256SUMS"   # `sha256sum -c SHA256SUMS` inside a checkpoint checks it too


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
  return sorted(f for f in out if f != MANIFEST and ".tmp" not in f)


def write_manifest(directory: str) -> None:
  """Writes ``directory/SHA256SUMS``: the sha256 of every file under ``directory``."""
  lines = [f"{_digest(os.path.join(directory, f))}  {f}\n" for f in _files(directory)]
  write_atomic(os.path.join(directory, MANIFEST), "".join(lines))


def check_manifest(directory: str) -> str | None:
  """``None`` if every file listed in ``directory/SHA256SUMS`` is there with its hash,
  ``"unsealed"`` if there is no manifest, else why it fails (the first bad file)."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    return "unsealed"
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

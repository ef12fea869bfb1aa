"""Files a run writes safely: an atomic replace (checkpoints: :mod:`.checkpoints`)."""
from __future__ import annotations

import os

__all__ = ["write_atomic"]


def write_atomic(path: str, content: str | bytes) -> None:
  """Writes ``path`` through a temporary file and a rename (never half a file)."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb" if isinstance(content, bytes) else "w") as f:
    f.write(content)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)

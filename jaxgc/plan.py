"""Deprecated: ``python -m jaxgc.plan`` is ``python -m jaxgc.planner`` (kept for one release).

``jaxgc.plan`` is the function (:func:`jaxgc.planner.plan`); the planner's module is
:mod:`jaxgc.planner`. This file only runs as ``python -m jaxgc.plan``: importing it would
rebind ``jaxgc.plan`` to a module, so an import is refused with the path to use.
"""
from __future__ import annotations

import sys
import warnings

if __name__ != "__main__":
  raise ImportError("jaxgc.plan is the function jaxgc.plan(...), not a module: import "
                    "jaxgc.planner (the planner's module), and run python -m jaxgc.planner.")

warnings.warn("python -m jaxgc.plan is deprecated and goes in the next release; use "
              "python -m jaxgc.planner (same flags).", DeprecationWarning, stacklevel=1)
from jaxgc.planner import main  # noqa: E402  pylint: disable=wrong-import-position

sys.exit(main())

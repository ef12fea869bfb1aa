"""``python -m jaxgc.planner``: the planner's table for a cluster (see :mod:`jaxgc.planner`)."""
import sys

from jaxgc.planner._cli import main

if __name__ == "__main__":
  sys.exit(main())

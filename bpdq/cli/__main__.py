"""``python -m bpdq.cli``."""

import sys

from bpdq.cli.main import main

if __name__ == "__main__":
    sys.exit(main())

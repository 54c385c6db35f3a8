"""``python -m iddpm train|sample|nll|bench``; see :mod:`iddpm.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

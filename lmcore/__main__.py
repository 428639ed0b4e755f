"""`python -m lmcore ...`: the same command line as the `lmcore` console script."""

import sys

from lmcore.cli import main

if __name__ == "__main__":
    sys.exit(main())

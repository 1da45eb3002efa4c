"""`python -m zamba2.cli ...`: the same command line as the `zamba2` console script."""

import sys

from zamba2.cli import main

if __name__ == "__main__":
    sys.exit(main())

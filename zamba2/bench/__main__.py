"""`python -m zamba2.bench`: the benchmark's command line (also the workers' entry point, `--worker`)."""

import sys

from zamba2.bench.cli import main

sys.exit(main())

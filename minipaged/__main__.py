"""``python -m minipaged ...``: the same command line as the ``minipaged`` console script."""

import sys

from minipaged.entrypoints.cli import main

if __name__ == "__main__":
    sys.exit(main())

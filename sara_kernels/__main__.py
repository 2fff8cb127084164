"""``python -m sara_kernels {demo, analyze, selftest} ...``: see :mod:`sara_kernels.programs`."""

import sys

from .programs.cli import main

if __name__ == "__main__":
    sys.exit(main())

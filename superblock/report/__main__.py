"""``python -m superblock.report``: see :mod:`superblock.report.cli`."""

import sys

from superblock.report.cli import main

if __name__ == "__main__":
    sys.exit(main())

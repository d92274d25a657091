"""`python -m lmkern COMMAND`: the lmkern command line (lmkern/cli.py)."""

import sys

from lmkern.cli import main

sys.exit(main())

"""`python -m hitlib ...` is the `hitlib` command (hand-written: the command itself is
exported from chapter 13)."""

import sys

from hitlib.cli import main

sys.exit(main())

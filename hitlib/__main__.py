"""`python -m hitlib ...` is the `hitlib` command (hand-written: the command itself is
exported from chapter 13)."""

from hitlib.cli import entry_point

entry_point()

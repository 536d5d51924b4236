"""``python -m synthprune``: the command line."""

from synthprune.cli import run

run()

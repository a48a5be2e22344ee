"""`python -m batch` runs the vlbatch command line."""

from batch.cli import command

command()

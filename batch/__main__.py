"""`python -m batch` runs the vlbatch command line."""

from batch.cli import main

main()

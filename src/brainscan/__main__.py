"""``python -m brainscan``: the command line."""

from .cli import main

main()

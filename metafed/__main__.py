"""``python -m metafed``: the ``metafed`` command line."""
from metafed.cli import main

main()

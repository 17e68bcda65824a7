"""``python -m ddtool``: the same CLI as the ``ddtool`` console script."""

from .cli import main

main()

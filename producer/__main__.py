"""``python -m aigc``: the ``aigc`` command line."""

from .cli import main

main()

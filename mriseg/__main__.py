"""Allow ``python -m mriseg``."""

from mriseg.cli import main

main()

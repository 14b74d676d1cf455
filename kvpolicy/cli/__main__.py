"""``python -m kvpolicy.cli ...`` is ``kvpolicy ...``."""

from kvpolicy.cli import main

main()

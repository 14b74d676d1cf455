"""``python -m kvpolicy.sweep ...`` is ``kvpolicy sweep ...``."""

import sys

from kvpolicy.cli import main

main(["sweep", *sys.argv[1:]])

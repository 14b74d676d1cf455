"""``python -m kvpolicy.bench ...`` is ``kvpolicy bench ...``."""

import sys

from kvpolicy.cli import main

main(["bench", *sys.argv[1:]])

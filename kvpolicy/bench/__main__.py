"""``python -m kvpolicy.bench``: the argparse twin of ``kvpolicy bench``."""

from kvpolicy.bench.command import main

raise SystemExit(main())

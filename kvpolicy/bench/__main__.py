"""``python -m kvpolicy.bench``: the argparse twin of ``kvpolicy bench``."""

from kvpolicy.bench.run import main

raise SystemExit(main())

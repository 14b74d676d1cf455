"""`python -m kvpolicy` runs the CLI."""

from .cli import main

main()

"""``kvpolicy plugins``: what the registry holds, one line per part (``--verbose``, ``NAME`` for the details)."""

from __future__ import annotations

import json

import typer

from .common import PluginCommand, app, fail, stdout_console


@app.command(cls=PluginCommand)
def plugins(
    name: str = typer.Argument(None, help="one part or preset, shown in detail"),
    kind: str = typer.Option(None, "--kind", help="only parts of this kind: encode, decode, reducer or allocator"),
    verbose: bool = typer.Option(False, "--verbose", help="full tables: every parameter, every whole message"),
    as_json: bool = typer.Option(False, "--json", help="print machine-readable JSON"),
) -> None:
    """List every part and preset, one line each (problems first); NAME for one in detail."""
    from ..config import preset_problems
    from ..registry import KINDS, get_registry
    from . import listing

    if kind is not None and kind not in KINDS:
        raise fail(f"--kind: {kind!r} is not a kind of part; allowed: {', '.join(KINDS)}")
    registry = get_registry()
    data = listing.filter_kind(registry.listing(preset_problems(registry)), kind)
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    out = stdout_console()
    if name is not None:
        if not listing.print_detail(out, data, name):
            raise fail(listing.unknown_name(data, name))
    elif verbose:
        listing.print_verbose(out, data, with_presets=kind is None)
    else:
        listing.print_compact(out, data)

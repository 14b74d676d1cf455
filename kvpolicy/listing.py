"""What ``kvpolicy plugins`` prints, from :meth:`~kvpolicy.registry.Registry.listing`.

The default listing is one line per part and preset (kind, name, source, status, summary cut to the width), problems
first, so that it fits an 80-column terminal and a failed plugin cannot scroll out of sight behind 300 lines of
parameter descriptions. ``--verbose`` prints the full tables (every parameter), ``kvpolicy plugins NAME`` one part or
preset in detail.
"""

from __future__ import annotations

import difflib
import textwrap
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

WARN = "yellow"
#: widest cell of the narrow columns (longer names are cut with an ellipsis)
_CAPS = {"kind": 9, "name": 22, "source": 18, "status": 8}


def filter_kind(data: dict[str, Any], kind: str | None) -> dict[str, Any]:
    """The listing restricted to one kind of part (presets and plugin problems dropped), or unchanged."""
    if kind is None:
        return data
    return {"parts": [p for p in data["parts"] if p["kind"] == kind], "presets": [], "problems": []}


def _cut(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def rows(data: dict[str, Any]) -> list[tuple[tuple[str, str, str, str, str], bool]]:
    """``((kind, name, source, status, summary), is_problem)`` per line: failed plugins, invalid presets and parts
    that are not ok first, then the parts by kind, then the presets."""
    problems, fine = [], []
    for p in data["problems"]:
        problems.append((("plugin", p["plugin"], p["package"], "FAILED", p["error"]), True))
    for part in data["parts"]:
        ok = part["status"] == "ok"
        row = (part["kind"], part["name"], part["source"], "ok" if ok else "FAILED", part["summary"])
        (fine if ok else problems).append((row, not ok))
    for preset in data["presets"]:
        ok = preset["status"] == "ok"
        summary = preset["summary"] if ok else preset["status"].removeprefix("invalid: ")
        row = ("preset", preset["name"], preset["source"], "ok" if ok else "INVALID", summary)
        (fine if ok else problems).append((row, not ok))
    return problems + fine


def print_compact(out: Console, data: dict[str, Any]) -> None:
    """One line per part and preset, cut to ``out.width`` columns; problems first, each with its whole message
    wrapped under its line."""
    lines = rows(data)
    header = ("kind", "name", "source", "status", "summary")
    widths = [
        min(_CAPS[col], max([len(col)] + [len(r[i]) for r, _ in lines])) for i, col in enumerate(header[:4])
    ]
    rest = max(10, out.width - sum(widths) - 2 * len(widths))
    out.print(Text(_line(header, widths, rest), style="bold"), soft_wrap=True)
    for row, problem in lines:
        out.print(Text(_line(row, widths, rest), style=WARN if problem else ""), soft_wrap=True)
        message = " ".join(row[4].split())
        if problem and len(message) > rest:  # a problem is shown whole, wrapped under its row
            for part in textwrap.wrap(message, width=max(20, out.width - 4)):
                out.print(Text(f"    {part}", style=WARN), soft_wrap=True)
    n_bad = sum(1 for _, problem in lines if problem)
    counts = f"{len(data['parts'])} parts, {len(data['presets'])} presets, {n_bad} problem{'s' * (n_bad != 1)}"
    hint = "kvpolicy plugins NAME: one in detail; --verbose: every parameter and message"
    for text in (counts, hint):
        out.print(Text(_cut(text, out.width), style=WARN if n_bad and text is counts else "dim"), soft_wrap=True)


def _line(cells: tuple[str, ...], widths: list[int], rest: int) -> str:
    fixed = "  ".join(f"{_cut(c, w):<{w}}" for c, w in zip(cells, widths))
    return f"{fixed}  {_cut(cells[4], rest)}".rstrip()


def print_detail(out: Console, data: dict[str, Any], name: str) -> bool:
    """Every part and preset called ``name`` in full (parameters, capabilities, the preset's policy); ``False`` if
    there is none."""
    import yaml

    found = False
    for p in data["problems"]:
        if p["plugin"] == name:
            found = True
            out.print(Text(f"plugin {name} ({p['package']}): FAILED to load: {p['error']}", style=WARN))
    for part in data["parts"]:
        if part["name"] != name:
            continue
        found = True
        out.print(Text(f"{part['kind']} {name}  (stage {part['stage']}, from {part['source']}, {part['status']})",
                       style="bold"))
        out.print(part["summary"])
        if part["provides"] or part["requires"]:
            out.print(f"provides: {', '.join(part['provides']) or '-'}; requires: {', '.join(part['requires']) or '-'}")
        out.print("parameters:" if part["params"] else "parameters: none")
        for param in part["params"]:
            out.print(f"  {param_line(param)}")
        out.print()
    for preset in data["presets"]:
        if preset["name"] != name:
            continue
        found = True
        ok = preset["status"] == "ok"
        out.print(Text(f"preset {name}  (from {preset['source']}, {preset['status']})", style="bold" if ok else WARN))
        out.print(preset["summary"])
        out.print(yaml.safe_dump(preset["policy"], sort_keys=False).rstrip())
        out.print()
    return found


def unknown_name(data: dict[str, Any], name: str) -> str:
    """The error for a name that is neither a part, a preset nor a plugin, with the closest match."""
    names = sorted({p["name"] for p in data["parts"]} | {p["name"] for p in data["presets"]})
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"NAME: no part or preset is called {name!r}{hint}; `kvpolicy plugins` lists them"


def print_verbose(out: Console, data: dict[str, Any], with_presets: bool = True) -> None:
    """The full tables: every part with its parameters, every preset, and every problem's whole message."""
    table = Table(title="kvpolicy parts", show_lines=True)
    for col in ("kind (stage)", "name", "source", "parameters", "summary", "status"):
        table.add_column(col, overflow="fold", min_width=30 if col == "parameters" else None)
    for p in data["problems"]:
        cells = ("?", p["plugin"], p["package"], "", "", "failed: see warning below")
        table.add_row(*(Text(c, style=WARN) for c in cells))
    for part in data["parts"]:
        params = "\n".join(param_line(p) for p in part["params"]) or "-"
        cells = (f"{part['kind']} ({part['stage']})", part["name"], part["source"], params, part["summary"],
                 part["status"])
        table.add_row(*(Text(c) for c in cells))
    out.print(table)

    if data["presets"]:
        presets = Table(title="presets", show_lines=True)
        for col in ("name", "source", "summary", "status"):
            presets.add_column(col, overflow="fold")
        for preset in data["presets"]:
            ok = preset["status"] == "ok"
            cells = (preset["name"], preset["source"], preset["summary"], "ok" if ok else "invalid: see below")
            presets.add_row(*(Text(c, style="" if ok else WARN) for c in cells))
        out.print(presets)
    elif with_presets:
        out.print(Text("no presets registered"))

    for preset in data["presets"]:
        if preset["status"] != "ok":
            text = f"warning: preset {preset['name']!r} ({preset['source']}) is {preset['status']}"
            out.print(Text(text, style=WARN))
    for p in data["problems"]:
        out.print(Text(f"warning: plugin {p['plugin']!r} ({p['package']}): {p['error']}", style=WARN))


def param_line(p: dict[str, Any]) -> str:
    """``name: type = default in [lo, hi] — description`` for one parameter of a part."""
    text = f"{p['name']}: {p['type']}"
    text += " (required)" if p["required"] else f" = {p['default']!r}"
    if p["range"]:
        text += f" in {p['range']}" if p["range"][0] in "[(" else f" {p['range']}"
    if p["description"]:
        text += f" — {p['description']}"
    return text


__all__ = ["filter_kind", "param_line", "print_compact", "print_detail", "print_verbose", "rows", "unknown_name"]

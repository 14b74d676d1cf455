"""Rebuild the committed evaluation data (``kvpolicy/data/*.jsonl.gz``) from this machine's Python install.

Run ``python -m kvpolicy.eval.build_data`` to regenerate. The output is deterministic for a given CPython version
(files and windows are chosen with a seeded RNG, gzip headers carry no timestamp); the committed files were built from
CPython 3.11.7, and every machine evaluates *those* files, not a rebuild, so results stay comparable.

Sources (all under the PSF licence, see ``kvpolicy/data/README.md``):

* **code**: the standard library's ``.py`` files (tests, IDLE, lib2to3, tkinter, encodings excluded);
* **prose**: the Python reference documentation that ships with CPython as ``pydoc_data.topics`` (what ``help()``
  prints), long module docstrings, and per-module "pydoc pages" made of the long docstrings of its functions and
  classes.

Outputs:

* ``continuation.jsonl.gz``: ``{id, kind, source, context, continuation}`` — a window of real text split in two;
* ``continuation_long.jsonl.gz``: the same fields, windows of ~48,000 characters (8k+ tokens) for long contexts, drawn
  by :func:`build_long` with its own seed, so that the short windows above are exactly what they were;
* ``instruct.jsonl.gz``: ``{id, kind, source, document, instruction}`` — a document and an instruction about it;
* ``haystack.jsonl.gz``: ``{id, source, text}`` — prose paragraphs for the needle task's haystacks.
"""

from __future__ import annotations

import ast
import gzip
import json
import os
import random
import re
import sys
from pathlib import Path
from typing import IO

from ..io import atomic_write, write_json_atomic

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "site-packages",
    "ensurepip",
    "turtledemo",
    "__pycache__",
    "encodings",
    "pydoc_data",
    "tkinter",
    "unittest",
}
CONTEXT_CHARS, CONTINUATION_CHARS = 3000, 600
N_CONTINUATION = {"code": 120, "prose": 120}
#: long windows: ~48,000 characters of context is 10-12.5k SmolLM2 or Gemma 3 tokens (3.8-4.7 characters per token)
LONG_CONTEXT_CHARS = 48_000
N_LONG = {"code": 16, "prose": 16}
LONG_SEED = 20260601
N_INSTRUCT = {"code": 100, "prose": 100}

CODE_INSTRUCTIONS = [
    "Explain what the following Python code does, in a few sentences.",
    "Summarise the purpose of this code in one or two sentences.",
    "What are the inputs and the output of this code? Answer briefly.",
    "Describe step by step how this code works.",
    "Write a short docstring that describes this code.",
]
PROSE_INSTRUCTIONS = [
    "Summarise the text above in two sentences.",
    "What is the main topic of this text? Answer in one sentence.",
    "List three key points from this text.",
    "Explain this documentation to a beginner in a few sentences.",
    "What question does this text answer? State the question and a short answer.",
]


def stdlib_root() -> Path:
    return Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"


def stdlib_files() -> list[Path]:
    root = stdlib_root()
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS and not x.startswith("test"))
        for f in sorted(files):
            if f.endswith(".py") and not f.startswith("test"):
                out.append(Path(d) / f)
    return out


def rel(path: Path) -> str:
    return "Lib/" + str(path.relative_to(stdlib_root()))


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def window(
    text: str, rng: random.Random, min_context: int = 1800, size: int = CONTEXT_CHARS
) -> tuple[str, str] | None:
    """A window starting at a line boundary: (context, continuation), the split also at a line boundary. The context
    is ``size`` characters long (at most), or as long as the text allows but at least ``min_context``."""
    room = len(text) - CONTINUATION_CHARS - 100
    if room < min_context:
        return None
    size = min(size, room)
    starts = [0] + [m.end() for m in re.finditer("\n", text[: max(1, room - size)])]
    start = rng.choice(starts)
    cut = text.rfind("\n", start + size - 400, start + size)
    cut = start + size if cut <= start else cut + 1
    return text[start:cut], text[cut : cut + CONTINUATION_CHARS]


def prose_documents() -> list[tuple[str, str]]:
    """(source, text) prose documents: reference topics, long module docstrings, pydoc-style pages."""
    import pydoc_data.topics as topics

    docs = [(f"pydoc_data.topics[{k!r}]", v.strip()) for k, v in sorted(topics.topics.items())]
    for path in stdlib_files():
        try:
            tree = ast.parse(read(path))
        except SyntaxError:
            continue
        doc = ast.get_docstring(tree)
        if doc and len(doc) > 1200:
            docs.append((f"{rel(path)} (module docstring)", doc.strip()))
    return docs


def pydoc_pages() -> list[tuple[str, str]]:
    """Per module, the long docstrings of its top-level functions and classes laid out like ``pydoc`` text."""
    pages = []
    for path in stdlib_files():
        try:
            tree = ast.parse(read(path))
        except SyntaxError:
            continue
        parts = []
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 300:
                    head = f"class {node.name}" if isinstance(node, ast.ClassDef) else f"{node.name}(...)"
                    body = "\n".join("    " + line if line else "" for line in doc.strip().splitlines())
                    parts.append(f"{head}\n{body}")
        text = "\n\n".join(parts)
        if len(text) > 1500:
            pages.append((f"{rel(path)} (pydoc page)", text))
    return pages


def code_units() -> list[tuple[str, str]]:
    """Top-level functions and classes of 800-3500 characters, as source."""
    units = []
    for path in stdlib_files():
        src = read(path)
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                seg = ast.get_source_segment(src, node)
                if seg and 800 <= len(seg) <= 3500:
                    units.append((f"{rel(path)}:{node.lineno} {node.name}", seg))
    return units


def clip(text: str, limit: int = 3500) -> str:
    if len(text) <= limit:
        return text
    cut = text.rfind("\n", 0, limit)
    return text[: cut if cut > limit // 2 else limit]


def build() -> dict[str, list[dict]]:
    rng = random.Random(20241124)
    # ---- continuation: code windows from source files, prose windows from documents
    cont = []
    files = stdlib_files()
    rng.shuffle(files)
    for path in files:
        if sum(r["kind"] == "code" for r in cont) >= N_CONTINUATION["code"]:
            break
        w = window(read(path), rng)
        if w:
            cont.append({"kind": "code", "source": rel(path), "context": w[0], "continuation": w[1]})
    prose = prose_documents()
    pages = pydoc_pages()
    rng.shuffle(pages)
    half = len(pages) // 2
    pool = prose + pages[:half]
    rng.shuffle(pool)
    for source, text in pool:
        if sum(r["kind"] == "prose" for r in cont) >= N_CONTINUATION["prose"]:
            break
        w = window(text, rng)
        if w:
            cont.append({"kind": "prose", "source": source, "context": w[0], "continuation": w[1]})
    for i, r in enumerate(cont):
        r["id"] = f"cont-{i:04d}"
    # ---- instruct: code units and prose pages (the other half of the pages) with an instruction each
    inst = []
    units = code_units()
    rng.shuffle(units)
    for source, text in units[: N_INSTRUCT["code"]]:
        inst.append({"kind": "code", "source": source, "document": text, "instruction": rng.choice(CODE_INSTRUCTIONS)})
    prose_pool = [(s, t) for s, t in pages[half:] + prose if len(t) >= 1200]
    rng.shuffle(prose_pool)
    for source, text in prose_pool[: N_INSTRUCT["prose"]]:
        inst.append(
            {"kind": "prose", "source": source, "document": clip(text), "instruction": rng.choice(PROSE_INSTRUCTIONS)}
        )
    for i, r in enumerate(inst):
        r["id"] = f"inst-{i:04d}"
    # ---- haystack: plain prose paragraphs of the reference topics (no code blocks, no headings)
    import pydoc_data.topics as topics

    hay = []
    for key, text in sorted(topics.topics.items()):
        for para in re.split(r"\n\s*\n", text):
            lines = para.strip().splitlines()
            if len(lines) < 2 or any(line.startswith((" ", "*", "=", "-", ">>>")) for line in lines):
                continue
            flat = " ".join(line.strip() for line in lines)
            if len(flat) >= 200 and flat.rstrip().endswith("."):
                hay.append({"id": f"hay-{len(hay):04d}", "source": f"pydoc_data.topics[{key!r}]", "text": flat})
    return {"continuation": cont, "instruct": inst, "haystack": hay}


def consecutive_windows(text: str, size: int) -> list[tuple[int, str, str]]:
    """``(offset, context, continuation)`` of the disjoint windows a long text holds, one after the other from its
    start: each context ends at the last line break before ``size`` characters, its continuation follows, and the next
    window starts after that continuation (no window sees another's target)."""
    out, start = [], 0
    while start + size + CONTINUATION_CHARS <= len(text):
        cut = text.rfind("\n", start + size - 400, start + size)
        cut = start + size if cut <= start else cut + 1
        out.append((start, text[start:cut], text[cut : cut + CONTINUATION_CHARS]))
        start = cut + CONTINUATION_CHARS
    return out


def build_long() -> list[dict]:
    """Windows of ``LONG_CONTEXT_CHARS`` for long-context ``continuation``: ``code`` from the longest standard-library
    files (one window per file, a random start at a line), ``prose`` from two long documents made of the sources the
    short prose windows use (the reference manual's topics in key order; the pydoc pages of every module in path
    order), cut into disjoint consecutive windows of which a seeded draw is kept."""
    rng = random.Random(LONG_SEED)
    rows = []
    files = [p for p in stdlib_files() if len(read(p)) >= LONG_CONTEXT_CHARS + CONTINUATION_CHARS + 100]
    rng.shuffle(files)
    for path in files[: N_LONG["code"]]:
        w = window(read(path), rng, LONG_CONTEXT_CHARS, LONG_CONTEXT_CHARS)
        assert w is not None
        rows.append({"kind": "code", "source": rel(path), "context": w[0], "continuation": w[1]})
    import pydoc_data.topics as topics

    documents = {
        "pydoc_data.topics (the reference manual, topics in key order)": "\n\n".join(
            v.strip() for _, v in sorted(topics.topics.items())
        ),
        "pydoc pages of the standard library (path order)": "\n\n".join(t for _, t in pydoc_pages()),
    }
    pool = [(name, *w) for name, text in documents.items() for w in consecutive_windows(text, LONG_CONTEXT_CHARS)]
    for name, offset, context, continuation in rng.sample(pool, N_LONG["prose"]):
        source = f"{name}, characters {offset}-{offset + len(context)}"
        rows.append({"kind": "prose", "source": source, "context": context, "continuation": continuation})
    for i, r in enumerate(rows):
        r["id"] = f"contlong-{i:04d}"
    return rows


def write(name: str, rows: list[dict]) -> Path:
    path = DATA_DIR / f"{name}.jsonl.gz"
    payload = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode("utf-8")

    def compress(raw: IO[bytes]) -> None:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
            gz.write(payload)

    return atomic_write(path, compress)


def main() -> None:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    data = {**build(), "continuation_long": build_long()}
    for name, rows in data.items():
        path = write(name, rows)
        print(f"{path}: {len(rows)} rows, {path.stat().st_size:,} bytes")
    meta = {"python": sys.version.split()[0], "counts": {k: len(v) for k, v in data.items()}}
    write_json_atomic(DATA_DIR / "build_info.json", meta, indent=2)


if __name__ == "__main__":
    main()

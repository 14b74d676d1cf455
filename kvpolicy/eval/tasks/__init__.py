"""Evaluation tasks: small pluggable loaders that turn committed data into token-id samples, deterministically.

A task is a class with a ``name``, a pydantic ``Options`` model (its settings, e.g. ``context_tokens``) and a method
``load(tokenizer, samples, seed, options) -> list[Sample]``. Register new ones with :func:`register_task`; the runner
looks them up by name (``EvalSpec.task``). Built in:

* ``continuation`` — a window of real text (CPython standard-library source or Python reference documentation, from
  ``kvpolicy/data/continuation.jsonl.gz``): the last ``context_tokens`` tokens of the window's first part are the
  prompt, the first ``target_tokens`` tokens of the rest are teacher-forced (PPL of the true continuation);
  ``windows=long`` draws from ``continuation_long.jsonl.gz`` (32 windows of 10k+ tokens) for long contexts;
* ``instruct`` — an instruction about a document (summarise / explain / list / ...), rendered with the tokenizer's
  chat template; the full-cache greedy answer is the reference (the Elastic Cache paper's protocol);
* ``needle`` — RULER-style synthetic retrieval generated on the fly at ``context_tokens``: ``single`` (one needle in a
  haystack), ``multikey`` (one of several needles with different keys), ``vt`` (variable tracking through a chain of
  assignments); the gold answer is teacher-forced and the generation is scored by string match;
* ``ruler`` — RULER's 11 synthetic tasks (``niah_*``, ``vt``, ``cwe``, ``fwe``) at any ``context_tokens``, in the
  model's tokens; scored by RULER's ``string_match_all`` per task and averaged (:mod:`.ruler`);
* ``jsonl`` — a user file with ``prompt`` (or ``context`` and ``question``) and optional ``answer``, ``image`` and
  ``id`` per line.

``ruler``, ``needle`` and ``jsonl`` carry each sample's ``context`` and ``question`` apart and take ``query_aware``:
``false`` prefills the question as a second chunk appended to the compressed context (``Sample.question_tokens``).

Sampling is deterministic and nested: with seed ``s`` the first ``n`` samples are always the first ``n`` of the same
seeded permutation, so 50 samples are a subset of 100 and their cached references are reused.
"""

from . import base
from .base import *  # noqa: F403 - the task API is base's public names, listed once in base.__all__

# the built-in tasks register themselves on import
from . import image, ruler, text  # noqa: E402,F401  isort: skip

__all__ = list(base.__all__)

"""RULER's generators: one sample's random content drawn once, then rendered at any haystack size.

Each generator draws everything random about its sample in ``__init__`` (keys, values, needle depths, word lists,
shuffle seeds) and renders deterministically with :meth:`render` ``(units, fill)``: ``units`` is the haystack size in
RULER's own unit (essay words, noise lines, distractor needles, list words), ``fill`` a number of noise sentences
below one unit, so that a prompt can be fitted to within a few tokens of ``context_tokens`` (RULER fits its haystack
by the same kind of search, :mod:`.ruler` does it). The rendered texts follow NVIDIA/RULER's ``niah.py``,
``variable_tracking.py``, ``common_words_extraction.py`` and ``freq_words_extraction.py``.
"""

from __future__ import annotations

import math
import random
import string
import uuid
from dataclasses import dataclass

from .base import TaskError
from .ruler_text import (
    CWE_FREQ,
    CWE_NUM,
    CWE_TEMPLATE,
    CWE_UFREQ,
    DEPTHS,
    FWE_ALPHA,
    FWE_TEMPLATE,
    FWE_WORDLEN,
    NIAH_TEMPLATE,
    NOISE_SENTENCES,
    VT_HOPS,
    VT_TEMPLATE,
    NiahConfig,
    common_words,
    essay_words,
    key_words,
    sentences,
)
from .text import NOISE


@dataclass(frozen=True)
class Parts:
    """One rendered sample. The user turn is ``context + question``; ``answer_prefix`` is RULER's, as RULER writes
    it (leading space included), and starts the model's answer; ``target`` is the gold answer teacher-forced after
    it."""

    context: str
    question: str
    answer_prefix: str
    answers: list[str]
    target: str


def filler(count: int) -> str:
    """``count`` sentences of RULER's noise paragraph, cycled: the part of a haystack line below one whole unit."""
    return " ".join(NOISE_SENTENCES[i % len(NOISE_SENTENCES)] for i in range(count))


def with_filler(lines: list[str], fill: int) -> list[str]:
    return lines + [filler(fill)] if fill > 0 else lines


def insert_at_fractions(lines: list[str], items: list[str], fractions: list[float]) -> list[str]:
    """``items`` inserted into ``lines`` at the given relative depths, each before the line ``int(f * len)`` (RULER
    samples line indices; relative depths keep a sample's positions stable while its haystack is resized)."""
    out = list(lines)
    slots = sorted((int(f * len(lines)) for f in fractions), reverse=True)
    for slot, item in zip(slots, items):
        out.insert(slot, item)
    return out


def random_number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def random_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


# ================================================================================================== niah
class Niah:
    """Needle(s) in a haystack (RULER's ``niah.py``): ``essay``, ``noise`` or ``needle`` (distractor needles)."""

    #: noise sentences a fill may add: one needle line is at most ~90 tokens (uuids), a sentence ~5
    MAX_FILL = 20

    def __init__(self, rng: random.Random, cfg: NiahConfig) -> None:
        self.cfg = cfg
        self.rng = rng
        self.key_order = rng.sample(key_words(), len(key_words())) if cfg.key == "words" else []
        self.used_keys: set[str] = set()
        self.used_values: set[str] = set()
        num_k = max(cfg.num_k, cfg.num_q)
        keys = [self.new_key() for _ in range(num_k)]
        values = [[self.new_value() for _ in range(cfg.num_v)] for _ in keys]
        needles = [self.needle(k, v) for k, vs in zip(keys, values) for v in vs]
        rng.shuffle(needles)
        self.needles = needles
        picked = rng.sample(range(num_k), cfg.num_q)
        queries = [keys[i] for i in picked]
        self.answers = [v for i in picked for v in values[i]]
        self.query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        self.depths = sorted(rng.sample(DEPTHS, len(needles)))
        self.fractions = [rng.random() for _ in needles]
        self.distractor_rng = random.Random(rng.getrandbits(64))
        self.distractors: list[str] = []

    # -------------------------------------------------------------------------------------------- content
    def draw(self, kind: str, rng: random.Random) -> str:
        if kind == "numbers":
            return random_number(rng)
        if kind == "uuids":
            return random_uuid(rng)
        raise AssertionError(kind)  # word keys come from the shuffled key list

    def new_key(self, rng: random.Random | None = None) -> str:
        """A key no needle of this sample has (the asked key must be unique in the context)."""
        while True:
            if self.cfg.key == "words":
                if len(self.used_keys) >= len(self.key_order):
                    raise TaskError(f"ruler: more needles than the {len(self.key_order)} distinct word keys")
                key = self.key_order[len(self.used_keys)]
            else:
                key = self.draw(self.cfg.key, rng or self.rng)
            if key not in self.used_keys:
                self.used_keys.add(key)
                return key

    def new_value(self, rng: random.Random | None = None) -> str:
        """A value no needle of this sample has (so each gold value appears once, in its own needle)."""
        while True:
            value = self.draw(self.cfg.value, rng or self.rng)
            if value not in self.used_values:
                self.used_values.add(value)
                return value

    def needle(self, key: str, value: str) -> str:
        return f"One of the special magic {self.cfg.value} for {key} is: {value}."

    def distractor(self, i: int) -> str:
        while len(self.distractors) <= i:
            self.distractors.append(self.needle(self.new_key(self.distractor_rng), self.new_value(self.distractor_rng)))
        return self.distractors[i]

    # -------------------------------------------------------------------------------------------- limits
    @property
    def max_units(self) -> int | None:
        if self.cfg.haystack == "essay":
            return len(essay_words())
        if self.cfg.haystack == "needle" and self.cfg.key == "words":
            return len(key_words()) - max(self.cfg.num_k, self.cfg.num_q)
        return None

    @property
    def max_fill(self) -> int:
        return 0 if self.cfg.haystack == "essay" else self.MAX_FILL

    # -------------------------------------------------------------------------------------------- render
    def haystack(self, units: int, fill: int) -> str:
        if self.cfg.haystack == "essay":
            sents = sentences(" ".join(essay_words()[:units]))
            cuts = [0] + [int(len(sents) * d / 100) for d in self.depths] + [len(sents)]
            pieces: list[str] = []
            for i in range(1, len(cuts)):
                pieces.append(" ".join(sents[cuts[i - 1] : cuts[i]]))
                if i - 1 < len(self.needles):
                    pieces.append(self.needles[i - 1])
            return " ".join(p for p in pieces if p)
        if self.cfg.haystack == "noise":
            lines = [NOISE] * units
        else:
            lines = [self.distractor(i) for i in range(units)]
        return "\n".join(insert_at_fractions(with_filler(lines, fill), self.needles, self.fractions))

    def render(self, units: int, fill: int) -> Parts:
        header, question, prefix = NIAH_TEMPLATE
        kind = self.cfg.value
        if self.cfg.num_q * self.cfg.num_v == 1:  # RULER's singular wording
            header, question, prefix = (singular(t) for t in (header, question, prefix))
            kind = kind[:-1]
        return Parts(
            context=header.format(type_needle_v=kind) + self.haystack(units, fill) + "\n",
            question=question.format(type_needle_v=kind, query=self.query),
            answer_prefix=prefix.format(type_needle_v=kind, query=self.query),
            answers=list(self.answers),
            target=" " + ", ".join(self.answers),
        )


def singular(template: str) -> str:
    """RULER's rewording of the niah template when one value is asked for (the same replacements, in order)."""
    for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        template = template.replace(old, new)
    return template


# ================================================================================================== vt
class VariableTracking:
    """A chain of ``VAR X = VAR Y`` assignments in RULER's noise haystack (``variable_tracking.py``, one chain of
    four hops); ``icl`` is the solved example RULER puts before the question (names of three letters then)."""

    max_units: int | None = None
    max_fill = len(NOISE_SENTENCES) - 1

    def __init__(self, rng: random.Random, icl: str = "", example: bool = False) -> None:
        letters = 3 if example else 5
        names: list[str] = []
        while len(names) < VT_HOPS + 1:
            name = "".join(rng.choices(string.ascii_uppercase, k=letters))
            if name not in names:
                names.append(name)
        self.names = names
        self.value = str(rng.randint(10_000, 99_998))
        self.chain = [f"VAR {names[0]} = {self.value}"] + [f"VAR {b} = VAR {a} " for a, b in zip(names, names[1:])]
        self.fractions = sorted(rng.random() for _ in self.chain)
        self.icl = icl

    def render(self, units: int, fill: int) -> Parts:
        lines = [NOISE] * units
        if fill:
            lines.append(" ".join(NOISE_SENTENCES[:fill]))
        slots = [int(f * len(lines)) for f in self.fractions]
        for j, (slot, link) in enumerate(zip(slots, self.chain)):
            lines.insert(slot + j, link)
        hay = "\n".join(lines).replace(". \n", ".\n")
        header, question, prefix = VT_TEMPLATE
        return Parts(
            context=self.icl + header + hay + "\n",
            question=question.format(query=self.value),
            answer_prefix=prefix.format(num_v=len(self.names), query=self.value),
            answers=list(self.names),
            target=" " + " ".join(self.names),
        )

    def solved(self, parts: Parts) -> str:
        """This sample written out as RULER's in-context example: prompt, answer prefix, answer, blank line."""
        return parts.context + parts.question + parts.answer_prefix + " " + " ".join(parts.answers) + "\n\n"


# ================================================================================================== cwe
def numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


class CommonWords:
    """The 10 most common words of a numbered list (``common_words_extraction.py``): below RULER's 4k setting each
    common word appears 6 times and the others once, with a 20-word example; from 4k on 30 and 3 times, with a
    40-word example. ``units`` counts the uncommon words."""

    max_fill = 0

    def __init__(self, rng: random.Random, long: bool) -> None:
        vocab = common_words()
        self.words = rng.sample(vocab, len(vocab))
        self.freq, self.ufreq = (CWE_FREQ, CWE_UFREQ) if long else (6, 1)
        shot_n, shot_f, shot_uf = (40, 10, 3) if long else (20, 3, 1)
        self.shot = self.example(rng.sample(vocab, shot_n), shot_f, shot_uf, rng.random())
        self.seed = rng.random()
        self.max_units: int | None = len(vocab) - CWE_NUM

    @staticmethod
    def example(words: list[str], freq: int, ufreq: int, seed: float) -> tuple[str, list[str]]:
        common, uncommon = words[:CWE_NUM], words[CWE_NUM:]
        listed = common * freq + uncommon * ufreq
        random.Random(seed).shuffle(listed)
        return numbered(listed), common

    def render(self, units: int, fill: int) -> Parts:
        header, question, prefix = CWE_TEMPLATE
        shot_list, shot_answer = self.shot
        shot = header + shot_list + "\n" + question + prefix + " " + numbered(shot_answer)
        listed, common = self.example(self.words[: CWE_NUM + units], self.freq, self.ufreq, self.seed)
        return Parts(
            context=shot + "\n" + header + listed + "\n",
            question=question,
            answer_prefix=prefix,
            answers=list(common),
            target=" " + numbered(common),
        )


# ================================================================================================== fwe
def zeta(alpha: float, terms: int = 100_000) -> float:
    """Riemann zeta for ``alpha > 1`` (a partial sum plus its Euler-Maclaurin tail; scipy's ``zeta`` in RULER)."""
    head = math.fsum(k**-alpha for k in range(1, terms))
    return head + terms ** (1 - alpha) / (alpha - 1) + 0.5 * terms**-alpha


class FreqWords:
    """The three most frequent coded words of a text drawn from a Zipf law (``freq_words_extraction.py``):
    ``context_tokens // 50`` random 6-letter words, the k-th appearing ``int(units * k**-2 / zeta(2))`` times, the
    first replaced by RULER's ``...`` noise. ``units`` is RULER's ``num_words``."""

    max_units: int | None = None
    max_fill = 0

    def __init__(self, rng: random.Random, context_tokens: int) -> None:
        size = max(5, context_tokens // 50)
        vocab: set[str] = set()
        while len(vocab) < size:
            vocab.add("".join(rng.choices(string.ascii_lowercase, k=FWE_WORDLEN)))
        words = sorted(vocab)
        rng.shuffle(words)
        words[0] = "..."
        self.vocab = words
        self.seed = rng.random()
        self.norm = zeta(FWE_ALPHA)

    def counts(self, units: int) -> list[int]:
        return [int(units * k**-FWE_ALPHA / self.norm) for k in range(1, len(self.vocab) + 1)]

    def render(self, units: int, fill: int) -> Parts:
        listed = [w for w, c in zip(self.vocab, self.counts(units)) for _ in range(c)]
        random.Random(self.seed).shuffle(listed)
        header, question, prefix = FWE_TEMPLATE
        answers = self.vocab[1:4]
        return Parts(
            context=header + " ".join(listed) + "\n",
            question=question,
            answer_prefix=prefix,
            answers=answers,
            target=" " + " ".join(answers),
        )


__all__ = [
    "CommonWords",
    "FreqWords",
    "Niah",
    "Parts",
    "VariableTracking",
    "filler",
    "insert_at_fractions",
    "numbered",
    "singular",
    "zeta",
]

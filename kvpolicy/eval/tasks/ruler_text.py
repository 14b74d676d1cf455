"""RULER's fixed text: its prompt templates, task settings, and the offline material that replaces its downloads.

The templates, answer prefixes, generation lengths and per-task settings are those of NVIDIA/RULER
(``scripts/data/synthetic/constants.py`` and ``scripts/synthetic.yaml``; Hsieh et al., 2024). What RULER downloads is
replaced by committed text, so that every machine generates the same samples without a network:

* the ``essay`` haystack (Paul Graham's essays) -> the prose paragraphs of ``kvpolicy/data/haystack.jsonl.gz`` (the
  Python reference manual, in file order), cut at a word count as RULER cuts the essays;
* ``wonderwords``' adjective-noun keys -> :data:`~.text.ADJECTIVES` x :data:`~.text.NOUNS` (3,600 keys);
* ``wonderwords``' word lists for ``cwe`` -> the distinct lower-case words of the same prose (plus those keys' words).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, get_args

from .base import read_data
from .text import ADJECTIVES, NOISE, NOUNS

#: (header, question, answer prefix) per RULER template family; ``{context}`` sits between header and question
NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will quiz "
    "you about the {type_needle_v} afterwards.\n",
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?",
    " The special magic {type_needle_v} for {query} mentioned in the provided text are",
)
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n",
    "Question: Find all variables that are assigned the value {query} in the text above.",
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned the "
    "value {query}, they are: ",
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that "
    "appear most often.\n",
    "Question: What are the 10 most common words in the above list?",
    " Answer: The top 10 words that appear most often in the list are:",
)
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. ",
    "Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently "
    "appeared words in the above coded text?",
    " Answer: According to the coded text above, the three most frequently appeared words are:",
)

#: RULER's ``tokens_to_generate`` per template family
TOKENS_TO_GENERATE = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}

#: RULER's noise haystack, one line of the ``noise`` haystacks, and its sentences (the fill below a whole line)
NOISE_SENTENCES = tuple(s.strip() + "." for s in NOISE.split(".") if s.strip())

#: RULER's needle depths: 40 evenly spaced percentages from 0 to 100
DEPTHS = tuple(round(i * 100 / 39) for i in range(40))

#: the 11 synthetic tasks (RULER's ``qa_1``/``qa_2`` need SQuAD/HotpotQA and are left out)
RulerTaskName = Literal[
    "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
    "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe",
]
RULER_TASKS: tuple[str, ...] = get_args(RulerTaskName)

NeedleType = Literal["words", "numbers", "uuids"]
HaystackType = Literal["noise", "essay", "needle"]


@dataclass(frozen=True)
class NiahConfig:
    """One ``niah`` task of RULER's synthetic.yaml (``num_needle_k`` is raised to ``num_needle_q`` as RULER does)."""

    haystack: HaystackType
    key: NeedleType
    value: NeedleType
    num_k: int = 1
    num_v: int = 1
    num_q: int = 1


#: the ``niah`` tasks' settings, as in RULER's synthetic.yaml
NIAH_TASKS: dict[str, NiahConfig] = {
    "niah_single_1": NiahConfig("noise", "words", "numbers"),
    "niah_single_2": NiahConfig("essay", "words", "numbers"),
    "niah_single_3": NiahConfig("essay", "words", "uuids"),
    "niah_multikey_1": NiahConfig("essay", "words", "numbers", num_k=4),
    "niah_multikey_2": NiahConfig("needle", "words", "numbers"),
    "niah_multikey_3": NiahConfig("needle", "uuids", "uuids"),
    "niah_multivalue": NiahConfig("essay", "words", "numbers", num_v=4),
    "niah_multiquery": NiahConfig("essay", "words", "numbers", num_q=4),
}
VT_CHAINS, VT_HOPS = 1, 4
CWE_NUM, CWE_FREQ, CWE_UFREQ = 10, 30, 3
FWE_ALPHA, FWE_WORDLEN = 2.0, 6


def family(task: str) -> str:
    """The template family of a task: ``niah``, ``vt``, ``cwe`` or ``fwe``."""
    return "niah" if task in NIAH_TASKS else task


@lru_cache(maxsize=1)
def essay_words() -> tuple[str, ...]:
    """The essay haystack as words: the committed prose, whitespace-normalised (RULER splits its essays the same)."""
    text = " ".join(row["text"] for row in read_data("haystack"))
    return tuple(re.sub(r"\s+", " ", text).strip().split(" "))


def sentences(text: str) -> list[str]:
    """Sentences of prose for needle depths (RULER uses nltk's ``sent_tokenize``; a split after ``.!?`` followed by
    a space and a capital or quote does the same job on this text)."""
    return [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"(])", text.strip()) if s]


@lru_cache(maxsize=1)
def key_words() -> tuple[str, ...]:
    """RULER's ``adjective-noun`` keys, sorted (its list is sorted too)."""
    return tuple(sorted(f"{a}-{n}" for a in ADJECTIVES for n in NOUNS))


@lru_cache(maxsize=1)
def common_words() -> tuple[str, ...]:
    """The vocabulary ``cwe`` draws from: distinct lower-case alphabetic words of 3-12 letters of the prose, and the
    key lists' words, sorted."""
    found = {w.lower() for w in re.findall(r"[A-Za-z]+", " ".join(essay_words()))}
    found |= set(ADJECTIVES) | set(NOUNS)
    return tuple(sorted(w for w in found if 3 <= len(w) <= 12))


__all__ = [
    "CWE_FREQ",
    "CWE_NUM",
    "CWE_TEMPLATE",
    "CWE_UFREQ",
    "DEPTHS",
    "FWE_ALPHA",
    "FWE_TEMPLATE",
    "FWE_WORDLEN",
    "NIAH_TASKS",
    "NIAH_TEMPLATE",
    "NOISE_SENTENCES",
    "RULER_TASKS",
    "TOKENS_TO_GENERATE",
    "VT_CHAINS",
    "VT_HOPS",
    "VT_TEMPLATE",
    "NiahConfig",
    "RulerTaskName",
    "common_words",
    "essay_words",
    "family",
    "key_words",
    "sentences",
]

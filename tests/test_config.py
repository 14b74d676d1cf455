"""Policy documents: validation messages (one test per bad field), presets, quirks, overrides, round trips."""

from __future__ import annotations

import types
from typing import Literal

import pytest
import torch
import yaml
from pydantic import BaseModel, Field

from kvpolicy.config import (
    PartRef,
    PolicyConfigError,
    PolicySpec,
    load_policy,
    merge_documents,
    policy_to_dict,
    resolve_policy,
)
from kvpolicy.hookspecs import PartSpec, PresetSpec, hookimpl
from kvpolicy.core.policy import CachePolicy, Reduction
from kvpolicy.registry import Registry


# ------------------------------------------------------------------------------------------------ test parts
class FreqParams(BaseModel):
    per_head: bool = False
    quirk_ranking: bool = False


class DistanceParams(BaseModel):
    offset: int = Field(default=-25, description="drop index relative to the end of the prompt")
    quirk_ranking: bool = False


class AnchorParams(BaseModel):
    similarity: Literal["position", "cosine"] = "position"
    weight: float = Field(default=1.0, gt=0, le=2)
    quirk_shift: bool = False


class PyramidParams(BaseModel):
    beta: float = Field(default=20.0, ge=0)


class NoParams(BaseModel):
    pass


class Scorer:
    needs = frozenset()

    def __init__(self, params):
        self.params = params

    def score(self, view):
        return torch.zeros(1, 1, 1)

    def drop_scores(self, view):
        return torch.zeros(1, 1, 1)


class Red:
    def __init__(self, params):
        self.params = params

    def reduce(self, view, scores, keep):
        return Reduction(index=torch.zeros(1, 1, 1, dtype=torch.long), valid=torch.ones(1, 1, 1, dtype=torch.bool))


class Alloc:
    def __init__(self, params):
        self.params = params

    def layer_keep(self, layer_idx, num_layers, keep, n_tokens):
        return keep


def _boom(params):
    raise RuntimeError("cannot build this")


PARTS = [
    PartSpec("frequency", "encode", FreqParams, Scorer, "attention received"),
    PartSpec(
        "headwise", "encode", NoParams, Scorer, "per-head scores", provides=frozenset({"scores", "per_head_scores"})
    ),
    PartSpec("exploding", "encode", NoParams, _boom, "factory raises"),
    PartSpec("distance", "decode", DistanceParams, Scorer, "distance offset"),
    PartSpec("evict", "reducer", NoParams, Red, "keep the top-scored"),
    PartSpec("anchor_merge", "reducer", AnchorParams, Red, "merge into anchors"),
    PartSpec("headmerge", "reducer", NoParams, Red, "needs per-head scores", requires=frozenset({"per_head_scores"})),
    PartSpec("pyramid", "allocator", PyramidParams, Alloc, "pyramid budgets"),
]
PRESETS = [
    PresetSpec(
        "elastic",
        "Elastic Cache",
        {"encode": "frequency", "reducer": "anchor_merge", "decode": {"name": "distance", "offset": -25}},
    ),
    PresetSpec(
        "elastic20", "Elastic Cache at ratio 0.2", {"preset": "elastic", "ratio": 0.2, "decode_budget": "fraction"}
    ),
    PresetSpec(
        "elastic_ref",
        "with quirks",
        {"preset": "elastic", "ratio": 0.2, "reference_quirks": {"shift": True, "drop_after_attention": True}},
    ),
    PresetSpec("bad_quirk", "a typo", {"preset": "elastic", "reference_quirks": {"shfit": True}}),
    PresetSpec("loop_a", "cycle", {"preset": "loop_b"}),
    PresetSpec("loop_b", "cycle", {"preset": "loop_a"}),
]


@pytest.fixture
def reg() -> Registry:
    module = types.ModuleType("test_config_parts")
    module.kvpolicy_parts = hookimpl(lambda: PARTS)
    module.kvpolicy_presets = hookimpl(lambda: PRESETS)
    registry = Registry(entry_points=())
    assert registry.register_module(module, source="test-pkg") == []
    return registry


def _error(reg, doc, **kw) -> str:
    with pytest.raises(PolicyConfigError) as info:
        load_policy(doc, registry=reg, **kw)
    return str(info.value)


# -------------------------------------------------------------------------------------------------- good input
def test_good_policy_builds(reg):
    policy = load_policy(
        {
            "encode": {"name": "frequency", "per_head": True},
            "decode": {"name": "distance", "offset": -10},
            "reducer": "anchor_merge",
            "allocator": "pyramid",
            "ratio": 0.2,
            "name": "mine",
        },
        registry=reg,
    )
    assert isinstance(policy, CachePolicy) and policy.name == "mine"
    assert isinstance(policy.encode, Scorer) and policy.encode.params.per_head is True
    assert policy.decode.params.offset == -10
    assert isinstance(policy.reducer, Red) and isinstance(policy.reducer.params, AnchorParams)
    assert isinstance(policy.allocator, Alloc)
    assert policy.budget.ratio == 0.2 and policy.budget.tokens is None and policy.budget.decode == "fraction"
    assert not policy.drop_after_attention and not policy.compressed_positions


def test_defaults_reducer_evict_and_token_budget(reg):
    policy = load_policy({"encode": "frequency", "tokens": 64}, registry=reg)
    assert isinstance(policy.reducer.params, NoParams)  # the registered 'evict'
    assert policy.decode is None and policy.allocator is None and policy.name == "custom"
    assert policy.budget.tokens == 64 and policy.budget.decode == "fixed"
    # no encode scorer: no prefill compression
    assert load_policy({"decode": "distance", "ratio": 0.5}, registry=reg).encode is None


def test_no_evict_registered_reducer_must_be_named():
    module = types.ModuleType("test_config_no_evict")
    module.kvpolicy_parts = hookimpl(lambda: [p for p in PARTS if p.name != "evict"])
    registry = Registry(entry_points=())
    assert registry.register_module(module, source="test-pkg") == []
    for doc in ({"encode": "frequency", "ratio": 0.5}, {"decode": "distance", "ratio": 0.5}):
        msg = _error(registry, doc)
        assert msg.startswith("reducer: required") and "'evict'" in msg, msg
        assert "available: anchor_merge, headmerge" in msg and "\n" not in msg
    policy = load_policy({"decode": "distance", "reducer": "anchor_merge", "ratio": 0.5}, registry=registry)
    assert isinstance(policy.reducer, Red) and isinstance(policy.reducer.params, AnchorParams)


def test_yaml_file_and_yaml_text(reg, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "encode: frequency\ndecode:\n  name: distance\n  offset: 7\nratio: 0.25\ndecode_budget: off_\n".replace(
            "off_", "fixed"
        )
    )
    policy = load_policy(path, registry=reg)
    assert policy.decode.params.offset == 7 and policy.budget.decode == "fixed"
    assert load_policy(str(path), registry=reg).budget.ratio == 0.25
    assert load_policy("encode: frequency\ntokens: 3\n", registry=reg).budget.tokens == 3
    assert load_policy(
        PolicySpec(encode=PartRef(name="frequency", per_head=True), ratio=0.1), registry=reg
    ).encode.params.per_head


# ------------------------------------------------------------------------------------------- one test per field
def test_unknown_part_name_lists_available(reg):
    msg = _error(reg, {"encode": "frequency", "reducer": "anchr_merge", "ratio": 0.2})
    assert "reducer.name" in msg and "unknown reducer 'anchr_merge'" in msg
    assert "available: anchor_merge, evict, headmerge" in msg and "did you mean 'anchor_merge'" in msg
    msg = _error(reg, {"encode": "freq", "ratio": 0.2})
    assert "encode.name" in msg and "unknown encode scorer 'freq'" in msg and "frequency" in msg


def test_ratio_out_of_range(reg):
    msg = _error(reg, {"encode": "frequency", "ratio": 1.5})
    assert msg.startswith("ratio:") and "1.5" in msg and "[0, 1)" in msg


def test_tokens_zero(reg):
    msg = _error(reg, {"encode": "frequency", "tokens": 0})
    assert msg.startswith("tokens:") and ">= 1" in msg


def test_both_ratio_and_tokens(reg):
    msg = _error(reg, {"encode": "frequency", "ratio": 0.2, "tokens": 10})
    assert "ratio" in msg and "tokens" in msg and "exactly one" in msg


def test_no_budget(reg):
    msg = _error(reg, {"encode": "frequency"})
    assert msg.startswith("ratio:") and "tokens" in msg


def test_offset_of_wrong_type(reg):
    msg = _error(reg, {"decode": {"name": "distance", "offset": "far"}, "ratio": 0.2})
    assert msg.startswith("decode.offset:") and "expected int" in msg and "'far'" in msg


def test_param_out_of_range_and_bad_choice(reg):
    msg = _error(reg, {"encode": "frequency", "reducer": {"name": "anchor_merge", "weight": 3}, "ratio": 0.2})
    assert "reducer.weight" in msg and "(0, 2]" in msg
    msg = _error(reg, {"encode": "frequency", "reducer": {"name": "anchor_merge", "similarity": "l2"}, "ratio": 0.2})
    assert "reducer.similarity" in msg and "'l2'" in msg and "'position', 'cosine'" in msg


def test_unknown_parameter(reg):
    msg = _error(reg, {"decode": {"name": "distance", "ofset": -3}, "ratio": 0.2})
    assert "decode.ofset" in msg and "unknown parameter" in msg and "did you mean 'offset'" in msg


def test_reducer_capability_missing(reg):
    msg = _error(reg, {"encode": "frequency", "reducer": "headmerge", "ratio": 0.2})
    assert msg.startswith("reducer:") and "per_head_scores" in msg and "'frequency'" in msg
    # a scorer that provides it is fine, but a decode scorer that does not is reported too
    load_policy({"encode": "headwise", "reducer": "headmerge", "ratio": 0.2}, registry=reg)
    msg = _error(reg, {"encode": "headwise", "decode": "distance", "reducer": "headmerge", "ratio": 0.2})
    assert "reducer" in msg and "per_head_scores" in msg and "'distance'" in msg


def test_unknown_quirk_name(reg):
    msg = _error(reg, {"preset": "elastic", "ratio": 0.2, "reference_quirks": {"rankin": True}})
    assert "reference_quirks.rankin" in msg and "unknown quirk" in msg
    for known in ("compressed_positions", "drop_after_attention", "ranking", "shift"):
        assert known in msg


def test_bad_yaml_syntax_names_file_and_line(reg, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("encode: frequency\nratio: 0.2\ndecode: {name: distance, offset: -3\nreducer: evict\n")
    msg = _error(reg, path)
    assert str(path) in msg and "line" in msg and "YAML" in msg
    path.write_text("encode: frequency\n  ratio: 0.2\n")
    msg = _error(reg, path)
    assert f"{path}:2:" in msg and "line 2" in msg


def test_unknown_top_level_field(reg):
    msg = _error(reg, {"encode": "frequency", "ratio": 0.2, "ratoi": 0.3})
    assert msg.startswith("ratoi:") and "unknown field" in msg and "ratio" in msg


def test_decode_budget_choices_and_fraction_needs_ratio(reg):
    msg = _error(reg, {"encode": "frequency", "ratio": 0.2, "decode_budget": "sliding"})
    assert msg.startswith("decode_budget:") and "'fraction', 'fixed', 'off'" in msg
    msg = _error(reg, {"encode": "frequency", "tokens": 5, "decode_budget": "fraction"})
    assert msg.startswith("decode_budget:") and "ratio" in msg


def test_part_of_wrong_shape_and_reference_quirks_type(reg):
    msg = _error(reg, {"encode": 5, "ratio": 0.2})
    assert msg.startswith("encode:")
    msg = _error(reg, {"encode": "frequency", "ratio": 0.2, "reference_quirks": "sometimes"})
    assert msg.startswith("reference_quirks:") and "bool | dict[str, bool]" in msg


def test_every_problem_is_reported_at_once(reg):
    with pytest.raises(PolicyConfigError) as info:
        load_policy(
            {"encode": "nope", "decode": {"name": "distance", "offset": []}, "ratio": 2, "junk": 1}, registry=reg
        )
    paths = info.value.paths
    assert set(paths) == {"encode.name", "decode.offset", "ratio", "junk"}
    assert isinstance(info.value, ValueError)


def test_factory_failure_names_the_part(reg):
    msg = _error(reg, {"encode": "exploding", "ratio": 0.2})
    assert msg.startswith("encode:") and "exploding" in msg and "cannot build this" in msg


def test_unknown_and_cyclic_presets(reg):
    msg = _error(reg, {"preset": "elastc", "ratio": 0.2})
    assert msg.startswith("preset:") and "elastic" in msg
    assert "cycle" in _error(reg, {"preset": "loop_a", "ratio": 0.2})


# ------------------------------------------------------------------------------------------------------ presets
def test_preset_with_overrides(reg):
    policy = load_policy({"preset": "elastic", "ratio": 0.3, "decode": {"offset": -10}}, registry=reg)
    assert policy.name == "elastic"
    assert isinstance(policy.encode.params, FreqParams) and isinstance(policy.reducer.params, AnchorParams)
    assert policy.decode.params.offset == -10  # same part (name inherited): params deep-merged
    assert policy.budget.ratio == 0.3

    # a different part name replaces the preset's part; null removes it
    policy = load_policy({"preset": "elastic", "ratio": 0.3, "encode": "headwise", "decode": None}, registry=reg)
    assert policy.encode.params == NoParams() and policy.decode is None

    # a preset naming a preset, and a user budget replacing the preset's
    policy = load_policy("elastic20", registry=reg)
    assert policy.name == "elastic20" and policy.budget.ratio == 0.2 and policy.decode.params.offset == -25
    policy = load_policy({"preset": "elastic20", "tokens": 32, "decode_budget": "fixed"}, registry=reg)
    assert policy.budget.tokens == 32 and policy.budget.ratio is None


def test_dotted_overrides(reg):
    policy = load_policy(
        {"preset": "elastic"}, registry=reg, overrides={"ratio": 0.4, "encode.per_head": True, "decode.offset": 3}
    )
    assert policy.budget.ratio == 0.4 and policy.encode.params.per_head and policy.decode.params.offset == 3
    policy = load_policy({"encode": "frequency", "tokens": 8}, registry=reg, overrides={"ratio": 0.1})
    assert policy.budget.ratio == 0.1 and policy.budget.tokens is None  # an override's budget replaces the document's


def test_merge_documents_rules():
    base = {"encode": {"name": "a", "x": 1, "sub": {"p": 1, "q": 2}}, "ratio": 0.2, "reference_quirks": {"r": True}}
    out = merge_documents(base, {"encode": {"sub": {"q": 3}}, "tokens": 5, "reference_quirks": {"s": False}})
    assert out == {
        "encode": {"name": "a", "x": 1, "sub": {"p": 1, "q": 3}},
        "tokens": 5,
        "reference_quirks": {"r": True, "s": False},
    }
    assert merge_documents(base, {"encode": "b"})["encode"] == {"name": "b"}
    assert base["encode"]["sub"] == {"p": 1, "q": 2}  # inputs untouched


# ------------------------------------------------------------------------------------------------------- quirks
def test_reference_quirks_true_turns_on_everything(reg):
    policy = load_policy({"preset": "elastic", "ratio": 0.2, "reference_quirks": True}, registry=reg)
    assert policy.encode.params.quirk_ranking and policy.decode.params.quirk_ranking
    assert policy.reducer.params.quirk_shift
    assert policy.drop_after_attention and policy.compressed_positions


def test_reference_quirks_by_name(reg):
    policy = load_policy(
        {"preset": "elastic", "ratio": 0.2, "reference_quirks": {"shift": True, "compressed_positions": True}},
        registry=reg,
    )
    assert policy.reducer.params.quirk_shift and policy.compressed_positions
    assert not policy.encode.params.quirk_ranking and not policy.drop_after_attention
    # a name shared by two parts turns on both; a part-qualified name only one
    policy = load_policy({"preset": "elastic", "ratio": 0.2, "reference_quirks": {"ranking": True}}, registry=reg)
    assert policy.encode.params.quirk_ranking and policy.decode.params.quirk_ranking
    policy = load_policy(
        {"preset": "elastic", "ratio": 0.2, "reference_quirks": {"encode.ranking": True}}, registry=reg
    )
    assert policy.encode.params.quirk_ranking and not policy.decode.params.quirk_ranking
    # an explicit quirk parameter on a part wins over reference_quirks
    policy = load_policy(
        {"preset": "elastic", "ratio": 0.2, "reference_quirks": True, "reducer": {"quirk_shift": False}}, registry=reg
    )
    assert not policy.reducer.params.quirk_shift and policy.encode.params.quirk_ranking
    resolved = resolve_policy({"preset": "elastic", "ratio": 0.2, "reference_quirks": True}, registry=reg)
    assert resolved.quirks == {
        "encode.quirk_ranking": True,
        "decode.quirk_ranking": True,
        "reducer.quirk_shift": True,
        "drop_after_attention": True,
        "compressed_positions": True,
    }


def test_quirks_inherited_from_a_preset(reg):
    policy = load_policy("elastic_ref", registry=reg)
    assert policy.reducer.params.quirk_shift and policy.drop_after_attention
    assert not policy.encode.params.quirk_ranking
    # the user turns one off, key by key
    policy = load_policy({"preset": "elastic_ref", "reference_quirks": {"shift": False}}, registry=reg)
    assert not policy.reducer.params.quirk_shift and policy.drop_after_attention
    # the user replaces the part that had the preset's quirk: the inherited name no longer applies and is dropped
    policy = load_policy({"preset": "elastic_ref", "reducer": "evict"}, registry=reg)
    assert policy.drop_after_attention
    # ... but a quirk the user names must exist
    msg = _error(reg, {"preset": "elastic_ref", "reducer": "evict", "reference_quirks": {"shift": True}})
    assert "reference_quirks.shift" in msg and "unknown quirk" in msg
    # a preset's own typo is caught by the preset check that `kvpolicy plugins` shows
    from kvpolicy.config import preset_problems

    problems = preset_problems(reg)
    assert problems["elastic"] is None and problems["elastic_ref"] is None
    assert "reference_quirks.shfit" in problems["bad_quirk"] and "cycle" in problems["loop_a"]


# ---------------------------------------------------------------------------------------------------- writing back
def test_policy_to_dict_round_trip(reg, tmp_path):
    doc = {
        "preset": "elastic",
        "ratio": 0.2,
        "decode": {"offset": -7},
        "reference_quirks": {"ranking": True, "drop_after_attention": True},
    }
    policy = load_policy(doc, registry=reg)
    out = policy_to_dict(policy)
    assert "preset" not in out and out["name"] == "elastic"
    assert out["decode"] == {"name": "distance", "offset": -7, "quirk_ranking": True}
    assert out["reducer"] == {"name": "anchor_merge", "similarity": "position", "weight": 1.0, "quirk_shift": False}
    assert "decode_budget" not in out  # the default for a ratio is not written out
    assert out["reference_quirks"] == {"drop_after_attention": True}
    path = tmp_path / "best.yaml"
    path.write_text(yaml.safe_dump(out, sort_keys=False))
    again = load_policy(path, registry=reg)
    assert policy_to_dict(again) == out
    assert again.drop_after_attention and not again.compressed_positions
    # an unresolved PolicySpec is written as it stands
    assert policy_to_dict(PolicySpec(preset="elastic", ratio=0.2)) == {"preset": "elastic", "ratio": 0.2}
    with pytest.raises(TypeError):
        policy_to_dict(CachePolicy(reducer=Red(None), budget=policy.budget))

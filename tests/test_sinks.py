"""The policy's protected sinks, stated once (``CachePolicy.sinks``, ``PolicySpec.sinks``, ``LayerView.sinks``): how
the number is derived, checked, written back, and handed to every part by the engine; third-party parts unchanged."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import build_model, make_batch
from kvpolicy_plugins import elastic
from kvpolicy_plugins.elastic import AnchorMerge, DistanceOffset, FrequencyScorer

import kvpolicy
from kvpolicy import Budget, CachePolicy, LayerView
from kvpolicy.config import PolicyConfigError, load_policy, policy_to_dict
from kvpolicy.registry import Registry

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "kvpolicy-example-plugin"


@pytest.fixture(scope="module")
def reg() -> Registry:
    registry = Registry(entry_points=())
    assert registry.register_module(elastic, source="kvpolicy") == []
    from kvpolicy_plugins import evict, local

    for module in (evict, local):
        assert registry.register_module(module, source="kvpolicy") == []
    return registry


def test_layer_view_default_and_sink_mask():
    """LayerView built the old way (no ``sinks``) protects nothing; ``sink_mask`` follows positional rank per row."""
    pos = torch.tensor([[[5, 2, 9, 7, 3]]])
    valid = torch.tensor([[[True, False, True, True, True]]])
    z = torch.zeros(1, 1, 5, 2)
    view = LayerView(0, 1, "decode", z, z, valid, pos, 10, torch.tensor([4]), 1, torch.zeros(1, 1, 5, dtype=torch.int8))
    assert view.sinks == 0 and not bool(view.sink_mask().any())
    view.sinks = 2  # the two oldest *valid* entries: positions 3 and 5 (position 2 is invalid)
    assert view.sink_mask().tolist() == [[[True, False, False, False, True]]]


def test_cache_policy_derives_and_checks_sinks():
    budget = Budget(ratio=0.5)
    parts = dict(encode=FrequencyScorer(), decode=DistanceOffset())
    assert CachePolicy(reducer=AnchorMerge(start_size=3), budget=budget, **parts).sinks == 3  # derived
    assert CachePolicy(reducer=AnchorMerge(start_size=3), budget=budget, sinks=3, **parts).sinks == 3
    with pytest.raises(ValueError, match=r"reducer \(AnchorMerge\) protects 3 sinks .* sinks=1"):
        CachePolicy(reducer=AnchorMerge(start_size=3), budget=budget, sinks=1, **parts)
    with pytest.raises(ValueError, match="sinks must be an int >= 0"):
        CachePolicy(reducer=AnchorMerge(start_size=3), budget=budget, sinks=-1, **parts)

    class Plain:  # a third-party reducer states nothing: 0, or whatever the policy says
        def reduce(self, view, scores, keep):
            raise AssertionError

    assert CachePolicy(reducer=Plain(), budget=budget).sinks == 0
    assert CachePolicy(reducer=Plain(), budget=budget, sinks=4).sinks == 4


def test_engine_hands_the_sinks_to_every_part():
    """A part that reads ``view.sinks`` gets the policy's number at prefill and at every decode step."""
    seen: list[tuple[str, int]] = []

    class Reader:
        needs = frozenset()

        def score(self, view):
            seen.append(("encode", view.sinks))
            return view.positions[:, :1].float()

        def drop_scores(self, view):
            seen.append(("decode", view.sinks))
            return view.positions[:, :1].float()

    model = build_model("llama")
    kvpolicy.attach(model)
    reader = Reader()
    policy = CachePolicy(reducer=AnchorMerge(start_size=2), budget=Budget(ratio=0.5), encode=reader, decode=reader)
    cache = kvpolicy.make_cache(model, policy)
    model.generate(**make_batch(2, 12, pads=[0, 3]), past_key_values=cache, max_new_tokens=4, min_new_tokens=4,
                   do_sample=False, pad_token_id=0)
    assert {s for _, s in seen} == {2} and {k for k, _ in seen} == {"encode", "decode"}


@pytest.mark.parametrize(
    ("doc", "sinks"),
    [
        ({"preset": "elastic"}, 1),
        ({"preset": "elastic", "sinks": 4}, 4),  # the user's sinks fill anchor_merge.start_size
        ({"preset": "elastic", "reducer": {"start_size": 3}}, 3),  # the user's parameter wins over the preset's sinks
        ({"preset": "elastic", "sinks": 2, "reducer": {"start_size": 2}}, 2),  # both, agreeing
        ({"preset": "elastic_reference", "ratio": 0.5}, 1),
        ({"encode": "frequency", "reducer": {"name": "anchor_merge", "start_size": 0}, "ratio": 0.5}, 0),
        ({"encode": "frequency", "reducer": "anchor_merge", "decode": "distance_offset", "ratio": 0.5}, 1),  # default
        ({"preset": "elastic", "reducer": "evict"}, 1),  # the preset's number stays for the parts that read it
        ({"encode": "local", "reducer": "evict", "ratio": 0.5}, None),  # nothing states it
    ],
)
def test_config_states_the_sinks_once(reg, doc, sinks):
    policy = load_policy(doc, registry=reg)
    assert policy.sinks == (sinks or 0)
    if isinstance(policy.reducer, AnchorMerge):
        assert policy.reducer.params.start_size == sinks
    written = policy_to_dict(policy)
    assert written.get("sinks") == sinks
    again = load_policy(written, registry=reg)  # the explicit document loads to the same policy
    assert again.sinks == policy.sinks and policy_to_dict(again) == written


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        ({"preset": "elastic", "sinks": 4, "reducer": {"start_size": 1}}, "reducer.start_size"),
        ({"preset": "elastic", "sinks": -1}, "sinks"),
        ({"preset": "elastic", "sinks": "one"}, "sinks"),
    ],
)
def test_config_rejects_disagreeing_or_invalid_sinks(reg, doc, path):
    with pytest.raises(PolicyConfigError) as info:
        load_policy(doc, registry=reg)
    assert info.value.paths == [path], str(info.value)
    assert "\n" not in str(info.value)


def test_overrides_set_the_sinks(reg):
    """A sweep or CLI override of the policy's sinks reaches every part that repeats it."""
    policy = load_policy("elastic", registry=reg, overrides={"sinks": 4})
    assert policy.sinks == 4 and policy.reducer.params.start_size == 4


def test_example_plugin_unchanged(reg):
    """The example third-party scorer (with its own ``sinks`` parameter and attribute) still builds and runs in a
    policy; it states nothing to the policy (no ``protected_sinks``)."""
    path = EXAMPLE / "src" / "kvpolicy_example_plugin" / "__init__.py"
    spec = importlib.util.spec_from_file_location("kvpolicy_example_plugin_sinks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    local_reg = Registry(entry_points=())
    assert local_reg.register_module(module, source="kvpolicy-example-plugin") == []
    from kvpolicy_plugins import evict

    assert local_reg.register_module(evict, source="kvpolicy") == []
    policy = load_policy({"encode": {"name": "key_norm_example", "sinks": 3}, "ratio": 0.5}, registry=local_reg)
    assert policy.sinks == 0 and policy.encode.sinks == 3
    model = build_model("llama")
    kvpolicy.attach(model)
    out = model.generate(**make_batch(1, 10), past_key_values=kvpolicy.make_cache(model, policy), max_new_tokens=3,
                         do_sample=False, pad_token_id=0)
    assert out.shape == (1, 13)

"""A plugin part that returns something unusable fails with one line naming the part and its package (PartError).

The parts below come from an in-process plugin registered as package ``kvpolicy-myplugin``; each has a ``mode``
parameter that makes it misbehave in one way. Expected messages are written out literally from the tiny model's
dimensions (batch 2, left padding, 2 kv heads, head dim 16, 16 prompt columns)."""

from __future__ import annotations

import types
from importlib.metadata import EntryPoint

import pytest
import torch
from pydantic import BaseModel

import kvpolicy
from conftest import PAD, build_model, make_batch
from kvpolicy import PartError, Reduction, select_top
from kvpolicy.config import PolicyConfigError, load_policy
from kvpolicy.hookspecs import ENTRY_POINT_GROUP, PartSpec, hookimpl
from kvpolicy.core.partcheck import all_finite, has_nan
from kvpolicy.registry import Registry, UnknownPartError

PACKAGE = "kvpolicy-myplugin"
B, H, P, D = 2, 2, 16, 16  # batch, kv heads, prompt columns (= prefill slots), head dim of the tiny model


class Mode(BaseModel):
    mode: str = "ok"


def _recency(view) -> torch.Tensor:
    return view.positions.to(torch.float32)


class Encode:
    needs = frozenset()

    def __init__(self, p: Mode):
        self.mode = p.mode

    def score(self, view):
        s = _recency(view)
        if self.mode == "flat":  # [B, P]: the head axis forgotten
            return s[:, 0]
        if self.mode == "short":  # one slot short
            return s[..., :-1]
        if self.mode == "nan":
            s = s.clone()
            s[0, 0, :3] = float("nan")
            return s
        if self.mode == "list":
            return s.tolist()
        if self.mode == "bool":
            return s > 3
        return s


class Decode(Encode):
    def drop_scores(self, view):
        s = _recency(view)
        if self.mode == "nan":
            return torch.full_like(s, float("nan"))
        if self.mode == "wide":  # three heads on a two-head cache
            return s[:, :1].expand(B, 3, s.shape[-1])
        return s


class Reducer:
    def __init__(self, p: Mode):
        self.mode = p.mode

    def reduce(self, view, scores, keep):
        red = select_top(view, scores, keep)
        if self.mode == "range":
            return Reduction(index=torch.full_like(red.index, view.num_slots), valid=red.valid)
        if self.mode == "int32":
            return Reduction(index=red.index.to(torch.int32), valid=red.valid)
        if self.mode == "pads":  # keep the first slots, which are padding in row 1
            return Reduction(index=torch.arange(4).expand(B, H, 4).clone(), valid=torch.ones(B, H, 4, dtype=torch.bool))
        if self.mode == "nan_keys":
            keys = view.keys.gather(2, red.index[..., None].expand(*red.index.shape, view.keys.shape[-1])).clone()
            keys[1, 0, 0, 0] = float("nan")
            return Reduction(index=red.index, valid=red.valid, keys=keys)
        if self.mode == "float_values":
            values = view.values.gather(2, red.index[..., None].expand(*red.index.shape, view.values.shape[-1]))
            return Reduction(index=red.index, valid=red.valid, values=values.to(torch.float64))
        if self.mode == "tuple":
            return red.index, red.valid
        return red

    def on_drop(self, view, victims, victim_valid):
        if self.mode == "drop_inf":
            keys = view.keys.clone()
            keys[0, 1, 2, 3] = float("inf")
            return keys, view.values
        if self.mode == "drop_short":
            return view.keys[:, :, :-1], view.values
        return None


class Allocator:
    def __init__(self, p: Mode):
        self.mode = p.mode

    def layer_keep(self, layer_idx, num_layers, keep, n_tokens):
        if self.mode == "float":
            return keep.to(torch.float32)
        if self.mode == "per_head":
            return keep[:, None].expand(B, H)
        if self.mode == "negative":
            return keep - 100
        return keep


@hookimpl
def kvpolicy_parts() -> list[PartSpec]:
    return [
        PartSpec("vnorm_recent", "encode", Mode, Encode, "recency, with a way to fail"),
        PartSpec("vnorm_drop", "decode", Mode, Decode, "recency drops, with a way to fail"),
        PartSpec("shaky_reduce", "reducer", Mode, Reducer, "top-k with a way to fail"),
        PartSpec("shaky_alloc", "allocator", Mode, Allocator, "identity allocator with a way to fail"),
    ]


@pytest.fixture(scope="module")
def registry() -> Registry:
    reg = Registry(entry_points=())
    mod = types.ModuleType("myplugin")
    mod.kvpolicy_parts = kvpolicy_parts
    assert reg.register_module(mod, source=PACKAGE) == []
    return reg


@pytest.fixture(scope="module")
def model():
    return kvpolicy.attach(build_model("llama"))


def _policy(registry, encode="ok", decode="ok", reducer="ok", allocator: str | None = None):
    doc = {
        "encode": {"name": "vnorm_recent", "mode": encode},
        "decode": {"name": "vnorm_drop", "mode": decode},
        "reducer": {"name": "shaky_reduce", "mode": reducer},
        "ratio": 0.5,
    }
    if allocator is not None:
        doc["allocator"] = {"name": "shaky_alloc", "mode": allocator}
    return load_policy(doc, registry=registry)


def _generate(model, policy, n: int = 6):
    batch = make_batch(B, P, [0, 3])
    cache = kvpolicy.make_cache(model, policy)
    return model.generate(**batch, past_key_values=cache, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=PAD)


def _error(model, policy) -> PartError:
    with pytest.raises(PartError) as info:
        _generate(model, policy)
    msg = str(info.value)
    assert "\n" not in msg
    return info.value


ENC = f"encode scorer 'vnorm_recent' from package {PACKAGE}"
DEC = f"decode scorer 'vnorm_drop' from package {PACKAGE}"
RED = f"reducer 'shaky_reduce' from package {PACKAGE}"
ALLOC = f"allocator 'shaky_alloc' from package {PACKAGE}"

CASES: list[tuple[dict[str, str], str]] = [
    ({"encode": "flat"}, f"{ENC} returned shape ({B}, {P}); expected scores [B, H or 1, P] = [{B}, {H}, {P}] "
                         "(layer 0, prefill)"),
    ({"encode": "short"}, f"{ENC} returned shape ({B}, {H}, {P - 1}); expected scores [B, H or 1, P] = "
                          f"[{B}, {H}, {P}] (layer 0, prefill)"),
    ({"encode": "nan"}, f"{ENC} returned NaN in 3 of {B * H * P} scores; scores must not be NaN (+inf marks a slot "
                        "that must never be dropped) (layer 0, prefill)"),
    ({"encode": "list"}, f"{ENC} returned list; expected scores [B, H or 1, P] = [{B}, {H}, {P}] as a torch.Tensor "
                         "(layer 0, prefill)"),
    ({"encode": "bool"}, f"{ENC} returned dtype torch.bool; scores must be real numbers (float) (layer 0, prefill)"),
    ({"decode": "nan"}, f"{DEC} returned NaN in {B * H * (P // 2)} of {B * H * (P // 2)} drop scores; drop scores "
                        "must not be NaN (+inf marks a slot that must never be dropped) (layer 0, decode)"),
    ({"decode": "wide"}, f"{DEC} returned shape ({B}, 3, {P // 2}); expected drop scores [B, H or 1, P] = "
                         f"[{B}, {H}, {P // 2}] (layer 0, decode)"),
    ({"reducer": "range"}, f"{RED} returned slot indices in [{P}, {P}]; the view has slots [0, {P}) "
                           "(layer 0, prefill)"),
    ({"reducer": "int32"}, f"{RED} returned index as torch.int32 on cpu; expected int64 slot indices on cpu "
                           "(layer 0, prefill)"),
    ({"reducer": "pads"}, f"{RED} kept an invalid (padding or freed) slot (layer 0, prefill)"),
    ({"reducer": "nan_keys"}, f"{RED} reduce returned keys with 1 NaN/inf of {B * H * (P // 2) * D} entries "
                              "(layer 0, prefill)"),
    ({"reducer": "float_values"}, f"{RED} reduce returned values as torch.float64 on cpu; the cache holds "
                                  "torch.float32 on cpu (layer 0, prefill)"),
    ({"reducer": "tuple"}, f"{RED} reduce returned tuple; expected a kvpolicy.Reduction (layer 0, prefill)"),
    ({"reducer": "drop_inf"}, f"{RED} on_drop returned keys with 1 NaN/inf of {B * H * (P // 2) * D} entries "
                              "(layer 0, decode)"),
    ({"reducer": "drop_short"}, f"{RED} on_drop returned keys of shape ({B}, {H}, {P // 2 - 1}, {D}); expected "
                                f"[B, H, K, D] = [{B}, {H}, {P // 2}, {D}] (layer 0, decode)"),
    ({"allocator": "float"}, f"{ALLOC} returned dtype torch.float32; expected int64 [B] = [{B}] entries to keep per "
                             "row (layer 0)"),
    ({"allocator": "per_head"}, f"{ALLOC} returned shape ({B}, {H}); expected int64 [B] = [{B}] entries to keep per "
                                "row (layer 0)"),
    ({"allocator": "negative"}, f"{ALLOC} returned negative budgets [-92, -93] (layer 0)"),
]


@pytest.mark.parametrize("modes, expected", CASES, ids=[next(iter(m.values())) for m, _ in CASES])
def test_part_output_errors_name_the_part_and_package(registry, model, modes, expected):
    err = _error(model, _policy(registry, **modes))
    assert str(err) == expected
    assert err.part.endswith(f"from package {PACKAGE}") and err.layer == 0


def test_well_behaved_parts_of_the_same_plugin_run(registry, model):
    """The checks do not fire on valid outputs: with every mode ``ok`` the run completes under the budget."""
    out = _generate(model, _policy(registry, allocator="ok"))
    assert out.shape == (B, P + 6)


def test_hand_built_part_is_named_by_class_and_module(model):
    """A policy built in code (no registry) names the part by its class."""
    policy = kvpolicy.CachePolicy(
        reducer=Reducer(Mode()), budget=kvpolicy.Budget(ratio=0.5), encode=Encode(Mode(mode="flat")), name="code"
    )
    err = _error(model, policy)
    assert str(err).startswith(f"encode scorer Encode (module {__name__}) returned shape ({B}, {P});")


def test_part_error_is_a_runtime_error_with_its_fields():
    err = PartError("encode scorer 'x' from package p", "returned shape (1,)", layer=3, stage="decode")
    assert isinstance(err, RuntimeError)
    assert str(err) == "encode scorer 'x' from package p returned shape (1,) (layer 3, decode)"
    assert (err.part, err.problem, err.layer) == ("encode scorer 'x' from package p", "returned shape (1,)", 3)


# ------------------------------------------------------------------------- unknown parts from plugins that failed
def _broken_plugin_registry(tmp_path, monkeypatch) -> Registry:
    """A registry where plugin 'myplugin' of kvpolicy-myplugin raised on import and a healthy one loaded."""
    (tmp_path / "kvp_h2_broken_plugin.py").write_text("import kvp_h2_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry(entry_points=())
    (problem,) = reg.load_entry_point(
        EntryPoint("myplugin", "kvp_h2_broken_plugin", ENTRY_POINT_GROUP), source=PACKAGE
    )
    assert not problem.loaded and problem.part is None
    healthy = types.ModuleType("healthy")
    healthy.kvpolicy_parts = kvpolicy_parts
    assert reg.register_module(healthy, source="kvpolicy-healthy") == []
    return reg


IMPORT_ERROR = (
    f"plugin 'myplugin' (package {PACKAGE}) failed to load: import of 'kvp_h2_broken_plugin' failed: "
    "ModuleNotFoundError: No module named 'kvp_h2_missing_dependency'"
)


def test_unknown_part_says_which_plugin_failed_to_load(tmp_path, monkeypatch):
    reg = _broken_plugin_registry(tmp_path, monkeypatch)
    with pytest.raises(UnknownPartError) as info:
        reg.part("encode", "snapkv")
    assert str(info.value) == f"unknown encode 'snapkv': {IMPORT_ERROR}; available: vnorm_recent"
    # through a policy document: one issue on the field, with the kind spelled out
    with pytest.raises(PolicyConfigError) as info:
        load_policy({"encode": "snapkv", "reducer": "shaky_reduce", "ratio": 0.5}, registry=reg)
    assert str(info.value) == f"encode.name: unknown encode scorer 'snapkv': {IMPORT_ERROR}; available: vnorm_recent"


def test_unknown_part_names_a_plugin_whose_hook_raised():
    reg = Registry(entry_points=())
    mod = types.ModuleType("myplugin")

    @hookimpl
    def kvpolicy_parts_raising():
        raise ImportError("torch_scatter is required")

    mod.kvpolicy_parts = kvpolicy_parts_raising
    (problem,) = reg.register_module(mod, source=PACKAGE, name="myplugin")
    with pytest.raises(UnknownPartError) as info:
        reg.part("decode", "vnorm_drop")
    assert str(info.value) == (
        f"unknown decode 'vnorm_drop': plugin 'myplugin' (package {PACKAGE}) failed to load: hook kvpolicy_parts() "
        "raised ImportError: torch_scatter is required; available: (none registered)"
    )


def test_rejected_part_of_that_name_is_named_instead_of_other_failures(tmp_path, monkeypatch):
    """A plugin that loaded but whose part of that name was rejected is the one to blame, not an unrelated plugin
    that failed to import."""
    reg = _broken_plugin_registry(tmp_path, monkeypatch)
    bad = types.ModuleType("otherplugin")

    @hookimpl
    def kvpolicy_parts_bad():
        return [PartSpec("needs_fix", "reducer", dict, Reducer, "params is not a pydantic model")]

    bad.kvpolicy_parts = kvpolicy_parts_bad
    (problem,) = reg.register_module(bad, source="kvpolicy-other", name="otherplugin")
    assert problem.loaded and problem.part == ("reducer", "needs_fix")
    with pytest.raises(UnknownPartError) as info:
        reg.part("reducer", "needs_fix")
    assert str(info.value) == (
        "unknown reducer 'needs_fix': plugin 'otherplugin' (package kvpolicy-other) could not register it: part "
        "'needs_fix': params must be a pydantic BaseModel subclass, got <class 'dict'>; available: shaky_reduce"
    )
    # a name nobody tried to contribute: every plugin that failed to load is a suspect, rejected parts are not
    with pytest.raises(UnknownPartError) as info:
        reg.part("reducer", "anything")
    assert str(info.value) == f"unknown reducer 'anything': {IMPORT_ERROR}; available: shaky_reduce"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_value_checks_are_exact(dtype):
    """The one-sum fast paths agree with the element-wise tests, including sums that overflow or mix infinities."""
    big = torch.finfo(dtype).max
    cases = [
        [1.0, 2.0, 3.0],
        [1.0, float("nan"), 3.0],
        [float("inf"), 1.0],
        [float("inf"), float("-inf"), 1.0],  # sum NaN, no NaN entry
        [float("-inf"), float("nan")],
        [big, big, big],  # finite entries whose sum may overflow
    ]
    for values in cases:
        t = torch.tensor(values, dtype=dtype)
        assert has_nan(t) == bool(torch.isnan(t).any()), values
        assert all_finite(t) == bool(torch.isfinite(t).all()), values
    assert not has_nan(torch.tensor([1, 2], dtype=torch.long)) and all_finite(torch.tensor([1, 2]))

"""Module layout rules (plugins import shared helpers from kvpolicy, never from each other) and kvpolicy.testing's
random view builder against its documented options."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from kvpolicy import IMAGE, TEXT
from kvpolicy.testing import make_view

ROOT = Path(__file__).resolve().parents[1]
#: the core modules kvpolicy.parts and kvpolicy.testing may build on (never eval, sweep, bench or the CLI)
CORE = {"kvpolicy.core.policy", "kvpolicy.core.budget", "kvpolicy.core.selection", "kvpolicy.hookspecs"}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(relative level, module) of every import statement of a source file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            out.append((node.level, node.module or ""))
        elif isinstance(node, ast.Import):
            out.extend((0, alias.name) for alias in node.names)
    return out


@pytest.mark.parametrize(
    "path", sorted((ROOT / "plugins").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT / "plugins"))
)
def test_plugins_never_import_another_plugin(path):
    """A method too large for one module is a package (plugins/elastic/): its modules import each other
    relatively (level 1, inside the package); anything above that, or by absolute name, is another plugin."""
    in_package = path.parent != ROOT / "plugins"
    bad = [
        m for level, m in _imports(path)
        if (level > 1 or (level == 1 and not in_package)) or m.split(".")[0] == "kvpolicy_plugins"
    ]
    assert not bad, f"{path.name} imports {bad}: shared helpers belong in kvpolicy.parts"


@pytest.mark.parametrize("name", ["parts.py", "testing.py"])
def test_shared_modules_build_on_the_core_only(name):
    found = {m for level, m in _imports(ROOT / "kvpolicy" / name) if m.split(".")[0] == "kvpolicy" or level > 0}
    assert found and found <= CORE, f"kvpolicy/{name} imports {sorted(found - CORE)}"
    assert "pytest" not in {m.split(".")[0] for _, m in _imports(ROOT / "kvpolicy" / name)}


# ---------------------------------------------------------------------------------------------- make_view


@pytest.mark.parametrize("per_head_layout", [False, True])
def test_make_view_pads_holes_and_shuffle(per_head_layout):
    kw = dict(B=3, H=2, P=12, pads=(0, 2, 5), holes=3, per_head_layout=per_head_layout, seed=4)
    plain, shuffled = make_view(**kw), make_view(shuffle=True, **kw)
    for b, pad in enumerate(kw["pads"]):
        for h in range(2):
            cols = plain.positions[b, h].tolist()
            assert cols == list(range(12))
            assert not plain.valid[b, h, :pad].any()
            assert int(plain.valid[b, h].sum()) == 12 - pad - 3  # the holes are among the real tokens
            # shuffled: the same entries (keys, values, validity, type per position), in a permuted slot order
            pos = shuffled.positions[b, h]
            assert sorted(pos.tolist()) == cols and pos.tolist() != cols
            assert torch.equal(shuffled.keys[b, h], plain.keys[b, h, pos])
            assert torch.equal(shuffled.values[b, h], plain.values[b, h, pos])
            assert torch.equal(shuffled.valid[b, h], plain.valid[b, h, pos])
            assert torch.equal(shuffled.token_types[b, h], plain.token_types[b, h, pos])
        assert torch.equal(plain.valid[b, 0], plain.valid[b, 1]) == (not per_head_layout)  # holes per head or not
    assert torch.equal(plain.n_tokens, plain.valid[:, 0].sum(-1))


def test_make_view_statistics_types_and_stage():
    view = make_view(windows=(None, 3), quantize=True, seed=2)
    assert sorted(view.attention, key=repr) == [3, None]
    for att in view.attention.values():
        assert att.shape == (3, 2, 14) and not att[~view.valid].any()
        assert torch.equal(att, att.floor()) and len(set(att[view.valid].tolist())) <= 3  # ties
    assert set(view.token_types.unique().tolist()) == {TEXT, IMAGE}
    text = make_view(windows=(), token_types="text", stage="decode", layer_idx=0, num_layers=1)
    assert text.attention == {} and bool((text.token_types == TEXT).all())
    assert (text.stage, text.new_tokens, text.layer_idx, text.num_layers) == ("decode", 1, 0, 1)
    assert make_view().new_tokens == 14 and make_view(new_tokens=5).new_tokens == 5


def test_every_subpackage_is_listed_for_the_wheel():
    """pyproject lists its packages by hand (plugins/ installs as kvpolicy_plugins); an editable install finds a
    new subpackage anyway, so only a wheel would miss one - this keeps the list in step with the folders."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "kvpolicy").rglob("__init__.py")
    }
    found |= {"kvpolicy.data"} if (ROOT / "kvpolicy" / "data").is_dir() else set()
    assert found - listed == set(), f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"

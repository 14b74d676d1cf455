"""scripts/ruler_calibration.py's table and length rule, on hand-written result files (no model runs).

The rule is the issue's: the longest length where the full cache scores >= 0.5 on at least four RULER tasks; when no
length qualifies, the length with the best average. Expected values below are counted by hand from the inputs.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("ruler_calibration", REPO / "scripts" / "ruler_calibration.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def _cell(directory: Path, length: int, by_kind: dict[str, float], macro: float) -> None:
    doc = {
        "spec": {"task_options": {"context_tokens": length}},
        "model": {"dtype": "torch.bfloat16"},
        "environment": {"cpu": "test cpu", "cpu_count": 2, "torch_threads": 1},
        "full": {"exact_match_by_kind": by_kind, "exact_match_by_kind_ci": {k: [0.0, 1.0] for k in by_kind},
                 "exact_match_macro": macro, "exact_match_macro_ci": [0.1, 0.9], "prompt_tokens": length - 3},
        "samples": [{}] * 22,
        "reference": {"hits": 0, "computed": 22},
        "compute_s": 120.0,
        "wall_s": 180.0,
    }
    (directory / f"calibration-m-{length}.json").write_text(json.dumps(doc))


def test_rule_takes_the_longest_length_with_four_tasks_at_half(tmp_path: Path) -> None:
    cal = _script()
    _cell(tmp_path, 1024, {"a": 1.0, "b": 0.5, "c": 0.6, "d": 0.9, "e": 0.0}, 0.6)  # 4 tasks >= 0.5
    _cell(tmp_path, 2048, {"a": 1.0, "b": 0.5, "c": 0.6, "d": 0.9, "e": 0.0}, 0.6)  # 4 as well: longer wins
    _cell(tmp_path, 4096, {"a": 1.0, "b": 0.49, "c": 0.6, "d": 0.9, "e": 0.9}, 0.78)  # 0.49 misses: 4 tasks
    _cell(tmp_path, 8192, {"a": 1.0, "b": 0.4, "c": 0.4, "d": 0.9, "e": 0.0}, 0.54)  # 2 tasks: fails
    length, why = cal.choose_length(cal.load_cells("m", tmp_path))
    assert length == 4096
    assert "1024: 4, 2048: 4, 4096: 4, 8192: 2" in why


def test_rule_falls_back_to_the_best_average_when_no_length_qualifies(tmp_path: Path) -> None:
    cal = _script()
    _cell(tmp_path, 1024, {"a": 1.0, "b": 0.7, "c": 0.0, "d": 0.0}, 0.425)  # 2 tasks
    _cell(tmp_path, 2048, {"a": 1.0, "b": 0.9, "c": 0.6, "d": 0.1}, 0.65)  # 3 tasks, best average
    _cell(tmp_path, 4096, {"a": 0.9, "b": 0.1, "c": 0.0, "d": 0.0}, 0.25)
    length, why = cal.choose_length(cal.load_cells("m", tmp_path))
    assert length == 2048
    assert why.startswith("no length qualifies")


def test_table_has_one_row_per_ruler_task_and_the_average(tmp_path: Path) -> None:
    cal = _script()
    _cell(tmp_path, 2048, {"niah_single_1": 0.8, "vt": 0.25}, 0.525)
    _cell(tmp_path, 1024, {"niah_single_1": 1.0, "vt": 0.5}, 0.75)
    table = cal.render_table("m", tmp_path)
    lines = table.splitlines()
    assert lines[0] == "| task | 1024 tokens | 2048 tokens |"  # lengths sorted, whatever the file order
    assert "| `niah_single_1` | 1.00 [0.00, 1.00] | 0.80 [0.00, 1.00] |" in lines
    assert "| `vt` | 0.50 [0.00, 1.00] | 0.25 [0.00, 1.00] |" in lines
    assert "| `cwe` | - | - |" in lines  # a task without a score is shown as missing, not as 0
    assert "| **average** | **0.75 [0.10, 0.90]** | **0.53 [0.10, 0.90]** |" in lines
    assert "| tasks >= 0.5 | 2 | 1 |" in lines
    assert "| compute (prefill + decode) | 2.0 min | 2.0 min |" in lines
    assert sum(line.startswith("| `") for line in lines) == 11

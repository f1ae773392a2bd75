"""The benchmark scripts' tables are computed from their results, and land only between the markers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _weight_only():
    spec = importlib.util.spec_from_file_location("weight_only", ROOT / "benchmarks" / "weight_only.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RESULTS = {
    "model": "m",
    "fp_perplexity": 10.0,
    "eval_windows": 4,
    "settings": {"calib_samples": 8, "calib_seq_len": 64, "seed": 0, "eval_seq_len": 128},
    "rows": [
        {"setting": "W4", "method": "rtn", "perplexity": 20.0, "seconds": 1.0, "peak_rss_bytes": 2**30},
        {"setting": "W4", "method": "gptq", "perplexity": 14.0, "seconds": 2.0, "peak_rss_bytes": 2**30},
        {"setting": "W4", "method": "boa", "perplexity": 12.0, "seconds": 5.0, "peak_rss_bytes": 2**30},
    ],
    "command": "python benchmarks/weight_only.py",
    "date": "2026-01-01",
    "machine": {"cpus": 2},
}


def test_table_rows_and_ratios_come_from_the_results():
    table = _weight_only().markdown(RESULTS)
    assert "| W4 | boa | 12.00 | +2.00 |" in table
    assert "BoA's gap to FP is 0.50 × GPTQ's" in table
    assert "2.50 × GPTQ's" in table


def test_readme_is_updated_only_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        "before\n<!-- weight-only results: start -->\nold\n<!-- weight-only results: end -->\nafter\n"
    )
    _weight_only().update_readme("new table\n", readme)
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("after\n")
    assert "new table" in text and "old" not in text

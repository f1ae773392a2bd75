"""The benchmark scripts' tables are computed from their results, and land only between the markers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    """A benchmark script as a module (they import their neighbour ``common`` as scripts do)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def _weight_only():
    return _script("weight_only")


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
    _script("common").update_readme("new table\n", "weight-only results", readme)
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("after\n")
    assert "new table" in text and "old" not in text


W4A4_RESULTS = {
    "model": "m",
    "fp_perplexity": 10.0,
    "eval_windows": 4,
    "settings": {"calib_samples": 8, "calib_seq_len": 64, "seed": 0, "eval_seq_len": 128},
    "rotation": {"applied": {"r1": "randomized Hadamard 36 x 16"}, "skipped": {}},
    "rows": [
        {"label": "no rotation + RTN", "perplexity": 9000.0, "seconds": 1.0, "peak_rss_bytes": 2**30},
        {"label": "rotation + RTN", "perplexity": 110.0, "seconds": 1.0, "peak_rss_bytes": 2**30},
        {"label": "rotation + BoA", "perplexity": 35.0, "seconds": 9.0, "peak_rss_bytes": 2**30},
    ],
    "activation_variants": [
        {"weights": "rotation + BoA", "activations": "A16", "perplexity": 12.5},
    ],
    "command": "python benchmarks/w4a4.py",
    "date": "2026-01-01",
    "machine": {"cpus": 2},
}


def test_w4a4_table_and_gap_ratio_come_from_the_results():
    table = _script("w4a4").markdown(W4A4_RESULTS)
    assert "| rotation + BoA | 35.00 | +25.00 | 9 | 1.00 |" in table
    assert "gap to FP is 0.25 × rotation + RTN's" in table
    assert "| rotation + BoA | A16 | 12.50 | +2.50 |" in table
    assert "R1 randomized Hadamard 36 x 16" in table

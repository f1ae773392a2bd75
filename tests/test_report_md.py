"""report.md: every figure comes from the report dict, sections appear only with their data, and the
written folder's image links resolve to real PNG files."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from edgeq.report_md import plot_latency, render_markdown, write_report_md

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)]+)\)")


CPU = "CPUExecutionProvider"
TIMINGS = {
    "data_s": 1.5,
    "load_s": 2.25,
    "eval_fp_torch_s": 3.0,
    "eval_rotated_torch_s": 4.0,
    "quantize_s": 50.125,
    "export_onnx_s": 6.0,
    "eval_quant_s": 7.0,
}
PARITY = {
    "what": "ORT vs PyTorch",
    "relative_difference": 0.0008,
    "tolerance": 0.005,
    "top1_agreement": 0.999,
    "min_top1_agreement": 0.99,
    "passed": True,
}
SETUP_TEXTS = (
    "4-bit, group size 128, asymmetric",
    "clip ratio 0.9",
    "each input shifted by its calibration mean",
    "the weights fitted to compensate its rounding",
    "down_proj input 8-bit",
    "percdamp=0.01",
    "/data/c4.parquet",
    "77 documents",
    "8 × 256 tokens, seed 42",
    "6 windows × 256 tokens",
    "opset 21",
    "9.8.7",
    "2030-01-02T03:04:05+00:00",
    "1,234,567",
)


def layer_error(block: int, role_index: int) -> float:
    """Grows with depth and role index, so the worst five are block 1's last five roles."""
    return 0.05 + 0.01 * block + 0.001 * role_index


def layer(block: int, role_index: int) -> dict:
    role = ROLES[role_index]
    name = f"model.layers.{block}.{role}_proj"
    return {"name": name, "block": block, "role": role, "weight_rel_error": layer_error(block, role_index)}


def gate(name: str, value: float, op: str, limit: float, passed: bool) -> dict:
    return {"name": name, "value": value, "op": op, "limit": limit, "passed": passed, "provider": CPU}


def make_report(validation: bool = True) -> dict:
    report = {
        "edgeq_version": "9.8.7",
        "created": "2030-01-02T03:04:05+00:00",
        "model": {"spec": "acme/tiny-lm", "model_type": "llama", "adapter": "llama", "parameters": 1_234_567},
        "config": {
            "model": "acme/tiny-lm",
            "quant": {
                "scheme": "w4a4",
                "method": "gptq",
                "weights": {"bits": 4, "group_size": 128, "symmetric": False},
                "activations": {
                    "bits": 4,
                    "symmetric": True,
                    "clip_ratio": 0.9,
                    "down_proj_bits": 8,
                    "kv_bits": 16,
                    "shift": True,
                    "compensate_rounding": True,
                },
                "rotation": {"enabled": True, "r1": True, "r2": True, "r4": True, "r3": True, "seed": 0},
                "gptq": {"percdamp": 0.01, "block_size": 128},
                "boa": {"row_block": 16},
            },
            "calibration": {"source": None, "num_sequences": 8, "seq_len": 256, "seed": 42},
            "evaluation": {"text": None, "seq_len": 256, "max_windows": 6},
            "onnx_opset": 21,
            "format": "qdq",
        },
        "calibration": {"file": "/data/c4.parquet", "documents": 77, "shape": [8, 256]},
        "evaluation": {"text": "WikiText-2 raw test", "windows": 6, "seq_len": 256},
        "timings_s": TIMINGS,
        "rotation": {
            "applied": {
                "r1": "randomized Hadamard 36 x 16",
                "r2": "random orthogonal 18",
                "r4": "Hadamard 12",
            },
            "skipped": {"r3": "used only when the KV cache is quantized"},
        },
        "perplexity": {
            "fp_torch": 12.3456,
            "rotated_torch": 12.3499,
            "quant_torch": 13.0,
            "quant_onnx": {CPU: {"accuracy_level_0": 13.011, "accuracy_level_4": 13.456}},
        },
        "top1_agreement_with_pytorch": {CPU: {"accuracy_level_0": 0.999, "accuracy_level_4": 0.93}},
        "onnx_parity": PARITY,
        "sizes_bytes": {
            "fp32_parameters": 538_000_000,
            "onnx_model": 150_000_000,
            "onnx_external_data": False,
            "onnx_components": {"embedding": 40_000_000, "blocks": 70_000_000, "lm_head": 40_000_000},
        },
        "onnx": {"file": "model.onnx", "format": "qdq", "opset": 21, "quantized_weights": 14},
        "quantization": {
            "layers": [layer(b, i) for b in range(2) for i in range(len(ROLES))],
            "block_output_rel_error": [0.0321, 0.0654],
        },
    }
    if validation:
        report["validation"] = {
            "providers": {
                CPU: {
                    "perplexity": 13.2,
                    "top1_agreement_fp": 0.875,
                    "kl_fp": 0.04321,
                    "prefill_ms": {"p50": 123.44, "p90": 150.06},
                    "decode_tokens_per_s": {"p50": 42.04, "p90": 45.66},
                    "peak_rss_bytes": 987_600_000,
                    "generation_ok": True,
                },
                "CUDAExecutionProvider": {"skipped": "not available in this onnxruntime build"},
            },
            "gates": [
                gate("perplexity_ratio", 1.0692, "<=", 1.1, passed=True),
                gate("decode_speedup", 0.8765, ">=", 1.5, passed=False),
            ],
            "files_bytes": 150_000_000,
            "passed": False,
        }
    return report


def section(markdown: str, title: str) -> str:
    """The text of one '## ' section (up to the next one)."""
    start = markdown.index(f"## {title}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start : end if end != -1 else None]


def test_title_and_setup_come_from_the_report():
    md = render_markdown(make_report(), {})
    assert md.splitlines()[0] == "# edgeq report: acme/tiny-lm (w4a4, gptq, qdq format)"
    setup = section(md, "Setup")
    for text in SETUP_TEXTS:
        assert text in setup, text
    assert "| KV cache | not quantized (float) |" in setup
    report = make_report()
    report["config"]["quant"]["activations"] |= {"kv_bits": 4, "kv_shift": True}
    setup = section(render_markdown(report, {}), "Setup")
    assert "| KV cache | 4-bit, asymmetric per token and head, shifted by the calibration mean |" in setup


def test_every_rotation_is_listed_with_how_or_why():
    setup = section(render_markdown(make_report(), {}), "Setup")
    assert "| Rotation R1 | applied: randomized Hadamard 36 x 16 |" in setup
    assert "| Rotation R2 | applied: random orthogonal 18 |" in setup
    assert "| Rotation R4 | applied: Hadamard 12 |" in setup
    assert "| Rotation R3 | skipped: used only when the KV cache is quantized |" in setup


def test_rotation_disabled_is_said():
    report = make_report()
    report["rotation"] = {"applied": {}, "skipped": {}}
    report["config"]["quant"]["rotation"]["enabled"] = False
    assert "| Rotations | none (rotation disabled) |" in render_markdown(report, {})


def test_perplexity_table_formats_numbers_from_the_dict():
    ppl = section(render_markdown(make_report(), {}), "Perplexity")
    assert "| FP (PyTorch) | 12.35 | 1.000 | — |" in ppl
    assert "| Rotated FP (PyTorch) | 12.35 | 1.000 | — |" in ppl
    assert f"| Quantized (PyTorch) | 13.00 | {13.0 / 12.3456:.3f} | — |" in ppl
    assert f"| Quantized (ONNX CPU, accuracy level 0) | 13.01 | {13.011 / 12.3456:.3f} | 0.999 |" in ppl
    assert f"| Quantized (ONNX CPU, accuracy level 4) | 13.46 | {13.456 / 12.3456:.3f} | 0.930 |" in ppl
    assert "ONNX parity: **PASS**" in ppl and "8.00e-04" in ppl


def test_rotated_row_is_omitted_without_rotated_perplexity():
    report = make_report()
    del report["perplexity"]["rotated_torch"]
    assert "Rotated FP" not in render_markdown(report, {})


def test_size_table_in_megabytes_with_ratios():
    size = section(render_markdown(make_report(), {}), "Size")
    assert "| FP32 parameters | 538,000,000 | 538.0 |" in size
    assert f"| **ONNX total** | 150,000,000 | 150.0 | {150 / 538:.3f} |" in size
    assert f"| ONNX: blocks | 70,000,000 | 70.0 | {70 / 538:.3f} | {70 / 150:.3f} |" in size


def test_external_data_counts_in_the_onnx_total():
    report = make_report()
    report["sizes_bytes"]["onnx_external_data"] = 350_000_000
    size = section(render_markdown(report, {}), "Size")
    assert "| ONNX external data | 350,000,000 | 350.0 |" in size
    assert "| **ONNX total** | 500,000,000 | 500.0 |" in size


def test_latency_gates_and_validation_accuracy():
    md = render_markdown(make_report(), {})
    latency = section(md, "Latency")
    assert "| CPU | 123.4 | 150.1 | 42.0 | 45.7 | 987.6 |" in latency
    gates = section(md, "Gates")
    assert "| perplexity_ratio | CPU | 1.069 | <= 1.1 | **PASS** |" in gates
    assert "| decode_speedup | CPU | 0.8765 | >= 1.5 | **FAIL** |" in gates
    validation = section(md, "Perplexity")
    assert f"| CPU | 13.20 | {13.2 / 12.3456:.3f} | 0.875 | 0.0432 | ok |" in validation
    assert "skipped: not available in this onnxruntime build" in validation


def test_verdict_fails_with_a_failed_gate_and_passes_when_all_pass():
    report = make_report()
    assert "**Verdict: FAIL**" in render_markdown(report, {})
    summary = render_markdown(report, {}).split("## Setup")[0]
    assert "1 of 2 gates passed" in summary and "failed gates: decode_speedup on CPU" in summary
    report["validation"]["gates"][1]["passed"] = True
    report["validation"]["passed"] = True
    assert "**Verdict: PASS**" in render_markdown(report, {})


def test_without_validation_latency_and_gates_are_omitted():
    md = render_markdown(make_report(validation=False), {})
    assert "## Latency" not in md
    assert "## Gates" not in md
    assert "Validation accuracy" not in md
    assert "**Verdict: PASS**" in md and "no validation gates were run" in md


def test_failed_parity_fails_the_verdict():
    report = make_report(validation=False)
    report["onnx_parity"]["passed"] = False
    md = render_markdown(report, {})
    assert "**Verdict: FAIL**" in md and "ONNX parity: **FAIL**" in md


def test_timings_and_total():
    timings = section(render_markdown(make_report(), {}), "Timings")
    assert "| Quantize | 50.12 |" in timings or "| Quantize | 50.13 |" in timings
    assert f"| **Total** | {sum(TIMINGS.values()):.2f} |" in timings


def test_worst_five_layers_in_order():
    layers = section(render_markdown(make_report(), {}), "Per-layer quantization error")
    ranked = re.findall(r"^\| (\d) \| `([^`]+)` \|", layers, flags=re.MULTILINE)
    expected = [f"model.layers.1.{role}_proj" for role in ("down", "up", "gate", "o", "v")]
    assert ranked == [(str(i), name) for i, name in enumerate(expected, start=1)]
    assert f"{layer_error(1, 6):.4f}" in layers
    assert "0.0654 at block 1" in layers


def test_pure_render_links_only_the_plots_given():
    report = make_report()
    assert not IMAGE_LINK.search(render_markdown(report, {}))
    md = render_markdown(report, {"perplexity": "plots/p.png"})
    assert IMAGE_LINK.findall(md) == ["plots/p.png"]


def test_table_cells_escape_pipes():
    report = make_report()
    report["rotation"]["applied"]["r1"] = "a | b"
    assert r"| Rotation R1 | applied: a \| b |" in render_markdown(report, {})


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize("validation", [True, False])
def test_write_report_md_writes_markdown_and_linked_pngs(tmp_path: Path, validation: bool):
    pytest.importorskip("matplotlib")
    written = write_report_md(make_report(validation), tmp_path)
    md_path = tmp_path / "report.md"
    assert md_path in written
    pngs = [p for p in written if p.suffix == ".png"]
    expected = {"perplexity.png", "layer_errors.png"} | ({"latency.png"} if validation else set())
    assert {p.name for p in pngs} == expected
    for png in pngs:
        assert png.parent == tmp_path / "plots"
        assert_png(png)
    links = IMAGE_LINK.findall(md_path.read_text(encoding="utf-8"))
    assert sorted(links) == sorted(f"plots/{name}" for name in expected)
    for link in links:
        assert_png(tmp_path / link)


def test_plot_latency_is_none_without_validation(tmp_path: Path):
    assert plot_latency(make_report(validation=False), tmp_path / "latency.png") is None
    assert not (tmp_path / "latency.png").exists()


def test_same_report_gives_the_same_pngs(tmp_path: Path):
    """The artifact's manifest hashes every file: re-rendering an unchanged report must not change them."""
    pytest.importorskip("matplotlib")
    first = {p.name: p.read_bytes() for p in write_report_md(make_report(), tmp_path / "a")}
    second = {p.name: p.read_bytes() for p in write_report_md(copy.deepcopy(make_report()), tmp_path / "b")}
    assert first == second


def test_broken_generation_is_named_in_the_verdict():
    report = make_report()
    report["validation"]["providers"][CPU]["generation_ok"] = False
    md = render_markdown(report, {})
    assert "generation gave NaN/Inf on CPU" in md.split("## Setup")[0]
    assert "| 0.0432 | NaN/Inf |" in section(md, "Perplexity")


def test_numpy_scalars_format_like_python_numbers():
    np = pytest.importorskip("numpy")
    report = make_report(validation=False)
    report["perplexity"]["fp_torch"] = np.float32(12.3456)
    report["sizes_bytes"]["fp32_parameters"] = np.int64(538_000_000)
    md = render_markdown(report, {})
    assert "| FP (PyTorch) | 12.35 | 1.000 | — |" in md
    assert "| FP32 parameters | 538,000,000 | 538.0 |" in md


def test_searched_clip_ratios_are_summarized_per_role():
    from edgeq.report_md import _clip_lines

    report = {"quantization": {"clip_ratios": {"model.layers.0.mlp.down_proj": 0.7,
                                               "model.layers.1.mlp.down_proj": 0.85,
                                               "model.layers.0.self_attn.q_proj": 0.9}}}  # fmt: skip
    line = _clip_lines(report)[-1]
    assert "down_proj 0.7–0.85" in line and "q_proj 0.9–0.9" in line
    assert _clip_lines({"quantization": {}}) == []

"""APTQ's mixed precision (``edgeq.quant.aptq``): the allocation under its budget, and the exported
model carrying every width in both formats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import byte_tokenizer, tiny_model
from test_cli_errors import assert_clean_failure

from edgeq.cli import main
from edgeq.config import WeightQuantConfig
from edgeq.errors import EdgeqError
from edgeq.quant.aptq import allocate_widths, average_bits, predicted_losses

CHOICES = (2, 3, 4, 8)


def _problem(seed: int, layers: int = 12) -> tuple[dict, dict]:
    """Random predicted losses (sensitivity × a convex, decreasing error per width) and sizes."""
    rng = np.random.default_rng(seed)
    sizes = {f"l{i}": int(rng.choice([576 * 576, 192 * 576, 1536 * 576])) for i in range(layers)}
    losses = {
        name: {b: float(rng.lognormal(0, 1.5) * rng.uniform(0.5, 2) * 4.0**-b) for b in CHOICES}
        for name in sizes
    }
    return losses, sizes


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("avg_bits", [2.0, 2.5, 3.0, 3.5, 4.0, 6.0])
def test_the_allocation_respects_the_budget(seed, avg_bits):
    losses, sizes = _problem(seed)
    widths = allocate_widths(losses, sizes, avg_bits)
    assert set(widths) == set(sizes) and set(widths.values()) <= set(CHOICES)
    assert average_bits(widths, sizes) <= avg_bits + 1e-9
    # what is left over buys no upgrade: every single step up would overrun the budget
    left = avg_bits * sum(sizes.values()) - sum(sizes[n] * b for n, b in widths.items())
    for name, bits in widths.items():
        for higher in (b for b in CHOICES if b > bits and losses[name][b] < losses[name][bits]):
            assert sizes[name] * (higher - bits) > left + 1e-6


def test_a_budget_below_the_narrowest_width_is_refused():
    losses, sizes = _problem(0)
    with pytest.raises(EdgeqError, match="below the smallest width"):
        allocate_widths(losses, sizes, 1.5)


def test_moving_a_bit_to_a_more_sensitive_layer_never_raises_the_predicted_loss():
    """Two linears with the same weights, the second's Hessian c > 1 times the first's: moving one
    width step from the less sensitive one (b_A → b_A − 1) to the more sensitive one (b_B → b_B + 1),
    b_B < b_A, never raises P_A + P_B. (It holds because the error falls convexly with the width.)"""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g)
    x = torch.randn(512, 96, generator=g)
    h = 2 * x.T @ x / 512
    config = WeightQuantConfig(bits=4, group_size=32)
    for c in (1.5, 3.0, 10.0):
        p_a = predicted_losses(w, h, config, (2, 3, 4))
        p_b = predicted_losses(w, c * h, config, (2, 3, 4))
        for b_a, b_b in ((3, 2), (4, 2), (4, 3)):
            before = p_a[b_a] + p_b[b_b]
            after = p_a[b_a - 1] + p_b[b_b + 1]
            assert after <= before
    assert p_a[2] > p_a[3] > p_a[4]


def test_widths_follow_sensitivity_on_equal_layers():
    """The same weight under growing Hessians: the allocation never gives a more sensitive layer
    fewer bits."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 96, generator=g)
    h = torch.eye(96)
    config = WeightQuantConfig(bits=4, group_size=-1)
    scales = [0.1, 0.5, 1.0, 3.0, 10.0, 40.0]
    losses = {f"l{i}": predicted_losses(w, s * h, config, CHOICES) for i, s in enumerate(scales)}
    sizes = dict.fromkeys(losses, w.numel())
    for budget in (2.5, 3.0, 3.5, 4.5):
        widths = [allocate_widths(losses, sizes, budget)[f"l{i}"] for i in range(len(scales))]
        assert widths == sorted(widths), (budget, widths)


SMALL = ["--calib-samples", "4", "--calib-seq-len", "32", "--eval-seq-len", "32", "--eval-windows", "3",
         "--latency-runs", "1", "--decode-tokens", "4", "--max-size-ratio", "1.0",
         "--group-size", "16"]  # fmt: skip


@pytest.fixture(scope="module")
def mixed_artifacts(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama exported at an average of 3 bits in both formats (GPTQ; the widths from OAC's
    Hessians)."""
    root = tmp_path_factory.mktemp("aptq")
    from conftest import write_text_data

    data = write_text_data(root / "data")
    folder = root / "tiny-llama"
    tiny_model("llama", head_dim=16).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGEQ_DATA_DIR", str(data))
    artifacts = {}
    try:
        for fmt in ("qdq", "ort"):
            out = root / fmt
            args = ["--method", "gptq", "--avg-bits", "3", "--format", fmt, "--out", str(out)]
            assert main(["--no-progress", "export", "--model", str(folder), *SMALL, *args]) == 0
            artifacts[fmt] = out
    finally:
        mp.undo()
    return artifacts


@pytest.mark.parametrize("fmt", ["qdq", "ort"])
def test_the_mixed_precision_export_passes_parity_and_records_every_width(mixed_artifacts, fmt):
    out = mixed_artifacts[fmt]
    report = json.loads((out / "report.json").read_text())
    config = json.loads((out / "edgeq_config.json").read_text())
    widths = config["quant"]["mixed"]["widths"]
    assert config["quant"]["mixed"]["avg_bits"] == 3
    assert len(widths) == 2 * 7 and len(set(widths.values())) > 1  # mixed, not uniform
    layers = report["quantization"]["layers"]
    assert {layer["name"]: layer["bits"] for layer in layers} == widths
    assert report["quantization"]["mixed_precision"]["average_bits"] <= 3
    assert report["onnx_parity"]["passed"]
    assert report["validation"]["passed"]
    text = (out / "report.md").read_text()
    assert "## Mixed precision" in text and (out / "plots" / "layer_bits.png").stat().st_size > 0

    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    inits = {init.name: init.data_type for init in graph.graph.initializer}
    if fmt == "qdq":  # 2-bit codes in UINT2 at opset 25, 8-bit in UINT8
        dq_types = {
            inits[n.input[0]]
            for n in graph.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits
        }
        expected = {{2: onnx.TensorProto.UINT2, 3: onnx.TensorProto.UINT4, 4: onnx.TensorProto.UINT4,
                     8: onnx.TensorProto.UINT8}[b] for b in widths.values()}  # fmt: skip
        assert expected <= dq_types
        assert graph.opset_import[0].version >= (25 if 2 in widths.values() else 21)
    else:  # MatMulNBits at 2, 4 (3-bit codes) and 8 bits
        bits = {
            a.i
            for n in graph.graph.node
            if n.op_type == "MatMulNBits"
            for a in n.attribute
            if a.name == "bits"
        }
        assert {min(b, 4) if b < 8 else 8 for b in widths.values()} - {3} <= bits | {4}
        assert (2 in widths.values()) == (2 in bits)


@pytest.fixture
def out(tmp_path: Path) -> Path:
    parent = tmp_path / "outputs"
    parent.mkdir()
    return parent / "art"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--avg-bits", "1.5"], "outside the bit choices"),
        (["--avg-bits", "3", "--bit-choices", "2,5"], "5 is not"),
    ],
)
def test_bad_budgets_fail_cleanly(capsys, out, tiny_model_dir, text_data_dir, args, message):
    msg = assert_clean_failure(capsys, ["--model", str(tiny_model_dir), *args], out)
    assert message in msg

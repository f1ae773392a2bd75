"""OpenVINO's CPU runtime as a second consumer of the qdq graph: which constructs its ONNX frontend
rejects (one-node repro graphs), the rewrites into the form it reads (``--qdq-form openvino``, the
same numbers in ONNX Runtime), and tiny models whose OpenVINO logits match ONNX Runtime's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import byte_tokenizer, tiny_model
from onnx import TensorProto, helper, numpy_helper
from test_cli_errors import assert_clean_failure
from test_export_onnx import _quantized, _w4a4

import exporters.onnx_qdq as onnx_qdq
from edgeq.activations import float_activations
from edgeq.cli import main
from edgeq.config import WeightQuantConfig
from edgeq.errors import EdgeqError
from edgeq.evaluation import OrtCausalLM
from edgeq.openvino_runtime import OPENVINO_CPU, PRECISIONS, OpenVinoCausalLM, read_failures
from edgeq.packing import pack_bits
from edgeq.validate import fp_reference, junit_xml, provider_status, validate_provider
from exporters.openvino_form import per_token_qdq_per_axis, split_ragged_blocks

ov = pytest.importorskip("openvino")

EXACT = PRECISIONS["f32_exact"]
RNG = np.random.default_rng(0)


# --- one-node repro graphs ---------------------------------------------------------------------


def _weight_graph(k: int, n: int, block: int, signed: bool, bits: int = 4, reader: str = "MatMul"):
    """x [b, s, k] @ DequantizeLinear(codes [k, n], blocked along k by ``block``), or a Gather of
    rows from the dequantized table (``reader`` "Gather"; the table blocked along its axis 1)."""
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    dtype = {(4, True): TensorProto.INT4, (4, False): TensorProto.UINT4, (8, True): TensorProto.INT8,
             (8, False): TensorProto.UINT8}[bits, signed]  # fmt: skip
    axis = 0 if reader == "MatMul" else 1
    shape = (k, n) if reader == "MatMul" else (n, k)
    blocks = [-(-k // block), n] if axis == 0 else [n, -(-k // block)]

    def integer(name, values):
        if bits == 8:
            return numpy_helper.from_array(values.astype(np.int8 if signed else np.uint8), name)
        return helper.make_tensor(name, dtype, list(values.shape), pack_bits(values, 4), raw=True)

    scale = RNG.uniform(0.01, 0.02, blocks).astype(np.float32)
    inits = [integer("codes", RNG.integers(low, high + 1, shape)), numpy_helper.from_array(scale, "scale")]
    if not signed:
        inits.append(integer("zero_point", RNG.integers(low, high + 1, blocks)))
    nodes = [
        helper.make_node("DequantizeLinear", [i.name for i in inits], ["w"], axis=axis, block_size=block)
    ]
    if reader == "MatMul":
        nodes.append(helper.make_node("MatMul", ["x", "w"], ["y"]))
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])
    else:
        nodes.append(helper.make_node("Gather", ["w", "x"], ["y"], axis=0))
        x = helper.make_tensor_value_info("x", TensorProto.INT64, ["b", "s"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", "n"])
    graph = helper.make_graph(nodes, "weight", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _activation_graph(width: int, symmetric: bool, rank: int = 3):
    """Per-token dynamic int4 QuantizeLinear → DequantizeLinear of x [..., width] as edgeq writes it:
    the scale (and zero point) computed from each row at run time, one block over the last axis."""
    c, node = numpy_helper.from_array, helper.make_node
    inits = [c(np.array([-1], np.int64), "axes"), c(np.float32(0), "zero"), c(np.float32(1), "one")]
    if symmetric:
        inits.append(c(np.float32(1 / 7), "per_level"))
        nodes = [node("Abs", ["x"], ["abs"]), node("ReduceMax", ["abs", "axes"], ["amax"], keepdims=1),
                 node("Mul", ["amax", "per_level"], ["scale"])]  # fmt: skip
        zero_point, dtype = [], TensorProto.INT4
    else:
        inits.append(c(np.float32(15), "levels"))
        nodes = [node("ReduceMax", ["x", "axes"], ["hi0"], keepdims=1),
                 node("ReduceMin", ["x", "axes"], ["lo0"], keepdims=1),
                 node("Max", ["hi0", "zero"], ["hi"]), node("Min", ["lo0", "zero"], ["lo"]),
                 node("Sub", ["hi", "lo"], ["range"]),
                 node("Div", ["range", "levels"], ["scale"])]  # fmt: skip
        zero_point, dtype = ["zp"], TensorProto.UINT4
    nodes += [
        node("Greater", ["scale", "zero"], ["positive"]),
        node("Where", ["positive", "scale", "one"], ["safe"]),
    ]
    if not symmetric:
        nodes += [node("Neg", ["lo"], ["neg_lo"]), node("Div", ["neg_lo", "safe"], ["zf"]),
                  node("Round", ["zf"], ["zr"]), node("Cast", ["zr"], ["zp"], to=dtype)]  # fmt: skip
    attrs = {"axis": -1, "block_size": width}
    nodes += [node("QuantizeLinear", ["x", "safe", *zero_point], ["q"], output_dtype=dtype, **attrs),
              node("DequantizeLinear", ["q", "safe", *zero_point], ["y"], **attrs)]  # fmt: skip
    dims = ["b", "s", "h"][: rank - 1] + [width]
    x, y = (helper.make_tensor_value_info(name, TensorProto.FLOAT, dims) for name in "xy")
    graph = helper.make_graph(nodes, "activation", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _ort(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # float32 compute
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _openvino(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    core = ov.Core()
    compiled = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU", EXACT)
    return compiled(feeds)[0]


def _rejection(model: onnx.ModelProto) -> str:
    with pytest.raises(RuntimeError) as err:
        ov.Core().read_model(model.SerializeToString(), b"")
    return "; ".join(read_failures(str(err.value)))


def _x(k: int, reader: str = "MatMul") -> np.ndarray:
    if reader == "Gather":
        return RNG.integers(0, 6, (2, 3)).astype(np.int64)
    return RNG.standard_normal((2, 3, k)).astype(np.float32)


@pytest.mark.parametrize("signed", [True, False], ids=["int4", "uint4+zero-point"])
@pytest.mark.parametrize("block", [16, -1], ids=["blocked", "per-channel"])
def test_openvino_reads_whole_int4_blocks_and_computes_what_ort_does(signed, block):
    model = _weight_graph(64, 24, block if block > 0 else 64, signed)
    if block < 0:  # per output channel: a 1-D scale along axis 1, no block_size
        dq = model.graph.node[0]
        del dq.attribute[:]
        dq.attribute.append(helper.make_attribute("axis", 1))
        for init in model.graph.initializer[1:]:
            init.dims[:] = [24]
    feeds = {"x": _x(64)}
    np.testing.assert_allclose(_openvino(model, feeds), _ort(model, feeds), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_openvino_rejects_a_shorter_last_block(bits):
    """ONNX lets the last block along the axis be shorter (72 = 4.5 blocks of 16, SmolLM2's 576 =
    4.5 × 128); OpenVINO's frontend does not, for int4 codes or the int8 lm_head."""
    why = _rejection(_weight_graph(72, 24, 16, signed=False, bits=bits))
    assert "DequantizeLinear" in why and "axis 0 (72) cannot be divided by block_size (16)" in why


@pytest.mark.parametrize("symmetric", [True, False])
def test_openvino_rejects_per_token_activation_qdq(symmetric):
    """A blocked Q/DQ pair whose input has dynamic dimensions (the per-token pair of W4A4)."""
    why = _rejection(_activation_graph(64, symmetric))
    assert "DequantizeLinear cannot operate with dynamic shapes of input X" in why


def test_per_axis_along_a_dynamic_first_axis_is_broadcast_wrongly_by_openvino():
    """The obvious per-axis form, rows [b·s, d] with the scale a vector along axis 0: read, but the
    frontend leaves a 1-D scale on a dynamic axis unreshaped, so it broadcasts along the last axis
    (why ``per_token_qdq_per_axis`` quantizes the transposed view along its last axis instead)."""
    c, node = numpy_helper.from_array, helper.make_node
    inits = [c(np.array([-1, 64], np.int64), "rows_shape"), c(np.array([-1], np.int64), "axes"),
             c(np.float32(1 / 7), "per_level")]  # fmt: skip
    nodes = [node("Reshape", ["x", "rows_shape"], ["rows"]), node("Abs", ["rows"], ["abs"]),
             node("ReduceMax", ["abs", "axes"], ["amax"], keepdims=0),
             node("Mul", ["amax", "per_level"], ["scale"]),
             node("QuantizeLinear", ["rows", "scale"], ["q"], axis=0, output_dtype=TensorProto.INT4),
             node("DequantizeLinear", ["q", "scale"], ["y"], axis=0)]  # fmt: skip
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["r", 64])
    graph = helper.make_graph(nodes, "rows", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    feeds = {"x": _x(64)}
    assert _ort(model, feeds).shape == (6, 64)
    with pytest.raises(RuntimeError, match="FakeQuantize"):
        _openvino(model, feeds)


# --- the rewrites: same numbers in ONNX Runtime, read by OpenVINO ---------------------------------


@pytest.mark.parametrize("bits,signed", [(4, True), (4, False), (8, False)], ids=["int4", "uint4", "uint8"])
@pytest.mark.parametrize("reader", ["MatMul", "Gather"])
def test_split_ragged_blocks_computes_the_same_and_openvino_reads_it(bits, signed, reader):
    model = _weight_graph(72, 24, 16, signed, bits, reader)
    feeds = {"x": _x(72, reader)}
    before = _ort(model, feeds)
    assert split_ragged_blocks(model) == 1
    onnx.checker.check_model(model, full_check=True)
    dequantize = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert [{a.name: a.i for a in n.attribute}["block_size"] for n in dequantize] == [16, 8]
    readers = [n.op_type for n in model.graph.node]
    assert readers.count("MatMul") == (2 if reader == "MatMul" else 0)  # each part keeps its DQ → MatMul
    assert readers.count("Concat") == (1 if reader == "Gather" else 0)
    assert {i.name for i in model.graph.initializer}.isdisjoint({"codes", "scale", "zero_point"})
    np.testing.assert_allclose(_ort(model, feeds), before, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_openvino(model, feeds), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("rank", [3, 4], ids=["activations", "kv-cache"])
def test_per_token_pairs_per_axis_compute_the_same_and_openvino_reads_them(symmetric, rank):
    model = _activation_graph(32, symmetric, rank)
    x = RNG.standard_normal((2, 5, 3, 32)[4 - rank :]).astype(np.float32) * 3
    x[0, 0] = 0  # a row of zeros stays zeros
    before = _ort(model, {"x": x})
    assert per_token_qdq_per_axis(model) == 1
    onnx.checker.check_model(model, full_check=True)
    assert not any(n.op_type == "Cast" and n.output[0] == "zp" for n in model.graph.node)  # bypassed, dropped
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert {a.name: a.i for a in node.attribute}["axis"] == 1 and "block_size" not in str(node)
    np.testing.assert_array_equal(_ort(model, {"x": x}), before)
    # OpenVINO's FakeQuantize computes (q − zero point) · scale in another order: last bits only, no
    # code moved to another level (that would be a whole grid step, ≥ 0.1 here)
    np.testing.assert_allclose(_openvino(model, {"x": x}), before, rtol=1e-6, atol=1e-6)


def test_a_single_block_shorter_than_block_size_becomes_a_block_of_its_length():
    model = _weight_graph(12, 24, 16, signed=False)
    feeds = {"x": _x(12)}
    before = _ort(model, feeds)
    assert split_ragged_blocks(model) == 1
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", "MatMul"]
    assert {a.name: a.i for a in model.graph.node[0].attribute}["block_size"] == 12
    np.testing.assert_allclose(_openvino(model, feeds), before, rtol=1e-5, atol=1e-5)


def test_a_static_scale_and_even_blocks_are_left_as_they_are():
    model = _weight_graph(64, 24, 16, signed=True)
    assert split_ragged_blocks(model) == 0 and per_token_qdq_per_axis(model) == 0


# --- tiny models ---------------------------------------------------------------------------------


def _both_forms(tmp_path: Path, model, result) -> tuple[Path, Path]:
    standard, openvino = tmp_path / "standard", tmp_path / "openvino"
    onnx_qdq.export_qdq(model, result.weights, standard)
    info = onnx_qdq.export_qdq(model, result.weights, openvino, form="openvino")
    assert sum(info.form_rewrites.values()) > 0
    return standard, openvino


def _ids(model, length: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(
        0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed)
    )


def test_w4a16_qdq_openvino_form_matches_ort_logits_and_decode(tmp_path):
    """Group 16 over hidden 72: every q/k/v/gate/up weight ends in a shorter block, which the
    standard graph keeps and OpenVINO rejects; the openvino form runs, prefill and KV-cache decode."""
    model, result = _quantized("llama", WeightQuantConfig(4, 16))
    standard, openvino = _both_forms(tmp_path, model, result)
    with pytest.raises(EdgeqError, match=r"cannot read model.onnx: DequantizeLinear-21 .* block_size \(16\)"):
        OpenVinoCausalLM(standard)
    ids = _ids(model)
    expected = OrtCausalLM(standard, accuracy_level=0).logits(ids)
    lm = OpenVinoCausalLM(openvino, "f32_exact")
    assert lm.active_providers == [OPENVINO_CPU]
    torch.testing.assert_close(lm.logits(ids), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        OrtCausalLM(openvino, accuracy_level=0).logits(ids), expected, rtol=1e-5, atol=1e-5
    )
    prompt = ids[:, :8].numpy()
    np.testing.assert_array_equal(
        lm.generate_greedy(prompt, 8), OrtCausalLM(standard).generate_greedy(prompt, 8)
    )
    logits, past = lm.step(prompt, lm.empty_past(1), 0)  # the cache, one token at a time
    for t in range(8, 12):
        logits, past = lm.step(ids[:, t : t + 1].numpy(), past, t)
    np.testing.assert_allclose(logits[0, -1], expected[0, 11].numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type,kv_bits,symmetric", [("llama", 16, True), ("gemma3_text", 4, False)])
def test_w4a4_qdq_openvino_runs_the_activation_quantizers(model_type, kv_bits, symmetric, tmp_path):
    """OpenVINO runs the per-token int4 Q/DQ pairs (as FakeQuantize): its logits are ORT's, and far
    from the same model's with float activations."""
    model, result = _w4a4(model_type, kv_bits=kv_bits, symmetric=symmetric)
    standard, openvino = _both_forms(tmp_path, model, result)
    with pytest.raises(EdgeqError, match="DequantizeLinear cannot operate with dynamic shapes of input X"):
        OpenVinoCausalLM(standard)
    ids = _ids(model, 16)
    expected = OrtCausalLM(standard, accuracy_level=0).logits(ids)
    got = OpenVinoCausalLM(openvino, "f32_exact").logits(ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad(), float_activations(model):
        float_acts = model(ids, use_cache=False).logits
    assert float((got - float_acts).abs().max()) > 100 * float((got - expected).abs().max())


def test_validation_fails_a_graph_openvino_cannot_read_and_skips_a_missing_openvino(tmp_path, monkeypatch):
    model, result = _quantized("llama", WeightQuantConfig(4, 16))
    onnx_qdq.export_qdq(model, result.weights, tmp_path)
    windows = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = fp_reference(windows, OrtCausalLM(tmp_path).logits, k=8, progress=False)
    metrics = validate_provider(tmp_path, OPENVINO_CPU, ref, threads=1, progress=False)
    assert "cannot be divided by block_size (16)" in metrics["error"]
    from edgeq.validate import ValidationResult

    result_xml = junit_xml(ValidationResult(providers={OPENVINO_CPU: metrics}))
    assert 'failures="1"' in result_xml and "CannotRun" in result_xml
    assert not ValidationResult(providers={OPENVINO_CPU: metrics}).passed
    assert provider_status(["openvino"]) == {OPENVINO_CPU: None}
    monkeypatch.setattr("edgeq.validate.openvino_missing", lambda: "the openvino package is not installed")
    assert provider_status(["cpu", "openvino"])[OPENVINO_CPU] == "the openvino package is not installed"


def test_export_scores_the_openvino_form_in_openvino_beside_ort(tmp_path, text_data_dir):
    """The streamed export with both rewrites (W4A4 on group-16 weights: 72 inputs end in a shorter
    block), scored in OpenVINO beside ORT and validated there."""
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    out = tmp_path / "art"
    status = main([
        "--no-progress", "export", "--model", str(folder), "--scheme", "w4a4", "--method", "rtn",
        "--group-size", "16", "--qdq-form", "openvino", "--providers", "cpu,openvino",
        "--calib-samples", "4", "--calib-seq-len", "32", "--eval-seq-len", "32", "--eval-windows", "3",
        "--latency-runs", "1", "--decode-tokens", "4", "--max-size-ratio", "1.0", "--max-ppl-ratio", "3",
        "--min-top1", "0", "--out", str(out),
    ])  # fmt: skip
    assert status == 0
    report = json.loads((out / "report.json").read_text())
    ppl = report["perplexity"]
    ort_ppl = ppl["quant_onnx"]["CPUExecutionProvider"]["accuracy_level_0"]
    assert set(ppl["quant_onnx"][OPENVINO_CPU]) == set(PRECISIONS)
    assert abs(ppl["quant_onnx"][OPENVINO_CPU]["f32_exact"] - ort_ppl) / ort_ppl < 1e-4
    assert report["top1_agreement_with_pytorch"][OPENVINO_CPU]["f32_exact"] > 0.99
    assert report["onnx"]["qdq_form"] == "openvino"
    assert report["onnx"]["form_rewrites"] == {"ragged_weights_split": 13, "activation_pairs_per_axis": 8}
    # the int8 lm_head (72 inputs, group 16) is split in two and still counted as the lm_head
    assert report["sizes_bytes"]["onnx_components"]["lm_head"] > 0
    validated = report["validation"]["providers"][OPENVINO_CPU]
    assert validated["generation_ok"] and validated["decode_tokens_per_s"]["p50"] > 0
    assert json.loads((out / "edgeq_config.json").read_text())["qdq_form"] == "openvino"
    markdown = (out / "report.md").read_text()
    assert "Quantized (ONNX OpenVINO CPU, f32 exact)" in markdown and "`--qdq-form openvino`" in markdown
    card = (out / "MODEL_CARD.md").read_text()
    assert (
        "| quantized | OpenVINO CPU, f32 exact |" in card
        and "runs the activation Q/DQ as FakeQuantize" in card
    )


@pytest.mark.parametrize("args,message", [
    (["--qdq-form", "tflite"], "unknown qdq form 'tflite'"),
    (["--qdq-form", "openvino", "--format", "ort"], "--qdq-form openvino rewrites the qdq format's graph"),
    (["--providers", "cpu,openvino-ep"], "unknown provider 'openvino-ep'"),
])  # fmt: skip
def test_bad_openvino_options_are_one_line_errors(args, message, capsys, tmp_path, tiny_model_dir):
    (tmp_path / "runs").mkdir()
    error = assert_clean_failure(capsys, ["--model", str(tiny_model_dir), *args], tmp_path / "runs" / "out")
    assert message in error

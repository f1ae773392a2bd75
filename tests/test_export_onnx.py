"""ONNX export of tiny quantized models: the int4 QDQ graph computes what the PyTorch model does."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_model

import exporters.onnx_qdq as onnx_qdq
from edgeq.config import QuantConfig, WeightQuantConfig
from edgeq.evaluation import OrtCausalLM
from edgeq.models.adapters import adapter_for
from edgeq.pipeline import quantize_model


def _quantized(model_type: str, weights: WeightQuantConfig):
    model = tiny_model(model_type)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    result = quantize_model(
        model, adapter_for(model), QuantConfig(method="rtn", weights=weights), ids, progress=False
    )
    return model, result


@pytest.mark.parametrize(
    "weights",
    [WeightQuantConfig(4, 16), WeightQuantConfig(4, 32, symmetric=True), WeightQuantConfig(4, -1)],
    ids=["asym-g16-ragged", "sym-g32-ragged", "asym-per-channel"],
)
def test_onnx_logits_match_pytorch(model_type, weights, tmp_path):
    model, result = _quantized(model_type, weights)
    info = onnx_qdq.export_qdq(model, result.weights, tmp_path)
    assert info.replaced_weights == len(result.weights)
    graph = onnx.load(str(info.path)).graph
    assert sum(n.op_type == "DequantizeLinear" for n in graph.node) == len(result.weights)
    ids = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    got = OrtCausalLM(tmp_path, accuracy_level=0).logits(ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_large_models_go_to_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_qdq, "EXTERNAL_DATA_THRESHOLD", 0)
    model, result = _quantized("llama", WeightQuantConfig(4, 16))
    info = onnx_qdq.export_qdq(model, result.weights, tmp_path)
    assert info.external_data
    assert (tmp_path / onnx_qdq.EXTERNAL_DATA_FILE).stat().st_size > (tmp_path / "model.onnx").stat().st_size
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    torch.testing.assert_close(OrtCausalLM(tmp_path).logits(ids), expected, rtol=1e-4, atol=1e-4)


def test_a_weight_missing_from_the_graph_is_an_error(tmp_path):
    model, result = _quantized("llama", WeightQuantConfig(4, 16))
    name = next(iter(result.weights))
    result.weights[name].scale.mul_(2)  # no initializer holds these values any more
    with pytest.raises(onnx_qdq.EdgeqError, match="not found in the exported graph"):
        onnx_qdq.export_qdq(model, result.weights, tmp_path)


def _w4a4(model_type: str, kv_bits: int = 16, symmetric: bool = True, shift: bool = False):
    """A tiny model quantized with the w4a4 preset (rotations, per-token A4; ``symmetric`` or
    asymmetric activations, with ``shift``s or not; KV cache at ``kv_bits``)."""
    import dataclasses

    from edgeq.config import scheme_preset
    from edgeq.rotation.rotate import rotate_model

    model = tiny_model(model_type)
    adapter = adapter_for(model)
    config = scheme_preset("w4a4")
    activations = dataclasses.replace(config.activations, kv_bits=kv_bits, symmetric=symmetric, shift=shift)
    config = dataclasses.replace(config, method="rtn", activations=activations)
    rotate_model(model, adapter, config.rotation, kv_quantized=kv_bits < 16)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    return model, quantize_model(model, adapter, config, ids, progress=False)


def test_w4a4_activations_are_int4_quantize_dequantize_pairs(tmp_path):
    model, result = _w4a4("llama", kv_bits=4)
    onnx_qdq.export_qdq(model, result.weights, tmp_path)
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    quantize = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    dtypes = [{a.name: a.i for a in n.attribute}["output_dtype"] for n in quantize]
    layers = model.config.num_hidden_layers
    # every block linear's input, once per tensor: q/k/v and gate/up share theirs
    assert dtypes.count(onnx.TensorProto.INT4) == 4 * layers
    assert dtypes.count(onnx.TensorProto.UINT4) == 2 * layers  # keys and values, asymmetric
    consumers = {name for n in graph.node for name in n.input}
    assert all(n.output[0] in consumers for n in quantize)
    feeding = {n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    assert {n.output[0] for n in quantize} <= feeding  # Q feeds DQ directly, no Clip left between
    assert not any(n.op_type == "Clip" and n.input[0] in {q.output[0] for q in quantize} for n in graph.node)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_reference_evaluator_agrees_with_onnx_runtime(model_type, tmp_path):
    """Spec conformance: the ONNX reference implementation computes what ORT computes."""
    from onnx.reference import ReferenceEvaluator

    model, result = _w4a4(model_type, kv_bits=4)
    onnx_qdq.export_qdq(model, result.weights, tmp_path)
    lm = OrtCausalLM(tmp_path, accuracy_level=0)
    ids = torch.randint(0, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(4))
    feeds = lm.prefill_feeds(ids)
    expected = lm.session.run(["logits"], feeds)[0]
    reference = ReferenceEvaluator(str(tmp_path / "model.onnx"))
    got = reference.run(["logits"], feeds)[0]
    close = np.isclose(got, expected, rtol=1e-3, atol=1e-3).mean()
    assert close > 0.99


def _dequantize_matmulnbits(b, scales, zero_points, k: int, n: int, block: int) -> np.ndarray:
    """W [N, K] from MatMulNBits' inputs, spelled out from the contrib op's documentation."""
    blocks = -(-k // block)
    w = np.zeros((n, blocks * block))
    for row in range(n):
        for blk in range(blocks):
            byte = b[row, blk]
            codes = np.empty(block)
            codes[0::2], codes[1::2] = byte & 0xF, byte >> 4
            if zero_points is None:
                zp = 8
            else:
                packed = zero_points[row * ((blocks + 1) // 2) + blk // 2]
                zp = (packed >> 4) if blk % 2 else (packed & 0xF)
            w[row, blk * block : (blk + 1) * block] = (codes - zp) * scales[row * blocks + blk]
    return w[:, :k]


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize(("k", "block"), [(72, 16), (72, 32), (96, 32), (40, 128)])
def test_matmulnbits_packing_matches_the_documented_layout(symmetric, k, block):
    from exporters.ort_matmulnbits import matmulnbits_inputs

    rng = np.random.default_rng(k + block)
    n, blocks = 6, -(-k // block)
    codes = rng.integers(0, 16, (k, n), dtype=np.uint8)
    scale = rng.random((blocks, n)).astype(np.float32) + 0.1
    zero = None if symmetric else rng.integers(0, 16, (blocks, n), dtype=np.uint8)
    b, scales, zp = matmulnbits_inputs(codes, scale, zero, block)
    assert b.shape == (n, blocks, block // 2) and scales.shape == (n * blocks,)
    assert (zp is None) == symmetric
    group = np.arange(k) // block
    expected = (codes.astype(float) - (8 if symmetric else zero[group])) * scale[group]  # [K, N]
    np.testing.assert_allclose(_dequantize_matmulnbits(b, scales, zp, k, n, block), expected.T, rtol=1e-6)


@pytest.mark.parametrize(
    "weights",
    [
        WeightQuantConfig(4, 16),
        WeightQuantConfig(4, 32, symmetric=True),
        WeightQuantConfig(4, -1, symmetric=True),
    ],
    ids=["asym-g16-ragged", "sym-g32-ragged", "sym-per-channel"],
)
def test_ort_format_logits_match_pytorch(weights, tmp_path):
    from exporters.ort_matmulnbits import to_matmulnbits

    model, result = _quantized("qwen2", weights)
    info = to_matmulnbits(onnx_qdq.export_qdq(model, result.weights, tmp_path))
    graph = onnx.load(str(info.path)).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == len(result.weights)
    assert not any(n.op_type == "DequantizeLinear" for n in graph.node)
    ids = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    torch.testing.assert_close(
        OrtCausalLM(tmp_path, accuracy_level=0).logits(ids), expected, rtol=1e-4, atol=1e-4
    )
    level4 = OrtCausalLM(tmp_path, accuracy_level=4).logits(ids)  # int8 activations: close, not equal
    assert not torch.equal(level4, expected)
    assert info.components["blocks"] > 0 and info.components["embedding"] > 0


def test_w4a4_ort_format_keeps_activation_qdq_in_front_of_matmulnbits(tmp_path):
    from exporters.ort_matmulnbits import to_matmulnbits

    model, result = _w4a4("llama")
    to_matmulnbits(onnx_qdq.export_qdq(model, result.weights, tmp_path))
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    producer = {out: n for n in graph.node for out in n.output}
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == len(result.weights)  # the block linears and the preset's int8 lm_head
    blocks = [n for n in nbits if "logits" not in n.output]  # lm_head's input stays float
    assert len(blocks) == len(result.weights) - 1
    assert all(producer[n.input[0]].op_type == "DequantizeLinear" for n in blocks)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    got = OrtCausalLM(tmp_path, accuracy_level=0).logits(ids)
    assert torch.isclose(got, expected, rtol=1e-3, atol=1e-3).float().mean() > 0.99


@pytest.mark.parametrize("weights", [WeightQuantConfig(4, 16), WeightQuantConfig(4, -1, symmetric=True)],
                         ids=["asym-g16", "sym-per-channel"])  # fmt: skip
def test_int4_embedding_and_lm_head_in_both_formats(weights, tmp_path):
    """Tied embedding and lm_head, each on its own int4 grid: DQ → Gather and DQ → MatMul in the qdq
    format, GatherBlockQuantized and MatMulNBits in the ort format; both compute the PyTorch logits."""
    import dataclasses

    from exporters.ort_matmulnbits import to_matmulnbits

    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    config = QuantConfig(method="rtn", weights=weights, quantize_embedding=True, lm_head_bits=4)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    result = quantize_model(model, adapter_for(model), config, ids, progress=False)
    assert set(result.tables) == {"model.embed_tokens"} and "lm_head" in result.weights
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    qdq = onnx_qdq.export_qdq(model, result.weights, tmp_path / "qdq", tables=result.tables)
    assert qdq.replaced_weights == len(result.weights) + 1
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    torch.testing.assert_close(OrtCausalLM(tmp_path / "qdq").logits(ids), expected, rtol=1e-4, atol=1e-4)
    import shutil

    shutil.copytree(tmp_path / "qdq", tmp_path / "ort")
    ort_info = to_matmulnbits(dataclasses.replace(qdq, path=tmp_path / "ort" / "model.onnx"))
    ops = [n.op_type for n in onnx.load(str(ort_info.path)).graph.node]
    assert ops.count("GatherBlockQuantized") == 1 and ops.count("MatMulNBits") == len(result.weights)
    torch.testing.assert_close(OrtCausalLM(tmp_path / "ort").logits(ids), expected, rtol=1e-4, atol=1e-4)
    assert (
        ort_info.components["embedding"] < 0.2 * qdq.components["blocks"] + ort_info.components["embedding"]
    )
    # 1.3: a per-channel MatMulNBits pads this tiny model's 72 inputs to a block of 128 (1.8 times
    # the codes), and the graph both formats share is a small part of the file once duplicates merge
    assert ort_info.bytes_total < qdq.bytes_total * 1.3


@pytest.mark.parametrize("weights", [WeightQuantConfig(4, 16), WeightQuantConfig(4, -1, symmetric=True)],
                         ids=["asym-g16", "sym-per-channel"])  # fmt: skip
def test_int8_lm_head_in_both_formats(weights, tmp_path):
    """lm_head on an 8-bit grid: INT8/UINT8 DequantizeLinear → MatMul in the qdq format, an 8-bit
    MatMulNBits in the ort format; both compute the PyTorch logits."""
    from exporters import export_onnx

    model = tiny_model("llama")
    config = QuantConfig(method="rtn", weights=weights, lm_head_bits=8)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    result = quantize_model(model, adapter_for(model), config, ids, progress=False)
    assert result.weights["lm_head"].bits == 8 and result.weights["lm_head"].group_size == (
        weights.group_size if weights.group_size > 0 else model.config.hidden_size
    )
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    for fmt in ("qdq", "ort"):
        info = export_onnx(model, adapter_for(model), result, tmp_path / fmt, fmt)
        graph = onnx.load(str(info.path)).graph
        if fmt == "qdq":
            int8 = [
                t for t in graph.initializer if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
            ]
            assert len(int8) == (1 if weights.symmetric else 2)  # the lm_head's codes (and zero points)
        else:
            bits = [
                {a.name: a.i for a in n.attribute}["bits"] for n in graph.node if n.op_type == "MatMulNBits"
            ]
            assert sorted(bits) == [4] * (len(result.weights) - 1) + [8]
        assert info.components["lm_head"] > 0
        torch.testing.assert_close(
            OrtCausalLM(tmp_path / fmt, accuracy_level=0).logits(ids), expected, rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_a_tied_float_table_is_stored_once_in_the_qdq_graph(model_type, tmp_path):
    """optimum shares a tied Llama table through a Transpose but writes Gemma3's (a scaled embedding)
    twice; the exporter stores it once either way."""
    model = tiny_model(model_type, intermediate_size=80)  # no other weight of the table's shape
    model.config.tie_word_embeddings = True
    model.tie_weights()
    info = onnx_qdq.export_qdq(model, {}, tmp_path)
    table = model.model.embed_tokens.weight.detach().numpy()
    inits = onnx.load(str(info.path)).graph.initializer
    copies = [
        i.name
        for i in inits
        if sorted(i.dims) == sorted(table.shape)
        and (np.array_equal(a := onnx.numpy_helper.to_array(i), table) or np.array_equal(a, table.T))
    ]
    assert len(copies) == 1, copies
    assert info.components["embedding"] == table.nbytes and info.components["lm_head"] == 0
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    torch.testing.assert_close(OrtCausalLM(tmp_path).logits(ids), expected, rtol=1e-4, atol=1e-4)


def _activation_pairs(graph: onnx.GraphProto) -> list[tuple[onnx.NodeProto, list[str]]]:
    """Each activation QuantizeLinear with the op types of the nodes reading its DequantizeLinear's
    output (through the Add of a shift and the Cast back to float16 in a float16 graph)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    pairs = []
    for q in (n for n in graph.node if n.op_type == "QuantizeLinear"):
        (dq,) = consumers[q.output[0]]
        assert dq.op_type == "DequantizeLinear"
        readers = consumers[dq.output[0]]
        while [n.op_type for n in readers] in (["Add"], ["Cast"]):
            readers = consumers[readers[0].output[0]]
        pairs.append((q, sorted(n.op_type for n in readers)))
    return pairs


@pytest.mark.parametrize(
    ("symmetric", "fmt", "dtype", "shift"),
    [(True, "whole", "float32", False), (False, "whole", "float32", False), (True, "qdq", "float32", False),
     (False, "qdq", "float16", False), (True, "ort", "float32", False), (True, "whole", "float32", True),
     (False, "qdq", "float16", True), (False, "ort", "float32", True)],
    ids=["sym-whole", "asym-whole", "sym-stitched", "asym-stitched-fp16", "sym-stitched-ort",
         "sym-whole-shift", "asym-stitched-fp16-shift", "asym-stitched-ort-shift"],
)  # fmt: skip
def test_w4a4_quantizes_each_shared_input_once(symmetric, fmt, dtype, shift, tmp_path):
    """Issue 15: four activation Q/DQ pairs per block (the attention input read by q/k/v, o_proj's
    input, the MLP input read by gate/up, down_proj's input), each DQ feeding all the linears that
    read the tensor: in the whole-model trace, the stitched qdq graph (float16 too: Casts in front)
    and the stitched ort graph, where every weight still became MatMulNBits. With shifts, one Sub
    and one Add around each pair (the fused graph folds the Add into the bias: test_ort_fused)."""
    from exporters import export_onnx

    model, result = _w4a4("llama", symmetric=symmetric, shift=shift)
    if fmt == "whole":
        info = onnx_qdq.export_qdq(model, result.weights, tmp_path)
    else:
        info = export_onnx(model, adapter_for(model), result, tmp_path, fmt, dtype=dtype)
    assert info.merged_nodes > 0
    graph = onnx.load(str(info.path), load_external_data=False).graph
    layers = model.config.num_hidden_layers
    pairs = _activation_pairs(graph)
    assert len(pairs) == 4 * layers
    matmul = "MatMulNBits" if fmt == "ort" else "MatMul"
    for i in range(layers):
        readers = sorted(len(ops) for q, ops in pairs if q.name.startswith(f"/model/layers.{i}/"))
        assert readers == [1, 1, 2, 3], readers  # o_proj, down_proj; gate/up; q/k/v
    assert all(set(ops) == {matmul} for _, ops in pairs)
    dtypes = {{a.name: a.i for a in q.attribute}["output_dtype"] for q, _ in pairs}
    assert dtypes == {onnx.TensorProto.INT4 if symmetric else onnx.TensorProto.UINT4}
    if fmt == "ort":
        assert sum(n.op_type == "MatMulNBits" for n in graph.node) == len(result.weights)
    if shift:  # Sub → Q → DQ → Add, once per pair
        producers = {out: node for node in graph.node for out in node.output}
        assert all(producers[q.input[0]].op_type == "Sub" for q, _ in pairs)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_merging_duplicates_leaves_onnx_runtime_outputs_bit_identical(symmetric, tmp_path, monkeypatch):
    """The merged nodes computed the very values their originals compute: ONNX Runtime's logits and
    KV cache are the same bits with and without the pass, and a second pass finds nothing."""
    import shutil

    model, result = _w4a4("llama", kv_bits=4, symmetric=symmetric)
    monkeypatch.setattr(onnx_qdq, "merge_duplicate_nodes", lambda graph_model: 0)
    onnx_qdq.export_qdq(model, result.weights, tmp_path / "unmerged")
    monkeypatch.undo()
    shutil.copytree(tmp_path / "unmerged", tmp_path / "merged")
    graph_model = onnx.load(str(tmp_path / "merged" / "model.onnx"))
    before = len(graph_model.graph.node)
    merged = onnx_qdq.merge_duplicate_nodes(graph_model)
    assert merged > 0 and len(graph_model.graph.node) == before - merged
    assert onnx_qdq.merge_duplicate_nodes(graph_model) == 0
    onnx_qdq.write_model(graph_model, tmp_path / "merged", len(result.weights), merged)

    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(6))
    runs = []
    for folder in ("unmerged", "merged"):
        lm = OrtCausalLM(tmp_path / folder, accuracy_level=0)
        runs.append(lm.session.run(None, lm.prefill_feeds(ids)))
    for got, expected in zip(runs[1], runs[0], strict=True):
        np.testing.assert_array_equal(got, expected)


def _tiny_graph() -> onnx.ModelProto:
    """x, y [2, 3] → a hand-built graph with duplicates and near-duplicates of every kind."""
    from onnx import TensorProto, helper

    def constant(name: str, values: list[float], raw: bool) -> onnx.NodeProto:
        data = np.asarray(values, np.float32).tobytes() if raw else values
        tensor = helper.make_tensor(name + "_t", TensorProto.FLOAT, [len(values)], data, raw=raw)
        return helper.make_node("Constant", [], [name], name=name, value=tensor)

    nodes = [
        constant("c1", [1.0, 2.0, 3.0], raw=True),
        constant("c2", [1.0, 2.0, 3.0], raw=False),  # = c1, stored otherwise: merged
        constant("c3", [1.0, 2.0, 4.0], raw=True),  # another value: kept
        helper.make_node("Abs", ["x"], ["a1"]),
        helper.make_node("Abs", ["x"], ["a2"]),  # = a1
        helper.make_node("Abs", ["y"], ["a3"]),  # another input: kept
        helper.make_node("Mul", ["a1", "c1"], ["m1"]),
        helper.make_node("Mul", ["a2", "c2"], ["m2"]),  # = m1 once a2 → a1 and c2 → c1
        helper.make_node("Mul", ["c1", "a1"], ["m3"]),  # the inputs swapped: kept (no algebra)
        helper.make_node("Mul", ["a1", "c3"], ["m4"]),  # another constant: kept
        helper.make_node("ReduceMax", ["m1"], ["r1"], keepdims=1),
        helper.make_node("ReduceMax", ["m2"], ["r2"], keepdims=0),  # other attributes: kept
        helper.make_node("ReduceMax", ["m2"], ["r3"], keepdims=1),  # = r1 after the merges above
        helper.make_node("Identity", ["r3"], ["i3"]),  # rewired to r1
        helper.make_node("RandomNormalLike", ["x"], ["n1"], seed=1.0),
        helper.make_node("RandomNormalLike", ["x"], ["n2"], seed=1.0),  # random: never merged
        helper.make_node("Neg", ["x"], ["out1"]),
        helper.make_node("Neg", ["x"], ["out2"]),  # = out1, but a graph output: keeps its name
    ]
    sums = [helper.make_node("Sum", ["a3", "m3", "m4", "n1", "n2"], ["s"])]
    outputs = {"r1": [1, 1], "r2": [], "i3": [1, 1], "s": [2, 3], "out1": [2, 3], "out2": [2, 3]}
    float_info = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes + sums,
        "duplicates",
        [float_info(name, TensorProto.FLOAT, [2, 3]) for name in ("x", "y")],
        [float_info(name, TensorProto.FLOAT, shape) for name, shape in outputs.items()],
        value_info=[float_info("a2", TensorProto.FLOAT, [2, 3])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_merge_duplicate_nodes_on_a_hand_built_graph():
    """Exactly the duplicates merge (a Constant by value, chains to a fixpoint, consumers rewired);
    different inputs, attributes, random operators and graph outputs stay; a second pass changes
    nothing; the outputs stay the same."""
    from onnx.reference import ReferenceEvaluator

    model = _tiny_graph()
    original = onnx.ModelProto()
    original.CopyFrom(model)
    assert onnx_qdq.merge_duplicate_nodes(model) == 4  # c2, a2, m2, r3, and nothing else
    onnx.checker.check_model(model, full_check=True)
    made = {out for n in model.graph.node for out in n.output}
    assert made >= {"c1", "c3", "a1", "a3", "m1", "m3", "m4", "r1", "r2", "n1", "n2", "out1", "out2"}
    assert not made & {"c2", "a2", "m2", "r3"}
    assert [vi.name for vi in model.graph.output] == [vi.name for vi in original.graph.output]
    assert not any(vi.name == "a2" for vi in model.graph.value_info)  # no stale type for a gone name
    producer = {out: n for n in model.graph.node for out in n.output}
    assert list(producer["i3"].input) == ["r1"] and list(producer["r1"].input) == ["m1"]

    unchanged = model.SerializeToString()
    assert onnx_qdq.merge_duplicate_nodes(model) == 0
    assert model.SerializeToString() == unchanged

    feeds = {"x": np.arange(-3, 3, dtype=np.float32).reshape(2, 3), "y": np.ones((2, 3), np.float32)}
    deterministic = ["r1", "r2", "i3", "out1", "out2"]  # not s: it adds random numbers
    expected = ReferenceEvaluator(original).run(deterministic, feeds)
    got = ReferenceEvaluator(model).run(deterministic, feeds)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)

"""The ort format's fused decoder graph (exporters.ort_fused) on tiny random models."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_model

from edgeq.config import ActQuantConfig, QuantConfig, WeightQuantConfig, scheme_preset
from edgeq.evaluation import OrtCausalLM
from edgeq.models.adapters import adapter_for
from edgeq.pipeline import quantize_model
from edgeq.rotation.hadamard import OnlineRotation, hadamard_transform
from edgeq.rotation.rotate import plan_rotations, rotate_model
from exporters import export_onnx, graph_writer
from exporters.ort_fused import (
    KV_OPS,
    ONLINE_OPS,
    FusedDecoderWriter,
    architecture_blockers,
    fused_graph_blockers,
    graph_factors,
    rope_cache,
    rope_frequencies,
    scheme_blockers,
)

# GroupQueryAttention needs a head size that is a multiple of 8; hidden 72 = 4.5 × 16 keeps the
# ragged last group (and, at group 16, an odd block count: 5)
HEAD_DIM = 16


def _quantize(model, config: QuantConfig):
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    return quantize_model(model, adapter_for(model), config, ids, progress=False)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _decoded(lm: OrtCausalLM, ids: torch.Tensor, prompt: int) -> np.ndarray:
    """Logits [L, vocab] of ids [1, L]: a prompt of ``prompt`` tokens, then token by token."""
    logits, past = lm.step(ids[:, :prompt].numpy(), lm.empty_past(1), 0)
    rows = [logits[0]]
    for t in range(prompt, ids.shape[1]):
        logits, past = lm.step(ids[:, t : t + 1].numpy(), past, t)
        rows.append(logits[0])
    return np.concatenate(rows)


def _window_sizes(path) -> list[int]:
    """Each GroupQueryAttention's local_window_size, in layer order (-1: ORT's default, none)."""
    nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "GroupQueryAttention"]
    return [next((a.i for a in n.attribute if a.name == "local_window_size"), -1) for n in nodes]


def _randomize_norms(model) -> None:
    """Random RMSNorm scales (Gemma's start at zero, i.e. 1 + 0), so every norm's weight counts."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.3)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text"])
@pytest.mark.parametrize(
    "weights",
    [WeightQuantConfig(4, 16), WeightQuantConfig(4, 32, symmetric=True), WeightQuantConfig(4, -1)],
    ids=["asym-g16-odd-blocks", "sym-g32-ragged", "asym-per-channel"],
)
def test_fused_graph_computes_the_pytorch_logits(model_type, weights, tmp_path):
    model = tiny_model(model_type, head_dim=HEAD_DIM)
    result = _quantize(model, QuantConfig(method="rtn", weights=weights))
    info = export_onnx(model, adapter_for(model), result, tmp_path, "ort")
    assert info.graph == "fused" and info.not_fused == ()
    ops = Counter(n.op_type for n in onnx.load(str(info.path)).graph.node)
    layers = model.config.num_hidden_layers
    assert ops["GroupQueryAttention"] == layers
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers
    assert ops["MatMulNBits"] == 5 * layers  # q/k/v in one, o, gate, up, down
    assert ops["Softmax"] == 0 and ops["DequantizeLinear"] == 0
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        OrtCausalLM(tmp_path, accuracy_level=0).logits(ids), _logits(model, ids), rtol=1e-4, atol=1e-4
    )


def test_fused_graph_decode_with_the_cache_equals_a_prefill(tmp_path):
    model = tiny_model("qwen2", head_dim=HEAD_DIM)
    result = _quantize(model, QuantConfig(method="rtn", weights=WeightQuantConfig(4, 16)))
    export_onnx(model, adapter_for(model), result, tmp_path, "ort")
    lm = OrtCausalLM(tmp_path, accuracy_level=0)
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(2))
    _, past = lm.step(ids[:, :9].numpy(), lm.empty_past(1), 0)
    assert past["past_key_values.0.key"].shape == (1, model.config.num_key_value_heads, 9, HEAD_DIM)
    np.testing.assert_allclose(_decoded(lm, ids, 9), _logits(model, ids)[0].numpy(), rtol=1e-4, atol=1e-4)


# (model_type, config constructor fields, each layer's expected window): sequences of 20 tokens pass
# every window, so an off-by-one in local_window_size would change the logits far past the tolerance
SLIDING = {
    "mistral": ("mistral", {"sliding_window": 6}, [6, 6]),  # every layer (no layer_types)
    # Qwen2: the first max_window_layers layers are full
    "qwen2": ("qwen2", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1}, [-1, 5]),
    # Gemma3: five sliding layers then one full (sliding_window_pattern 6), each kind its RoPE base
    "gemma3": ("gemma3_text", {"num_hidden_layers": 6, "sliding_window": 8}, [8, 8, 8, 8, 8, -1]),
}


@pytest.mark.parametrize("case", SLIDING.values(), ids=SLIDING.keys())
def test_sliding_window_layers_match_pytorch_in_prefill_and_decode_past_the_window(case, tmp_path):
    model_type, fields, windows = case
    model = tiny_model(model_type, config_kwargs={**fields, "head_dim": HEAD_DIM})
    _randomize_norms(model)
    adapter = adapter_for(model)
    assert fused_graph_blockers(model, adapter) == []
    result = _quantize(model, QuantConfig(method="rtn", weights=WeightQuantConfig(4, 16)))
    info = export_onnx(model, adapter, result, tmp_path, "ort")
    assert info.graph == "fused"
    # ORT's local_window_size counts the query itself, as transformers' sliding_window does
    assert _window_sizes(info.path) == windows
    assert [adapter.sliding_window(model.config, i) or -1 for i in range(len(windows))] == windows
    ids = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(7))
    expected = _logits(model, ids)
    lm = OrtCausalLM(tmp_path, accuracy_level=0)
    torch.testing.assert_close(lm.logits(ids), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_decoded(lm, ids, 3), expected[0].numpy(), rtol=1e-4, atol=1e-4)


def test_gemma3_fused_graph_layout(tmp_path):
    """Gemma3's extra pieces in the fused graph: q/k norms, branch norms, FastGelu, the scaled
    embedding on the tied table, and a local and a global RoPE cache."""
    model = tiny_model("gemma3_text", config_kwargs={"num_hidden_layers": 6, "head_dim": HEAD_DIM})
    assert model.config.tie_word_embeddings and model.config.hidden_activation == "gelu_pytorch_tanh"
    _randomize_norms(model)
    info = export_onnx(model, adapter_for(model), None, tmp_path, "ort")  # float: the tied table
    graph = onnx.load(str(info.path)).graph
    ops = Counter(n.op_type for n in graph.node)
    layers = model.config.num_hidden_layers
    assert ops["GroupQueryAttention"] == ops["FastGelu"] == ops["Split"] == layers
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers
    # standalone RMSNorms (first block's input, q, k, post-attention, post-feedforward) as standard ops
    assert ops["Pow"] == 1 + 4 * layers and ops["Sigmoid"] == 0
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    scale = inits["model.embed_tokens.embed_scale"]
    assert scale == np.float32(model.model.embed_tokens.embed_scale) == np.float32(72**0.5)
    table = model.model.embed_tokens.weight.detach().numpy()
    assert sum(v.shape == table.shape and np.array_equal(v, table) for v in inits.values()) == 1
    assert info.components["lm_head"] == 0
    # cos/sin computed in the graph from each RoPE base's frequencies, no [max_positions, ·] table
    local, full = inits["model.rotary_emb_local.inv_freq"], inits["model.rotary_emb.inv_freq"]
    assert local.shape == full.shape and not np.allclose(local, full)  # rope_local_base_freq vs rope_theta
    assert ops["Cos"] == ops["Sin"] == 2
    assert all(model.config.max_position_embeddings not in v.shape for v in inits.values())
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(OrtCausalLM(tmp_path).logits(ids), _logits(model, ids), rtol=1e-4, atol=1e-4)


def test_llama3_rope_scaling_is_in_the_cos_sin_cache(tmp_path):
    """Llama-3.2's rope_scaling (rope_type llama3) rescales the low frequencies of inv_freq: the cache
    is taken from the model's rotary module, so it carries the scaling."""
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # fmt: skip
    fields = {"head_dim": HEAD_DIM, "rope_theta": 500_000.0}
    model = tiny_model("llama", config_kwargs={**fields, "rope_scaling": scaling})
    plain = tiny_model("llama", config_kwargs=fields)
    scaled_cos, _ = rope_cache(model.model.rotary_emb, 64)
    plain_cos, _ = rope_cache(plain.model.rotary_emb, 64)
    assert not np.allclose(scaled_cos, plain_cos)
    result = _quantize(model, QuantConfig(method="rtn", weights=WeightQuantConfig(4, 16)))
    info = export_onnx(model, adapter_for(model), result, tmp_path, "ort")
    assert info.graph == "fused"
    ids = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(
        OrtCausalLM(tmp_path, accuracy_level=0).logits(ids), _logits(model, ids), rtol=1e-4, atol=1e-4
    )


def test_tied_float_embedding_is_stored_once(tmp_path):
    model = tiny_model("llama", head_dim=HEAD_DIM)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    info = export_onnx(model, adapter_for(model), None, tmp_path, "ort")  # an unquantized model
    table = model.model.embed_tokens.weight.detach().numpy()
    inits = onnx.load(str(info.path)).graph.initializer
    copies = [
        i
        for i in inits
        if tuple(i.dims) == table.shape and np.array_equal(onnx.numpy_helper.to_array(i), table)
    ]
    assert len(copies) == 1
    assert info.components["embedding"] == table.nbytes and info.components["lm_head"] == 0
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(OrtCausalLM(tmp_path).logits(ids), _logits(model, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])  # Gemma3: scaled after the int4 Gather
def test_int4_embedding_and_lm_head_in_the_fused_graph(model_type, tmp_path):
    model = tiny_model(model_type, head_dim=HEAD_DIM)
    config = QuantConfig(method="rtn", weights=WeightQuantConfig(4, 16), quantize_embedding=True,
                         lm_head_bits=4)  # fmt: skip
    result = _quantize(model, config)
    info = export_onnx(model, adapter_for(model), result, tmp_path, "ort")
    ops = Counter(n.op_type for n in onnx.load(str(info.path)).graph.node)
    assert ops["GatherBlockQuantized"] == 1 and ops["Gemm"] == 0
    assert ops["MatMulNBits"] == 5 * model.config.num_hidden_layers + 1
    assert info.components["lm_head"] > 0
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(
        OrtCausalLM(tmp_path, accuracy_level=0).logits(ids), _logits(model, ids), rtol=1e-4, atol=1e-4
    )


def test_what_the_fused_graph_cannot_express_falls_back_with_the_reason(tmp_path):
    gemma = tiny_model("gemma3_text", head_dim=HEAD_DIM)
    assert fused_graph_blockers(gemma, adapter_for(gemma)) == []
    assert any("multiple of 8" in r for r in fused_graph_blockers(tiny_model("llama"), adapter_for(gemma)))
    gelu = tiny_model("llama", head_dim=HEAD_DIM, hidden_act="gelu")  # erf GELU: not written
    assert any("MLP activation gelu" in r for r in fused_graph_blockers(gelu, adapter_for(gelu)))
    capped = tiny_model("gemma3_text", head_dim=HEAD_DIM, final_logit_softcapping=30.0)
    assert any("softcapping" in r for r in fused_graph_blockers(capped, adapter_for(capped)))

    # a quantized KV cache (and R3 on queries and keys) stays on optimum's graph
    model, result = _w4a4_llama(kv_bits=4)
    info = export_onnx(model, adapter_for(model), result, tmp_path / "kv4", "ort")
    assert info.graph == "optimum" and info.not_fused == (KV_OPS,)
    ops = Counter(n.op_type for n in onnx.load(str(info.path)).graph.node)
    assert ops["MatMulNBits"] == len(result.weights) and ops["GroupQueryAttention"] == 0
    # an online rotation the graph does not write (any input but o_proj's and down_proj's) blocks it
    model, result = _w4a4_llama(r5=True)
    adapter = adapter_for(model)
    assert fused_graph_blockers(model, adapter) == []
    block = adapter.blocks(model)[1]
    adapter.input_quantizer(block, "up").rotation = OnlineRotation(hadamard_transform(64))
    assert fused_graph_blockers(model, adapter) == [ONLINE_OPS]


def test_int8_lm_head_in_the_fused_graph(tmp_path):
    model = tiny_model("qwen2", head_dim=HEAD_DIM)
    result = _quantize(model, QuantConfig(method="rtn", weights=WeightQuantConfig(4, 32), lm_head_bits=8))
    info = export_onnx(model, adapter_for(model), result, tmp_path, "ort")
    head = [n for n in onnx.load(str(info.path)).graph.node if "logits" in n.output]
    assert head[0].op_type == "MatMulNBits" and {a.name: a.i for a in head[0].attribute}["bits"] == 8
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(
        OrtCausalLM(tmp_path, accuracy_level=0).logits(ids), _logits(model, ids), rtol=1e-4, atol=1e-4
    )


def test_rope_frequencies_are_only_used_where_they_reproduce_the_module():
    """The graph computes cos/sin from inv_freq only when that formula is what the rotary module
    computes; any other module keeps its own precomputed table."""
    rotary = tiny_model("llama", head_dim=HEAD_DIM).model.rotary_emb
    inv_freq, scale = rope_frequencies(rotary, *rope_cache(rotary, 256))
    np.testing.assert_array_equal(inv_freq, rotary.inv_freq.numpy())
    assert scale == rotary.attention_scaling == 1.0

    class PositionsDoubled(torch.nn.Module):  # a RoPE that is not cos(p · inv_freq)
        def __init__(self):
            super().__init__()
            self.inv_freq = rotary.inv_freq

        def forward(self, x, position_ids):
            return rotary(x, 2 * position_ids)

    assert rope_frequencies(PositionsDoubled(), *rope_cache(PositionsDoubled(), 256)) is None


# W4A4: R1/R2 fused, R4 online on down_proj's input, per-token fake quantization of every block
# linear's input, written in front of the MatMulNBits (``FusedDecoderWriter``)
A4_CASES = {
    "sym-a4": ActQuantConfig(bits=4, symmetric=True, clip_ratio=0.9),
    "asym-a4": ActQuantConfig(bits=4, symmetric=False, clip_ratio=0.9),
    "sym-a4-down-a8": ActQuantConfig(bits=4, symmetric=True, clip_ratio=0.9, down_proj_bits=8),
    "asym-a8-clip1": ActQuantConfig(bits=8, symmetric=False, clip_ratio=1.0),
    "sym-a4-shift": ActQuantConfig(bits=4, symmetric=True, clip_ratio=0.9, shift=True),
    "asym-a4-shift": ActQuantConfig(bits=4, symmetric=False, clip_ratio=0.9, shift=True),
}


def _w4a4_llama(activations: ActQuantConfig | None = None, kv_bits: int = 16, r5: bool = False):
    """A tiny Llama rotated (R4 online: 96 = 12 · 8, two Hadamard factors; with ``r5``, R5 on
    o_proj's 64-wide input too) and quantized W4A4 with RTN: the w4a4 preset with ``activations``
    for its activation grid."""
    preset = scheme_preset("w4a4")
    activations = dataclasses.replace(activations or preset.activations, kv_bits=kv_bits)
    rotation = dataclasses.replace(preset.rotation, r5=r5)
    config = dataclasses.replace(preset, method="rtn", activations=activations, rotation=rotation)
    model = tiny_model("llama", head_dim=HEAD_DIM)
    _randomize_norms(model)
    rotate_model(model, adapter_for(model), config.rotation, kv_quantized=kv_bits < 16)
    return model, _quantize(model, config)


def _set_clip(model, block_index: int, roles: tuple[str, ...], clip_ratio: float) -> None:
    """A searched clip ratio on the inputs of ``roles`` in one block (``edgeq.activation_ranges``)."""
    adapter = adapter_for(model)
    for role in roles:
        adapter.input_quantizer(adapter.blocks(model)[block_index], role).clip_ratio = clip_ratio


def _assert_fake_quant_parity(got: np.ndarray, expected: np.ndarray) -> None:
    """ORT at accuracy level 0 against the PyTorch fake-quantized model, logits [..., vocab].

    Both compute the same float32 formulas, but in other summation orders (ORT's MatMulNBits and
    attention against torch's), so the two roundings of an activation that sits within ~1e-7 of a
    half step can differ: one code one step apart, which moves that token's logits (and, through
    attention, later tokens') by far more than float noise. At ~2e-7 per quantized element and ~1e5
    elements such a flip is a rare event, not a bound: so the test asks that nearly every position
    agree to float precision and nearly every greedy token be the same, not all of them."""
    got, expected = got.reshape(-1, got.shape[-1]), expected.reshape(-1, expected.shape[-1])
    rel = np.linalg.norm(got - expected, axis=-1) / np.linalg.norm(expected, axis=-1)
    assert np.mean(rel < 1e-4) >= 0.9, np.sort(rel)[-10:]
    assert np.median(rel) < 1e-5
    assert np.mean(got.argmax(-1) == expected.argmax(-1)) >= 0.98


@pytest.mark.parametrize("activations", A4_CASES.values(), ids=A4_CASES.keys())
def test_w4a4_fused_graph_computes_the_pytorch_fake_quant_logits(activations, tmp_path):
    model, result = _w4a4_llama(activations)
    _check_fused_parity(model, result, tmp_path)


def test_w4a4_fused_graph_writes_r5_on_o_proj_input(tmp_path):
    """R5 on o_proj's input: the same factored rotation as R4 in front of o_proj's grid (64 = 8 · 8:
    one more Reshape pair and two MatMuls per block), and the logits still match PyTorch's."""
    model, result = _w4a4_llama(r5=True)
    assert adapter_for(model).input_quantizer(adapter_for(model).blocks(model)[0], "o").rotation is not None
    _check_fused_parity(model, result, tmp_path)
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "model.onnx")).graph.node)
    layers = model.config.num_hidden_layers
    assert ops["Reshape"] == 4 * layers and ops["MatMul"] == 4 * layers  # R4 and R5


def _check_fused_parity(model, result, tmp_path) -> None:
    """The model (a rotated W4A4 tiny Llama) with its own clip ratios on a module and a shared
    input, exported as the fused graph, against its PyTorch fake-quant logits."""
    _set_clip(model, 1, ("o",), 0.75)  # a module with its own clip ratio
    _set_clip(model, 0, ("gate", "up"), 0.8)  # a shared input: both linears carry it
    info = export_onnx(model, adapter_for(model), result, tmp_path, "ort")
    assert info.graph == "fused" and info.not_fused == ()
    ids = torch.randint(0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(11))
    got = OrtCausalLM(tmp_path, accuracy_level=0).logits(ids).numpy()
    _assert_fake_quant_parity(got, _logits(model, ids).numpy())


@pytest.mark.parametrize(
    ("symmetric", "shift"), [(True, False), (False, False), (False, True)], ids=["sym", "asym", "asym-shift"]
)
def test_w4a4_fused_graph_quantizes_each_input_once(symmetric, shift, tmp_path):
    """q/k/v read one quantized input and gate/up one: one quantizer each, plus o_proj's and
    down_proj's own (after R4, two factor products and no dense 96 × 96 matrix). With shifts, a
    Sub in front of each quantizer and W·shift in the bias after each matmul, so that MatMulNBits
    still reads the dequantized grid values."""
    activations = ActQuantConfig(bits=4, symmetric=symmetric, down_proj_bits=8, shift=shift)
    model, result = _w4a4_llama(activations)
    info = export_onnx(model, adapter_for(model), result, tmp_path, "ort")
    graph = onnx.load(str(info.path)).graph
    ops = Counter(n.op_type for n in graph.node)
    layers = model.config.num_hidden_layers
    assert ops["DequantizeLinear"] == ops["ReduceMax"] == 4 * layers
    # asymmetric: one more QuantizeLinear per input rounds its zero point
    assert ops["QuantizeLinear"] == (4 if symmetric else 8) * layers
    assert ops["Abs"] == (4 * layers if symmetric else 0)
    assert ops["Where"] == ops["Clip"] == ops["Round"] == 0
    assert ops["MatMul"] == 2 * layers and ops["MatMulNBits"] == 5 * layers + 1  # + int8 lm_head
    assert ops["Reshape"] == 2 * layers  # R4: into the [.., 12, 8] view and back
    width = model.config.intermediate_size
    assert not any(tuple(i.dims) == (width, width) for i in graph.initializer)
    # 4-bit codes everywhere but down_proj's input (8 bits); symmetric: int, asymmetric: uint
    producer = {out: n for n in graph.node for out in n.output}
    dequantize = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    quantize = [producer[n.input[0]] for n in dequantize]
    assert all(n.op_type == "QuantizeLinear" for n in quantize)
    if not symmetric:  # the pair's zero point: a QuantizeLinear of −lo by the pair's own scale
        for n in quantize:
            zero_point = producer[n.input[2]]
            assert zero_point.op_type == "QuantizeLinear" and zero_point.input[1] == n.input[1]
    codes = Counter({a.name: a.i for a in n.attribute}["output_dtype"] for n in quantize)
    four, eight = (onnx.TensorProto.INT4, onnx.TensorProto.INT8) if symmetric else (
        onnx.TensorProto.UINT4, onnx.TensorProto.UINT8)  # fmt: skip
    assert codes == {four: 3 * layers, eight: layers}
    # every block MatMulNBits reads a dequantized activation
    blocks = [n for n in graph.node if n.op_type == "MatMulNBits" and "logits" not in n.output]
    assert all(producer[n.input[0]].op_type == "DequantizeLinear" for n in blocks)
    assert all((producer[n.input[0]].op_type == "Sub") == shift for n in quantize)
    added = {n.input[0] for n in graph.node if n.op_type == "Add"}  # the tiny Llama has no biases
    assert all((n.output[0] in added) == shift for n in blocks)


def test_w4a4_decode_with_the_cache_equals_a_prefill(tmp_path):
    model, result = _w4a4_llama()
    export_onnx(model, adapter_for(model), result, tmp_path, "ort")
    lm = OrtCausalLM(tmp_path, accuracy_level=0)
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(2))
    prefill = lm.logits(ids)[0].numpy()
    _assert_fake_quant_parity(_decoded(lm, ids, 9), prefill)
    _assert_fake_quant_parity(_decoded(lm, ids, 9), _logits(model, ids)[0].numpy())


def test_linears_reading_one_input_must_share_its_grid(tmp_path):
    model, result = _w4a4_llama()
    _set_clip(model, 1, ("k",), 0.5)  # q and v keep 0.9
    with pytest.raises(ValueError, match="one grid"):
        export_onnx(model, adapter_for(model), result, tmp_path, "ort")


@pytest.mark.parametrize("kv_bits", [16, 4])
def test_the_ort_export_path_chooses_the_fused_graph_for_w4a4_with_a_float_kv_cache(kv_bits, tmp_path):
    """What ``edgeq.export`` decides before quantizing: the w4a4 preset (R4 online, A4) writes the
    fused graph; with a 4-bit KV cache (and R3) optimum's, with the KV reason."""
    preset = scheme_preset("w4a4")
    quant = dataclasses.replace(preset, activations=dataclasses.replace(preset.activations, kv_bits=kv_bits))
    model = tiny_model("llama", head_dim=HEAD_DIM)
    adapter = adapter_for(model)
    plan = plan_rotations(adapter, model.config, quant.rotation, kv_quantized=kv_bits < 16)
    assert plan.r4 is not None and (plan.r3 is not None) == (kv_bits < 16)
    blockers = architecture_blockers(model.config, adapter) + scheme_blockers(quant, plan.r3 is not None)
    writer = graph_writer(model, adapter, tmp_path, "ort", blockers)
    if kv_bits == 16:
        assert blockers == [] and isinstance(writer, FusedDecoderWriter)
    else:
        assert blockers == [KV_OPS] and not isinstance(writer, FusedDecoderWriter)


def test_graph_factors_regroup_the_hadamard_and_never_write_the_dense_matrix():
    """SmolLM2's R4 (1536 = 12 · 64 · 2) is written as two products, 48 and 32 wide (the Sylvester
    part regrouped: 12 · 2 · 2 and 2^5), whose Kronecker product with the scale folded in is the
    transform; the tiny model's 96 = 12 · 8 keeps two (merged they would be the dense matrix)."""
    transform = hadamard_transform(1536)
    factors = [f.numpy() for f in transform.factors]
    assert [f.shape[0] for f in factors] == [12, 64, 2]
    merged = graph_factors(factors, transform.scale, 1536)
    assert [f.shape[0] for f in merged] == [48, 32]
    dense = transform.matrix().numpy()
    np.testing.assert_allclose(np.kron(merged[0].astype(np.float64), merged[1]), dense, atol=1e-7)
    small = hadamard_transform(96)
    kept = graph_factors([f.numpy() for f in small.factors], small.scale, 96)
    assert [f.shape[0] for f in kept] == [12, 8]
    # one factor (the random-orthogonal fallback) stays the one dense product it is
    assert [f.shape[0] for f in graph_factors([np.eye(10)], 1.0, 10)] == [10]
    # no per-op overhead: the least multiply-adds (12 + 7 · 2 per element; H_4 costs what two H_2 do)
    assert sum(f.shape[0] for f in graph_factors(factors, 1.0, 1536, overhead=0)) == 12 + 7 * 2

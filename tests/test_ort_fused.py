"""The ort format's fused decoder graph (exporters.ort_fused) on tiny random models."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_model

from edgeq.config import QuantConfig, WeightQuantConfig, scheme_preset
from edgeq.evaluation import OrtCausalLM
from edgeq.models.adapters import adapter_for
from edgeq.pipeline import quantize_model
from edgeq.rotation.rotate import rotate_model
from exporters import export_onnx
from exporters.ort_fused import fused_graph_blockers, rope_cache, rope_frequencies

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

    model = tiny_model("llama", head_dim=HEAD_DIM)  # w4a4: online R4 and quantized activations
    adapter = adapter_for(model)
    config = dataclasses.replace(scheme_preset("w4a4"), method="rtn")
    rotate_model(model, adapter, config.rotation)
    result = _quantize(model, config)
    info = export_onnx(model, adapter, result, tmp_path, "ort")
    assert info.graph == "optimum"
    assert any("quantized activations" in r for r in info.not_fused)
    ops = Counter(n.op_type for n in onnx.load(str(info.path)).graph.node)
    assert ops["MatMulNBits"] == len(result.weights) and ops["GroupQueryAttention"] == 0


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

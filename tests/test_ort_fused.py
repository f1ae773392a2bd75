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
from exporters.ort_fused import fused_graph_blockers

# GroupQueryAttention needs a head size that is a multiple of 8; hidden 72 = 4.5 × 16 keeps the
# ragged last group (and, at group 16, an odd block count: 5)
HEAD_DIM = 16


def _quantize(model, config: QuantConfig):
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    return quantize_model(model, adapter_for(model), config, ids, progress=False)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
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
    expected = _logits(model, ids)[0].numpy()
    logits, past = lm.step(ids[:, :9].numpy(), lm.empty_past(1), 0)  # a prompt, then token by token
    assert past["past_key_values.0.key"].shape == (1, model.config.num_key_value_heads, 9, HEAD_DIM)
    rows = [logits[0]]
    for t in range(9, 24):
        logits, past = lm.step(ids[:, t : t + 1].numpy(), past, t)
        rows.append(logits[0])
    np.testing.assert_allclose(np.concatenate(rows), expected, rtol=1e-4, atol=1e-4)


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


def test_int4_embedding_and_lm_head_in_the_fused_graph(tmp_path):
    model = tiny_model("llama", head_dim=HEAD_DIM)
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
    assert any("GELU" in r for r in fused_graph_blockers(gemma, adapter_for(gemma)))
    assert any("multiple of 8" in r for r in fused_graph_blockers(tiny_model("llama"), adapter_for(gemma)))

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

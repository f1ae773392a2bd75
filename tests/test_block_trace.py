"""optimum's graph traced block by block in one-layer shells and stitched (``exporters.block_trace``):
it computes what the whole-model trace computes, prefill and decode, for every architecture."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_model

import exporters.onnx_qdq as onnx_qdq
from edgeq.config import scheme_preset
from edgeq.evaluation import OrtCausalLM
from edgeq.models.adapters import adapter_for
from edgeq.pipeline import quantize_model
from edgeq.rotation.rotate import rotate_model
from exporters import export_onnx
from exporters.block_trace import layer_nodes, layer_scope

# Gemma3 with both kinds of layer, so the outer shell carries two placeholder layers and the
# blocks read both masks and both RoPE tables
LAYERS = {
    "llama": {},
    "qwen2": {},
    "gemma3_text": {
        "num_hidden_layers": 3,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    },
}


def _quantized(model_type: str, scheme: str):
    overrides = LAYERS[model_type]
    model = tiny_model(model_type, **overrides)
    adapter = adapter_for(model)
    config = dataclasses.replace(scheme_preset(scheme), method="rtn")
    if config.rotation.enabled:
        rotate_model(model, adapter, config.rotation)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    result = quantize_model(model, adapter, config, ids, progress=False)
    return model, adapter, result


def _prefill_then_decode(session: OrtCausalLM, ids: np.ndarray) -> list[np.ndarray]:
    logits, past = session.step(ids[:, :-2], session.empty_past(1), 0)
    outputs = [logits]
    for t in range(ids.shape[1] - 2, ids.shape[1]):
        logits, past = session.step(ids[:, t : t + 1], past, t)
        outputs.append(logits)
    return outputs


@pytest.mark.parametrize("scheme", ["w4a16", "w4a4"])
@pytest.mark.parametrize("model_type", sorted(LAYERS))
def test_the_stitched_graph_computes_what_the_whole_trace_does(model_type, scheme, tmp_path):
    model, adapter, result = _quantized(model_type, scheme)
    stitched = export_onnx(model, adapter, result, tmp_path / "stitched", "qdq")
    whole = onnx_qdq.export_qdq(model, result.weights, tmp_path / "whole", tables=result.tables)
    assert stitched.replaced_weights == whole.replaced_weights == len(result.weights)
    assert stitched.external_data and (tmp_path / "stitched" / onnx_qdq.EXTERNAL_DATA_FILE).exists()

    graph = onnx.load(str(stitched.path), load_external_data=False).graph
    count = len(adapter.blocks(model))
    assert [vi.name for vi in graph.input if vi.name.startswith("past")] == [
        f"past_key_values.{i}.{kv}" for i in range(count) for kv in ("key", "value")
    ]
    for i in range(count):  # every block's nodes, under its own name
        assert layer_nodes(graph, list(graph.node), layer_scope(adapter, i))
    # the same integer weights and activation quantizers (the shape plumbing may differ: the whole
    # trace shares some of it across layers)
    whole_graph = onnx.load(str(whole.path)).graph
    for op in ("DequantizeLinear", "QuantizeLinear", "MatMul", "Softmax"):
        assert sum(n.op_type == op for n in graph.node) == sum(n.op_type == op for n in whole_graph.node), op

    ids = torch.randint(
        0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1)
    ).numpy()
    for got, expected in zip(
        _prefill_then_decode(OrtCausalLM(tmp_path / "stitched", accuracy_level=0), ids),
        _prefill_then_decode(OrtCausalLM(tmp_path / "whole", accuracy_level=0), ids),
        strict=True,
    ):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_the_ort_format_of_a_model_the_fused_graph_cannot_express_is_stitched_too(tmp_path):
    model, adapter, result = _quantized("llama", "w4a4")
    info = export_onnx(model, adapter, result, tmp_path, "ort")
    assert info.graph == "optimum" and info.not_fused
    graph = onnx.load(str(info.path), load_external_data=False).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == len(result.weights)
    ids = torch.randint(0, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    got = OrtCausalLM(tmp_path, accuracy_level=0).logits(ids)
    # per-token 4-bit activations: a few values may round to the neighbouring level in one runtime
    assert torch.isclose(got, expected, rtol=1e-3, atol=1e-3).float().mean() > 0.95

"""ONNX Runtime's fused decoder graph: the ``ort`` format's fast path.

optimum's export traces a model op by op: attention as MatMul/Softmax with mask arithmetic, RMSNorm
as Pow/ReduceMean/Sqrt/Div, RoPE as slices and concats, the KV cache as Concat. At batch 1 decode
those small kernels cost more than the int4 matmuls themselves. This module writes the decoder
directly from the adapter with ORT's contrib operators, as ORT's own model builder lays it out:

    embedding   Gather (GatherBlockQuantized when the table is int4)
    per block   SkipSimplifiedLayerNormalization   residual add + RMSNorm in one kernel
                MatMulNBits [W_Q; W_K; W_V]        one int4 matmul for the three
                GroupQueryAttention                RoPE from a cos/sin cache, KV cache, causal softmax
                MatMulNBits o_proj → SkipSimplifiedLayerNormalization
                MatMulNBits gate, up → x·Sigmoid(x)·up → MatMulNBits down
    final       SkipSimplifiedLayerNormalization → lm_head (MatMulNBits, or Gemm on a float table)

Integer weights may be int4 or int8 (the presets' lm_head); MatMulNBits takes both.

Inputs and outputs are optimum's (input_ids, attention_mask, past_key_values.N.key/value →
logits, present.N.key/value) without position_ids: GroupQueryAttention derives positions from the
attention mask (right padding only). Weights are written as DequantizeLinear → MatMul and then
converted by ``ort_matmulnbits``, so both formats share one packing.

What the fused operators cannot express (online Hadamards, quantized activations or KV cache,
architectures the adapter marks) is reported by ``fused_graph_blockers``; the ort format then
converts optimum's graph instead.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from edgeq.activations import QuantInputLinear
from edgeq.models.adapters import Adapter
from edgeq.quant.grid import QuantizedWeight, concat_rows
from exporters.onnx_qdq import DEFAULT_OPSET, OnnxExportInfo, dequantize_linear_initializers, write_model
from exporters.ort_matmulnbits import DEFAULT_ACCURACY_LEVEL, MS_DOMAIN, convert_to_matmulnbits

SUPPORTED_ACTIVATIONS = ("silu",)  # x · sigmoid(x), the gate of Llama-style MLPs


def fused_graph_blockers(model, adapter: Adapter) -> list[str]:
    """Why ``model`` cannot be written as the fused graph (empty: it can)."""
    config = model.config
    reasons = [adapter.fused_graph_unsupported] if adapter.fused_graph_unsupported else []
    if getattr(config, "hidden_act", "silu") not in SUPPORTED_ACTIVATIONS:
        reasons.append(f"MLP activation {config.hidden_act} (supported: {', '.join(SUPPORTED_ACTIVATIONS)})")
    if adapter.attention_shape(config).head_dim % 8:
        reasons.append("a head size that is not a multiple of 8 (GroupQueryAttention needs one)")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        reasons.append("sliding-window attention")
    if (getattr(config, "rope_scaling", None) or {}).get("rope_type") == "dynamic":
        reasons.append("dynamic RoPE scaling (the cos/sin cache would depend on the length)")
    for module in model.modules():
        if isinstance(module, QuantInputLinear) and (module.rotation is not None or module.quantize_input):
            reasons.append("online rotations or quantized activations in front of the linears")
            break
    for block in adapter.blocks(model):
        if hasattr(adapter.attention(block), "edgeq_kv"):
            reasons.append("quantized or rotated KV cache")
            break
    return reasons


def rope_cache(model, adapter: Adapter, length: int) -> tuple[np.ndarray, np.ndarray]:
    """GroupQueryAttention's (cos_cache, sin_cache) [length, rotary_dim / 2] float32, from the
    model's own rotary module (so any static RoPE scaling and its attention factor carry over)."""
    rotary = adapter.rotary(model)
    positions = torch.arange(length)[None]
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    half = cos.shape[-1] // 2  # HF repeats the frequencies: cos = [c, c]
    return cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy()


class _Graph:
    """Nodes and initializers of the graph being written, with unique names."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "", **attrs):
        """Add a node; returns its output name (or the list of them when ``outputs`` > 1)."""
        self._count += 1
        name = f"/{op_type}_{self._count}"
        names = outputs if isinstance(outputs, list) else [f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=name, domain=domain, **attrs))
        return names[0] if len(names) == 1 else names


def _float_matmul(g: _Graph, x: str, name: str, weight: torch.Tensor) -> str:
    """x @ Wᵀ with W [out, in] stored transposed."""
    wt = g.constant(f"{name}.weight_T", weight.detach().float().numpy().T.copy())
    return g.op("MatMul", [x, wt])


def _dequantized(g: _Graph, name: str, qweight: QuantizedWeight, transposed: bool = True) -> str:
    """Wᵀ (or W itself for a Gather table) through an integer DequantizeLinear; its output name.
    ``ort_matmulnbits`` turns DequantizeLinear → MatMul into MatMulNBits, → Gather into
    GatherBlockQuantized."""
    tensors, dq = dequantize_linear_initializers(name, qweight, transposed)
    g.initializers.extend(tensors)
    g.nodes.append(dq)
    return dq.output[0]


def _linear(g: _Graph, x: str, name: str, modules: list[torch.nn.Linear], qweights: list) -> str:
    """One matmul for linears sharing the input x, their outputs concatenated (q/k/v), plus bias."""
    if all(q is not None for q in qweights):
        out = g.op("MatMul", [x, _dequantized(g, f"{name}.weight", concat_rows(qweights))])
    else:  # float weights (an unquantized model, or roles left in float)
        out = _float_matmul(g, x, name, torch.cat([m.weight for m in modules]))
    if any(m.bias is not None for m in modules):
        bias = torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features) for m in modules])
        out = g.op("Add", [out, g.constant(f"{name}.bias", bias.detach().float().numpy())])
    return out


def _gamma(g: _Graph, name: str, norm: torch.nn.Module, offset: float) -> tuple[str, float]:
    """The RMSNorm's scale (offset + w) as an initializer, and its epsilon."""
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    return g.constant(name, (offset + norm.weight.detach().float()).numpy()), eps


def _rms_norm(g: _Graph, x: str, gamma: str, eps: float) -> str:
    """x / sqrt(mean(x²) + eps) · gamma from standard ops (once, on the embedding output)."""
    mean_sq = g.op("ReduceMean", [g.op("Mul", [x, x]), g.constant(f"{gamma}.axes", np.array([-1]))])
    std = g.op("Sqrt", [g.op("Add", [mean_sq, g.constant(f"{gamma}.eps", np.array(eps, np.float32))])])
    return g.op("Mul", [g.op("Div", [x, std]), gamma])


def _skip_norm(g: _Graph, x: str, residual: str, gamma: str, eps: float) -> tuple[str, str]:
    """(RMSNorm(x + residual) · gamma, x + residual)."""
    normed, total = g.op(
        "SkipSimplifiedLayerNormalization",
        [x, residual, gamma],
        [f"{gamma}/normed", "", "", f"{gamma}/residual"],
        domain=MS_DOMAIN,
        epsilon=eps,
    )[0::3]
    return normed, total


def _embedding(g: _Graph, model, adapter: Adapter, tables: dict[str, QuantizedWeight]) -> tuple[str, str]:
    """(hidden states [b, s, d] of input_ids, the float table's initializer name or "" when int4)."""
    table = tables.get(adapter.embed_path)
    if table is not None:
        dequantized = _dequantized(g, f"{adapter.embed_path}.weight", table, transposed=False)
        return g.op("Gather", [dequantized, "input_ids"]), ""
    name = g.constant(
        f"{adapter.embed_path}.weight", adapter.embedding(model).weight.detach().float().numpy()
    )
    return g.op("Gather", [name, "input_ids"]), name


def _lm_head(g: _Graph, x: str, model, adapter: Adapter, weights, embed_table: str) -> None:
    """logits [b, s, vocab]: MatMulNBits, or Gemm with transB on the float [vocab, d] table
    (shared with the embedding when they are tied, so it is stored once)."""
    head = adapter.lm_head(model)
    qweight = weights.get(adapter.lm_head_path)
    if qweight is not None:
        g.op("MatMul", [x, _dequantized(g, f"{adapter.lm_head_path}.weight", qweight)], ["logits"])
        return
    tied = embed_table and head.weight.data_ptr() == adapter.embedding(model).weight.data_ptr()
    table = (
        embed_table
        if tied
        else g.constant(f"{adapter.lm_head_path}.weight", head.weight.detach().float().numpy())
    )
    rows = g.op("Reshape", [x, g.constant("lm_head.rows_shape", np.array([-1, head.in_features]))])
    flat = g.op("Gemm", [rows, table], transB=1)
    vocab = g.constant("lm_head.vocab", np.array([head.out_features]))
    shape = g.op("Concat", [g.op("Shape", ["input_ids"]), vocab], axis=0)
    g.op("Reshape", [flat, shape], ["logits"])


def build_fused_decoder(
    model, adapter: Adapter, weights: dict[str, QuantizedWeight], tables: dict[str, QuantizedWeight],
    opset: int = DEFAULT_OPSET,
) -> onnx.ModelProto:  # fmt: skip
    """The fused decoder-with-past graph of ``model`` (integer weights as DequantizeLinear → MatMul).

    weights: QuantizedWeight by module name (adapter.linear_name; lm_head by its path), the
    model's float weight for any linear not in it; tables: the int4 embedding, if any.
    """
    config = model.config
    shape = adapter.attention_shape(config)
    hd, kv_heads = shape.head_dim, shape.num_kv_heads
    g = _Graph()

    # GroupQueryAttention's view of the mask: valid lengths minus one, and the total length
    mask_sum = g.op("ReduceSum", ["attention_mask", g.constant("mask.axes", np.array([1]))], keepdims=0)
    seqlens_k = g.op(
        "Cast", [g.op("Sub", [mask_sum, g.constant("mask.one", np.array(1))])], to=TensorProto.INT32
    )
    total = g.op("Gather", [g.op("Shape", ["attention_mask"]), g.constant("mask.axis1", np.array(1))], axis=0)
    total = g.op("Cast", [total], to=TensorProto.INT32)
    cos, sin = rope_cache(model, adapter, config.max_position_embeddings)
    cos_cache, sin_cache = g.constant("cos_cache", cos), g.constant("sin_cache", sin)

    hidden, embed_table = _embedding(g, model, adapter, tables)
    residual, pending = hidden, None  # pending: the last branch output not yet added to residual
    for i, block in enumerate(adapter.blocks(model)):
        prefix = f"{adapter.blocks_path}.{i}"
        linears = adapter.linears(block)
        qw = {role: weights.get(adapter.linear_name(i, role)) for role in linears}
        norms = adapter.norms(block)
        gamma, eps = _gamma(
            g, f"{prefix}.{adapter.attn_norm}.weight", norms[adapter.attn_norm], adapter.norm_offset
        )
        if pending is None:
            x = _rms_norm(g, hidden, gamma, eps)
        else:
            x, residual = _skip_norm(g, pending, residual, gamma, eps)

        qkv_roles = ("q", "k", "v")
        qkv = _linear(g, x, f"{prefix}.qkv", [linears[r] for r in qkv_roles], [qw[r] for r in qkv_roles])
        attention = adapter.attention(block)
        attn, _, _ = g.op(
            "GroupQueryAttention",
            [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total,
             cos_cache, sin_cache],
            [f"{prefix}/attention", f"present.{i}.key", f"present.{i}.value"],
            domain=MS_DOMAIN,
            num_heads=shape.num_heads, kv_num_heads=kv_heads, scale=float(attention.scaling),
            do_rotary=1, rotary_interleaved=0,
        )  # fmt: skip
        attn_out = _linear(g, attn, f"{prefix}.o", [linears["o"]], [qw["o"]])

        gamma, eps = _gamma(
            g, f"{prefix}.{adapter.mlp_norm}.weight", norms[adapter.mlp_norm], adapter.norm_offset
        )
        x, residual = _skip_norm(g, attn_out, residual, gamma, eps)
        gate = _linear(g, x, f"{prefix}.gate", [linears["gate"]], [qw["gate"]])
        up = _linear(g, x, f"{prefix}.up", [linears["up"]], [qw["up"]])
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        pending = _linear(g, act, f"{prefix}.down", [linears["down"]], [qw["down"]])

    final = adapter.final_norm(model)
    gamma, eps = _gamma(g, f"{adapter.final_norm_path}.weight", final, adapter.norm_offset)
    x, _ = _skip_norm(g, pending, residual, gamma, eps)
    _lm_head(g, x, model, adapter, weights, embed_table)

    batch, past, total_len = "batch_size", "past_sequence_length", "total_sequence_length"
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [batch, "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [batch, total_len]),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, "sequence_length", "vocab"])
    ]
    for i in range(len(adapter.blocks(model))):
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(
                f"past_key_values.{i}.{kv}", TensorProto.FLOAT, [batch, kv_heads, past, hd]))  # fmt: skip
            outputs.append(helper.make_tensor_value_info(
                f"present.{i}.{kv}", TensorProto.FLOAT, [batch, kv_heads, total_len, hd]))  # fmt: skip
    graph = helper.make_graph(g.nodes, "edgeq_fused_decoder", inputs, outputs, g.initializers)
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, producer_name="edgeq")


def export_fused(
    model, adapter: Adapter, weights: dict[str, QuantizedWeight], tables: dict[str, QuantizedWeight],
    out_dir, opset: int = DEFAULT_OPSET, accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
) -> OnnxExportInfo:  # fmt: skip
    """Write the fused graph, with MatMulNBits weights, and the model's config files to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    graph_model = build_fused_decoder(model, adapter, weights, tables, opset)
    replaced = convert_to_matmulnbits(graph_model, accuracy_level)
    model.config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    return write_model(graph_model, out_dir, replaced)

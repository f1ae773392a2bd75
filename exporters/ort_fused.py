"""ONNX Runtime's fused decoder graph: the ``ort`` format's fast path.

optimum's export traces a model op by op: attention as MatMul/Softmax with mask arithmetic, RMSNorm
as Pow/ReduceMean/Sqrt/Div, RoPE as slices and concats, the KV cache as Concat. At batch 1 decode
those small kernels cost more than the int4 matmuls themselves. This module writes the decoder
directly from the adapter with ORT's contrib operators, as ORT's own model builder lays it out:

    embedding   Gather (GatherBlockQuantized when the table is int4) [· embed_scale]
    per block   SkipSimplifiedLayerNormalization   residual add + RMSNorm in one kernel
                MatMulNBits [W_Q; W_K; W_V]        one int4 matmul for the three
                [Split → RMSNorm of q, k per head] q_norm / k_norm before RoPE
                GroupQueryAttention                RoPE (cos/sin from inv_freq), KV cache, causal softmax
                                                   (local_window_size on sliding-window layers)
                MatMulNBits o_proj [→ RMSNorm] → SkipSimplifiedLayerNormalization
                MatMulNBits gate, up → act(gate)·up → MatMulNBits down [→ RMSNorm]
    final       SkipSimplifiedLayerNormalization → lm_head (MatMulNBits, or Gemm on a float table)

[...]: Gemma3 only. Its embedding is scaled at the Gather output (the table stays the one a tied
lm_head reads); its post-attention and post-feedforward norms (``adapter.branch_norms``) norm the
branch before the next Skip norm adds it. A standalone RMSNorm is written from standard ops (Pow,
ReduceMean, Add, Sqrt, Div, Mul): ORT fuses that pattern into SimplifiedLayerNormalization when it
loads the graph, while the ONNX checker knows no SimplifiedLayerNormalization in the default domain.
act: x·Sigmoid(x) (silu) or FastGelu (gelu_pytorch_tanh, the same tanh approximation); see
``MLP_ACTIVATIONS``.

Sliding windows: GroupQueryAttention's local_window_size = the layer's sliding_window
(``Adapter.sliding_window``). In ORT 1.32 a query then sees itself and local_window_size - 1 earlier
keys, in prefill, in decode and in a chunk on top of the cache: transformers' mask
(kv_idx > q_idx - sliding_window), no offset. Full-attention layers leave it at -1. RoPE: one cos/sin
pair per rotary module the layers use (Gemma3: a local base on sliding layers, the global one on
full layers; ``Adapter.layer_rotary_path``), computed in the graph for the call's length from the
module's frequencies (``_rope_caches``).

Integer weights may be int4 or int8 (the presets' lm_head); MatMulNBits takes both.

Inputs and outputs are optimum's (input_ids, attention_mask, past_key_values.N.key/value →
logits, present.N.key/value) without position_ids: GroupQueryAttention derives positions from the
attention mask (right padding only). Weights are written as DequantizeLinear → MatMul and then
converted by ``ort_matmulnbits``, so both formats share one packing.

What the fused operators cannot express (online Hadamards, quantized activations or KV cache,
other MLP activations, softcapping, bidirectional attention, architectures the adapter marks) is
reported by ``fused_graph_blockers``; the ort format then converts optimum's graph instead.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from edgeq.activations import QuantInputLinear
from edgeq.models.adapters import Adapter
from edgeq.quant.grid import QuantizedWeight, concat_rows
from exporters.onnx_qdq import DEFAULT_OPSET, OnnxExportInfo, dequantize_linear_initializers, write_model
from exporters.ort_matmulnbits import DEFAULT_ACCURACY_LEVEL, MS_DOMAIN, convert_to_matmulnbits


def fused_graph_blockers(model, adapter: Adapter) -> list[str]:
    """Why ``model`` cannot be written as the fused graph (empty: it can)."""
    config = model.config
    reasons = [adapter.fused_graph_unsupported] if adapter.fused_graph_unsupported else []
    activation = getattr(config, adapter.activation_key, None)
    if activation not in MLP_ACTIVATIONS:
        reasons.append(f"MLP activation {activation} (supported: {', '.join(MLP_ACTIVATIONS)})")
    if adapter.attention_shape(config).head_dim % 8:
        reasons.append("a head size that is not a multiple of 8 (GroupQueryAttention needs one)")
    if len(adapter.branch_norms) not in (0, 2):  # the graph norms the attention and the MLP branch
        reasons.append(
            f"branch norms {adapter.branch_norms} (expected one after attention, one after the MLP)"
        )
    if getattr(config, "attn_logit_softcapping", None):
        # GroupQueryAttention has a softcap attribute, but transformers 4.57's Gemma3 attention does
        # not pass the field to its attention function: capping would change what the model computes
        reasons.append(
            "attention logit softcapping (attn_logit_softcapping is set; transformers' Gemma3 attention "
            "ignores it, GroupQueryAttention's softcap would apply it)"
        )
    if getattr(config, "final_logit_softcapping", None):
        reasons.append(
            "final logit softcapping (tanh(logits / c) · c is not written; Gemma3 leaves it unset)"
        )
    if getattr(config, "use_bidirectional_attention", False):
        reasons.append("bidirectional attention (GroupQueryAttention is causal)")
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


def rope_cache(rotary: torch.nn.Module, length: int) -> tuple[np.ndarray, np.ndarray]:
    """GroupQueryAttention's (cos_cache, sin_cache) [length, rotary_dim / 2] float32, from the
    model's own rotary module (so any static RoPE scaling, llama3's included, and its attention
    factor carry over)."""
    positions = torch.arange(length)[None]
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    half = cos.shape[-1] // 2  # HF repeats the frequencies: cos = [c, c]
    return cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy()


def rope_frequencies(
    rotary: torch.nn.Module, cos: np.ndarray, sin: np.ndarray
) -> tuple[np.ndarray, float] | None:
    """(inv_freq [rotary_dim / 2], attention_scaling) when the rotary module's table (cos, sin)
    [length, rotary_dim / 2] (``rope_cache``) is cos(p · inv_freq) · attention_scaling and sin(...)
    likewise at every position p (the default, linear, llama3 and yarn RoPE of transformers); None
    otherwise."""
    inv_freq = getattr(rotary, "inv_freq", None)
    if inv_freq is None:
        return None
    inv_freq = inv_freq.detach().float().numpy()
    scale = float(getattr(rotary, "attention_scaling", 1.0))
    freqs = np.arange(len(cos), dtype=np.float32)[:, None] * inv_freq[None, :]  # float32, as torch's
    same = np.allclose(np.cos(freqs) * scale, cos, atol=1e-5) and np.allclose(
        np.sin(freqs) * scale, sin, atol=1e-5
    )
    return (inv_freq, scale) if same else None


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


# The MLP gate activations the fused graph writes (transformers' ACT2FN names): x → act(x).
# FastGelu is ORT's kernel for the tanh approximation, the formula of gelu_pytorch_tanh.
MLP_ACTIVATIONS: dict[str, Callable[[_Graph, str], str]] = {
    "silu": lambda g, x: g.op("Mul", [x, g.op("Sigmoid", [x])]),
    "gelu_pytorch_tanh": lambda g, x: g.op("FastGelu", [x], domain=MS_DOMAIN),
}


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
    """x / sqrt(mean(x²) + eps) · gamma over the last axis, from standard ops: ORT fuses exactly this
    Pow → ReduceMean → Add → Sqrt → Div → Mul into SimplifiedLayerNormalization (with Mul(x, x) for
    the square it does not)."""
    square = g.op("Pow", [x, g.constant(f"{gamma}.two", np.array(2.0, np.float32))])
    mean_sq = g.op("ReduceMean", [square, g.constant(f"{gamma}.axes", np.array([-1]))])
    std = g.op("Sqrt", [g.op("Add", [mean_sq, g.constant(f"{gamma}.eps", np.array(eps, np.float32))])])
    return g.op("Mul", [g.op("Div", [x, std]), gamma])


def _head_norm(g: _Graph, x: str, gamma: str, eps: float, head_dim: int) -> str:
    """RMSNorm of each head of x [b, s, heads · head_dim] (Gemma3's q_norm / k_norm)."""
    heads = g.op("Reshape", [x, g.constant(f"{gamma}.heads_shape", np.array([0, 0, -1, head_dim]))])
    flat = g.constant(f"{gamma}.flat_shape", np.array([0, 0, -1]))
    return g.op("Reshape", [_rms_norm(g, heads, gamma, eps), flat])


def _rope_caches(g: _Graph, name: str, rotary: torch.nn.Module, length: int, total: str) -> tuple[str, str]:
    """GroupQueryAttention's (cos_cache, sin_cache) inputs [T, rotary_dim / 2] of one rotary module.

    Where the module's RoPE is cos(p · inv_freq) (``rope_frequencies``), the graph computes them for
    the positions 0 .. T - 1 of this call (``total`` = T, int64) from the frequencies alone: a
    [max_position_embeddings, rotary_dim / 2] table would cost 2 × 16 MB per RoPE base at a 32k
    context (Gemma3 has two) for what a few thousand Cos and Sin per step compute (ORT's Cos and Sin
    are within 1e-7 of float64 over the arguments of a 131072-token context). Otherwise the module's
    own table is stored."""
    cos, sin = rope_cache(rotary, length)
    found = rope_frequencies(rotary, cos, sin)
    if found is None:
        return g.constant(f"{name}.cos_cache", cos), g.constant(f"{name}.sin_cache", sin)
    inv_freq, scale = found
    limit = g.op("Cast", [total], to=TensorProto.FLOAT)
    zero, one = (
        g.constant(f"{name}.start", np.array(0.0, np.float32)),
        g.constant(f"{name}.delta", np.array(1.0, np.float32)),
    )
    positions = g.op(
        "Unsqueeze", [g.op("Range", [zero, limit, one]), g.constant(f"{name}.axis", np.array([1]))]
    )
    freqs = g.op("Mul", [positions, g.constant(f"{name}.inv_freq", inv_freq[None, :])])  # [T, rotary_dim / 2]
    caches = [g.op("Cos", [freqs]), g.op("Sin", [freqs])]
    if scale != 1.0:
        factor = g.constant(f"{name}.attention_scaling", np.array(scale, np.float32))
        caches = [g.op("Mul", [c, factor]) for c in caches]
    return caches[0], caches[1]


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
    embedding = adapter.embedding(model)
    table = tables.get(adapter.embed_path)
    if table is not None:
        dequantized = _dequantized(g, f"{adapter.embed_path}.weight", table, transposed=False)
        hidden, name = g.op("Gather", [dequantized, "input_ids"]), ""
    else:
        name = g.constant(f"{adapter.embed_path}.weight", embedding.weight.detach().float().numpy())
        hidden = g.op("Gather", [name, "input_ids"])
    # Gemma3's embedding multiplies its rows by sqrt(hidden) (a buffer, in the weight's dtype as its
    # forward casts it); scaling the Gather output keeps the table the one a tied lm_head reads
    scale = getattr(embedding, "embed_scale", None)
    if scale is not None:
        value = np.array(scale.to(embedding.weight.dtype).float().item(), np.float32)
        hidden = g.op("Mul", [hidden, g.constant(f"{adapter.embed_path}.embed_scale", value)])
    return hidden, name


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
    total_int64 = g.op("Gather", [g.op("Shape", ["attention_mask"]), g.constant("mask.axis1", np.array(1))])
    total = g.op("Cast", [total_int64], to=TensorProto.INT32)
    rope_caches: dict[str, tuple[str, str]] = {}  # by rotary module path, shared by its layers
    activation = MLP_ACTIVATIONS[getattr(config, adapter.activation_key)]
    attn_branch_norm, mlp_branch_norm = adapter.branch_norms or (None, None)

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
        qk_norms = adapter.qk_norm_modules(block)
        if qk_norms is None:  # GroupQueryAttention takes the packed q/k/v as its query
            qkv_inputs = [qkv, "", ""]
        else:  # q, k normed per head before the RoPE GroupQueryAttention applies: separate inputs
            sizes = g.constant(
                f"{prefix}.qkv.split", np.array([shape.num_heads * hd, kv_heads * hd, kv_heads * hd])
            )
            q, k, v = g.op("Split", [qkv, sizes], 3, axis=-1)
            (q_path, k_path), (q_norm, k_norm) = adapter.qk_norms, qk_norms
            q = _head_norm(g, q, *_gamma(g, f"{prefix}.{q_path}.weight", q_norm, adapter.norm_offset), hd)
            k = _head_norm(g, k, *_gamma(g, f"{prefix}.{k_path}.weight", k_norm, adapter.norm_offset), hd)
            qkv_inputs = [q, k, v]
        rotary_path = adapter.layer_rotary_path(config, i)
        if rotary_path not in rope_caches:
            rotary = model.get_submodule(rotary_path)
            length = config.max_position_embeddings
            rope_caches[rotary_path] = _rope_caches(g, rotary_path, rotary, length, total_int64)
        window = adapter.sliding_window(config, i)
        # ORT's local_window_size counts the query itself, as transformers' sliding_window does
        local = {"local_window_size": window} if window else {}
        attn, _, _ = g.op(
            "GroupQueryAttention",
            [*qkv_inputs, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total,
             *rope_caches[rotary_path]],
            [f"{prefix}/attention", f"present.{i}.key", f"present.{i}.value"],
            domain=MS_DOMAIN,
            num_heads=shape.num_heads, kv_num_heads=kv_heads, scale=float(attention.scaling),
            do_rotary=1, rotary_interleaved=0, **local,
        )  # fmt: skip
        attn_out = _linear(g, attn, f"{prefix}.o", [linears["o"]], [qw["o"]])
        if attn_branch_norm:  # Gemma3: the branch is normed before the Skip norm adds it
            gamma, eps = _gamma(
                g, f"{prefix}.{attn_branch_norm}.weight", norms[attn_branch_norm], adapter.norm_offset
            )
            attn_out = _rms_norm(g, attn_out, gamma, eps)

        gamma, eps = _gamma(
            g, f"{prefix}.{adapter.mlp_norm}.weight", norms[adapter.mlp_norm], adapter.norm_offset
        )
        x, residual = _skip_norm(g, attn_out, residual, gamma, eps)
        gate = _linear(g, x, f"{prefix}.gate", [linears["gate"]], [qw["gate"]])
        up = _linear(g, x, f"{prefix}.up", [linears["up"]], [qw["up"]])
        act = g.op("Mul", [activation(g, gate), up])
        pending = _linear(g, act, f"{prefix}.down", [linears["down"]], [qw["down"]])
        if mlp_branch_norm:
            gamma, eps = _gamma(
                g, f"{prefix}.{mlp_branch_norm}.weight", norms[mlp_branch_norm], adapter.norm_offset
            )
            pending = _rms_norm(g, pending, gamma, eps)

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

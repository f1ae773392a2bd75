"""ONNX Runtime's fused decoder graph: the ``ort`` format's fast path.

optimum's export traces a model op by op: attention as MatMul/Softmax with mask arithmetic, RMSNorm
as Pow/ReduceMean/Sqrt/Div, RoPE as slices and concats, the KV cache as Concat. At batch 1 decode
those small kernels cost more than the int4 matmuls themselves. This module writes the decoder
directly from the adapter with ORT's contrib operators, as ORT's own model builder lays it out:

    embedding   Gather (GatherBlockQuantized when the table is int4) [· embed_scale]
    per block   SkipSimplifiedLayerNormalization   residual add + RMSNorm in one kernel
                {A}  MatMulNBits [W_Q; W_K; W_V]   one int4 matmul for the three
                [Split → RMSNorm of q, k per head] q_norm / k_norm before RoPE
                GroupQueryAttention                RoPE (cos/sin from inv_freq), KV cache, causal softmax
                                                   (local_window_size on sliding-window layers)
                {R5} {A} MatMulNBits o_proj [→ RMSNorm] → SkipSimplifiedLayerNormalization
                {A} MatMulNBits gate, up → act(gate)·up → {R4} {A} MatMulNBits down [→ RMSNorm]
    final       SkipSimplifiedLayerNormalization → lm_head (MatMulNBits, or Gemm on a float table)

{A}: per-token fake quantization of the linear's input where its QuantInputLinear quantizes it
(W4A4), once per input: q/k/v share one, gate/up one, o_proj and down_proj have their own. Symmetric:
Abs → ReduceMax → Mul(clip / qmax) = scale → QuantizeLinear(int4 | int8) → DequantizeLinear, one
block over the last axis (asymmetric: the range and scale from ReduceMax / ReduceMin, the zero
point by one more QuantizeLinear, 11 ops; ``_fake_quant_per_token``). In float32; a float16 graph
casts there and back.
{R4}: the online Hadamard on down_proj's input: Reshape into a [.., k_1, k_2] view, one MatMul per
regrouped Kronecker factor, Reshape back (SmolLM2's 1536 = 48 · 32: 4 ops; ``_kronecker_rotation``,
``graph_factors``). Per block, 24 ops beside the 11 of W4A16 (symmetric A4: 4 × 5 + 4; the presets'
asymmetric A4: 4 × 11 + 4 = 48).
{R5}: the same on o_proj's input (``RotationConfig.r5``, on in the W4A4 presets), where applied.
With shifts (``ActQuantConfig.shift``), each quantized input is Sub(shift) → {A}, 4 more, and the
linears reading it add W·shift to their bias (``_folded_bias``): an Add after the matmul, which ORT
fuses into MatMulNBits at load, so the matmul reads the grid's values rather than values off the
grid, which its level-4 int8 input quantization would round again.

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

What the fused operators cannot express (online rotations other than R4 and R5, a quantized or R3-rotated
KV cache, other MLP activations, softcapping, bidirectional attention, architectures the adapter
marks) is reported by ``fused_graph_blockers``; the ort format then converts optimum's graph instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from edgeq.activations import QuantInputLinear
from edgeq.models.adapters import Adapter
from edgeq.quant.grid import QuantizedWeight, concat_rows
from edgeq.rotation.hadamard import OnlineRotation, sylvester
from exporters.onnx_qdq import (
    DEFAULT_OPSET,
    EXTERNAL_DATA_FILE,
    MODEL_FILE,
    OnnxExportInfo,
    component_bytes,
    dequantize_linear_initializers,
    onnx_bytes,
)
from exporters.ort_matmulnbits import DEFAULT_ACCURACY_LEVEL, MS_DOMAIN, convert_to_matmulnbits

ONLINE_OPS = "online rotations other than R4 on down_proj's input and R5 on o_proj's"
KV_OPS = "quantized or rotated KV cache"
# The roles whose online rotation the graph writes (R4 on down_proj's input, R5 on o_proj's: factored
# Hadamards, each in front of its own linear's grid)
ROTATED_INPUT_ROLES = ("o", "down")


def unwritten_rotations(adapter: Adapter, block) -> list[str]:
    """The roles of ``block`` whose input has an online rotation the fused graph does not write:
    any role but o_proj's and down_proj's, or a rotation that is not a factored ``OnlineRotation``."""
    roles = []
    for role in adapter.linears(block):
        wrapper = adapter.wrapped_input(block, role)
        rotation = wrapper.rotation if wrapper is not None else None
        if rotation is not None and (
            role not in ROTATED_INPUT_ROLES or not isinstance(rotation, OnlineRotation)
        ):
            roles.append(role)
    return roles


def fused_graph_blockers(model, adapter: Adapter) -> list[str]:
    """Why ``model`` (held in memory, as quantized) cannot be written as the fused graph (empty: it
    can). Per-token quantized activations, R4 and R5 are written (``FusedDecoderWriter``); any other
    online rotation and a quantized or rotated (R3) KV cache are not."""
    reasons = architecture_blockers(model.config, adapter)
    blocks = adapter.blocks(model)
    if any(unwritten_rotations(adapter, block) for block in blocks):
        reasons.append(ONLINE_OPS)
    if any(hasattr(adapter.attention(block), "edgeq_kv") for block in blocks):
        reasons.append(KV_OPS)
    return reasons


def scheme_blockers(quant, query_key_rotation: bool) -> list[str]:
    """What a quantization config (``edgeq.config.QuantConfig``) adds to the graph that the fused
    operators cannot express, known before any block is quantized; query_key_rotation: whether R3
    will be applied (R4, R5 and quantized activations are written)."""
    return [KV_OPS] if quant.activations.kv_bits < 16 or query_key_rotation else []


def architecture_blockers(config, adapter: Adapter) -> list[str]:
    """Why the architecture of ``config`` cannot be written as the fused graph (empty: it can)."""
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


# The float types the graph may be written in (``--dtype``).
GRAPH_DTYPES = {"float32": np.float32, "float16": np.float16}


class _Graph:
    """Nodes and initializers of the graph being written, with unique names: those of the part in
    progress (``nodes``, ``initializers``) and those already flushed (``done_*``).

    float_type: float32 constants are stored in this type unless ``exact``. sink: where large
    constants go as soon as they are made (``ExternalData``), so a float table is written from its
    array without a copy in a TensorProto; None keeps them in the graph."""

    def __init__(self, float_type=np.float32, sink: ExternalData | None = None):
        self.float_type = float_type
        self.sink = sink
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.done_nodes: list[onnx.NodeProto] = []
        self.done_initializers: list[onnx.TensorProto] = []
        self._count = 0

    def constant(self, name: str, array: np.ndarray, exact: bool = False) -> str:
        array = np.asarray(array)
        if array.dtype == np.float32 and not exact:
            array = array.astype(self.float_type)
        if self.sink is not None and array.nbytes >= self.sink.MIN_BYTES:
            self.done_initializers.append(self.sink.write_array(name, array))
        else:
            self.initializers.append(numpy_helper.from_array(array, name))
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


@dataclass(frozen=True)
class InputGrid:
    """The per-token grid a linear's input is fake-quantized on (``fake_quant_per_token``)."""

    bits: int
    symmetric: bool
    clip_ratio: float
    shift: tuple[float, ...] | None = None  # QuantInputLinear.shift, taken out before the grid


def input_grid(wrapper: QuantInputLinear | None) -> InputGrid | None:
    """The grid of a wrapped linear's input; None where its input stays float."""
    if wrapper is None or not wrapper.quantize_input:
        return None
    shift = None if wrapper.shift is None else tuple(wrapper.shift.detach().float().cpu().tolist())
    return InputGrid(wrapper.bits, wrapper.symmetric, float(wrapper.clip_ratio), shift)


def shared_input_grid(wrappers: dict[str, QuantInputLinear | None]) -> InputGrid | None:
    """The one grid of linears that read one input (q/k/v, gate/up), so that the graph quantizes it
    once; a ValueError where their settings differ or one of them rotates its input (not written:
    ``fused_graph_blockers`` reports it)."""
    rotated = [role for role, w in wrappers.items() if w is not None and w.rotation is not None]
    if rotated:
        raise ValueError(f"the fused graph writes no online rotation of the shared input of {rotated}")
    grids = {role: input_grid(w) for role, w in wrappers.items()}
    if len(set(grids.values())) > 1:
        raise ValueError(
            "linears reading one input must quantize it on one grid, so that the graph quantizes it "
            f"once; got {grids}"
        )
    return next(iter(grids.values()))


# What one more factor product costs at decode beyond its multiply-adds, in multiply-add equivalents:
# a Reshape and a MatMul launch, measured on ORT 1.32's CPU provider at SmolLM2's width (1536 as
# 48 · 32: 5 µs a rotation; 12 · 128: 6 µs; 12 · 16 · 8: 11 µs; 12 · 64 · 2, the factors as
# hadamard_transform splits them: 28 µs). Also at prefill 48 · 32 is the cheapest (0.35 ms per
# 128 tokens against 0.6 ms for 12 · 128).
FACTOR_OVERHEAD_MACS = 300_000


def _atoms(factors: list[np.ndarray]) -> list[np.ndarray]:
    """The factors with each Sylvester matrix of order 2^a split into a copies of H_2 (Sylvester's
    H_2n is H_2 ⊗ H_n, so they can be regrouped freely); any other factor kept whole."""
    atoms = []
    for f in factors:
        k = f.shape[0]
        if k > 2 and k & (k - 1) == 0 and np.array_equal(f, sylvester(k).double().numpy()):
            atoms += [sylvester(2).double().numpy()] * (k.bit_length() - 1)
        else:
            atoms.append(np.asarray(f, np.float64))
    return atoms


def _grouping(sizes: list[int], width: int, overhead: int) -> list[int]:
    """How many consecutive atoms (orders ``sizes``) each product takes, for the least cost:
    width · (order of the group) multiply-adds per token and group, plus ``overhead`` per group. A
    group never spans all atoms (that would be the dense width × width matrix) unless there is one."""
    best: list[tuple[float, list[int]]] = [(0.0, [])]  # best[i]: the first i atoms
    for end in range(1, len(sizes) + 1):
        options = []
        for start in range(end):
            order = int(np.prod(sizes[start:end]))
            if order >= width and len(sizes) > 1:
                continue
            cost, groups = best[start]
            options.append((cost + width * order + overhead, [*groups, end - start]))
        best.append(min(options, key=lambda o: o[0]))
    return best[-1][1]


def graph_factors(
    factors: list[np.ndarray], scale: float, width: int, overhead: int = FACTOR_OVERHEAD_MACS
) -> list[np.ndarray]:
    """The matrices the graph multiplies by for x ↦ x · (F_1 ⊗ … ⊗ F_j)ᵀ · scale of width ``width``:
    the Kronecker factors regrouped (Sylvester factors split into H_2s, consecutive ones multiplied
    together, ``_grouping``) so that the per-token multiply-adds and the op pairs cost least, never
    the dense width × width matrix; the scale folded into the first, which saves a Mul (its entries
    ±scale are each one rounding from torch's product-then-scale)."""
    atoms = _atoms(factors)
    merged, start = [], 0
    for count in _grouping([a.shape[0] for a in atoms], width, overhead):
        group = atoms[start]
        for atom in atoms[start + 1 : start + count]:
            group = np.kron(group, atom)
        merged.append(group)
        start += count
    merged[0] = merged[0] * scale
    return [m.astype(np.float32) for m in merged]


def _kronecker_rotation(
    g: _Graph, x: str, name: str, rotation: OnlineRotation, width: int, exact: bool
) -> str:
    """x [b, s, n] → x · (F_1 ⊗ … ⊗ F_j)ᵀ · scale, what ``kronecker_apply`` computes, without
    transposes: with x viewed row-major as [.., k_1, …, k_j], factor i acts on axis i alone. The last
    factor is a right product on the view [.., n / k_j, k_j]; every earlier factor F_i a left
    product (broadcast over the leading axes) on the view [.., n / (k_i · r), k_i, r], r the
    product of the later factors' orders. exact: constants stay float32 (a float16 graph that
    rotates in float32 before the quantizer)."""
    buffers = [getattr(rotation, f"factor{i}").detach().double().numpy() for i in range(rotation.num_factors)]
    factors = graph_factors(buffers, rotation.scale, width)
    *earlier, last = factors
    if not earlier:  # one factor (the dense random-orthogonal fallback): a plain product
        return g.op("MatMul", [x, g.constant(f"{name}.factor0_T", last.T.copy(), exact)])
    k = last.shape[0]
    y = g.op("Reshape", [x, g.constant(f"{name}.view{len(earlier)}", np.array([0, 0, -1, k]))])
    y = g.op("MatMul", [y, g.constant(f"{name}.factor{len(earlier)}_T", last.T.copy(), exact)])
    rest = k
    for i in reversed(range(len(earlier))):
        k = earlier[i].shape[0]
        if len(earlier) > 1:  # with two factors the first view [.., k_1, k_2] is already this one
            view = [0, 0, k, rest] if i == 0 else [0, 0, -1, k, rest]
            y = g.op("Reshape", [y, g.constant(f"{name}.view{i}", np.array(view))])
        y = g.op("MatMul", [g.constant(f"{name}.factor{i}", earlier[i], exact), y])
        rest *= k
    return g.op("Reshape", [y, g.constant(f"{name}.flat", np.array([0, 0, width]))])


def _fake_quant_per_token(g: _Graph, x: str, name: str, grid: InputGrid, width: int) -> str:
    """What ``fake_quant_per_token`` computes on x [b, s, width] float32, as a dynamic
    QuantizeLinear → DequantizeLinear pair with one block over the last axis: the pair is the
    division, round half to even, clamp to the integer range and multiply of the PyTorch code in two
    kernels (int4 / uint4 saturate to the 4-bit range, int8 / uint8 to the 8-bit one).

    Symmetric: scale = max|x| · (clip / qmax), as torch computes it (5 ops). Asymmetric: hi =
    max(x, 0) · clip, −lo = min(x, 0) · (−clip) (an exact negation), scale = (hi + (−lo)) / qmax and
    zero point round(−lo / scale), each rounded as torch rounds it (11 ops: the zero point is a
    QuantizeLinear of −lo by the scale, one kernel for torch's division and round half to even, its
    saturation a no-op as −lo / scale lies in [0, qmax]).

    torch guards the division with Where(scale > 0, scale, 1); the graph needs no guard: scale is 0
    only on a row of zeros, where x / 0 saturates to some integer code (or the zero point is some
    integer) and DequantizeLinear multiplies by the same scale 0, so the row stays zeros as in torch
    (an integer code is always finite)."""
    axes = g.constant(f"{name}.axes", np.array([-1]))
    attrs = {"axis": -1, "block_size": width}
    if grid.symmetric:
        qmax = 2 ** (grid.bits - 1) - 1
        code = {4: TensorProto.INT4, 8: TensorProto.INT8}[grid.bits]
        amax = g.op("ReduceMax", [g.op("Abs", [x]), axes], keepdims=1)
        step = g.constant(f"{name}.clip_over_qmax", np.array(grid.clip_ratio / qmax, np.float32), exact=True)
        scale = g.op("Mul", [amax, step])
        zero_point = []
    else:
        qmax = 2**grid.bits - 1
        code = {4: TensorProto.UINT4, 8: TensorProto.UINT8}[grid.bits]
        zero = g.constant(f"{name}.zero", np.array(0.0, np.float32), exact=True)
        clip = g.constant(f"{name}.clip", np.array(grid.clip_ratio, np.float32), exact=True)
        neg_clip = g.constant(f"{name}.neg_clip", np.array(-grid.clip_ratio, np.float32), exact=True)
        hi = g.op("Mul", [g.op("Max", [g.op("ReduceMax", [x, axes], keepdims=1), zero]), clip])
        neg_lo = g.op("Mul", [g.op("Min", [g.op("ReduceMin", [x, axes], keepdims=1), zero]), neg_clip])
        levels = g.constant(f"{name}.qmax", np.array(float(qmax), np.float32), exact=True)
        scale = g.op("Div", [g.op("Add", [hi, neg_lo]), levels])
        # round(−lo / scale) in one kernel: −lo / scale lies in [0, qmax], so the saturation is a no-op
        zero_point = [g.op("QuantizeLinear", [neg_lo, scale], output_dtype=code, axis=-1, block_size=1)]
    q = g.op("QuantizeLinear", [x, scale, *zero_point], output_dtype=code, **attrs)
    return g.op("DequantizeLinear", [q, scale, *zero_point], **attrs)


def _linear_input(
    g: _Graph, x: str, name: str, rotation: OnlineRotation | None, grid: InputGrid | None, width: int
) -> str:
    """What a QuantInputLinear does to its input x [b, s, width] before the linear: the online
    rotation, then per-token fake quantization, both in float32 (a float16 graph casts there and
    back, as ``fake_quant_per_token`` computes in float32); x itself where neither applies.

    With a shift μ it returns Q(x − μ) without adding μ back: the linear adds W·μ to its bias
    instead (``_linear``), so that MatMulNBits reads the grid's values themselves. Added back in
    front of the matmul, μ's large entries (SmolLM2's shared direction) would set the scale of
    MatMulNBits' own int8 input quantization at accuracy level 4 and round the small ones away."""
    if rotation is None and grid is None:
        return x
    half = g.float_type != np.float32 and grid is not None
    if half:
        x = g.op("Cast", [x], to=TensorProto.FLOAT)
    if rotation is not None:
        x = _kronecker_rotation(g, x, f"{name}.rotation", rotation, width, exact=half)
    if grid is not None and grid.shift is not None:  # Q(x − shift); the linear adds W·shift back
        shift = g.constant(f"{name}.act.shift", np.array(grid.shift, np.float32), exact=True)
        x = _fake_quant_per_token(g, g.op("Sub", [x, shift]), f"{name}.act", grid, width)
    elif grid is not None:
        x = _fake_quant_per_token(g, x, f"{name}.act", grid, width)
    if half:
        x = g.op("Cast", [x], to=helper.np_dtype_to_tensor_dtype(np.dtype(g.float_type)))
    return x


def _float_matmul(g: _Graph, x: str, name: str, weight: torch.Tensor) -> str:
    """x @ Wᵀ with W [out, in] stored transposed."""
    wt = g.constant(f"{name}.weight_T", weight.detach().float().numpy().T.copy())
    return g.op("MatMul", [x, wt])


def _dequantized(g: _Graph, name: str, qweight: QuantizedWeight, transposed: bool = True) -> str:
    """Wᵀ (or W itself for a Gather table) through an integer DequantizeLinear; its output name.
    ``ort_matmulnbits`` turns DequantizeLinear → MatMul into MatMulNBits, → Gather into
    GatherBlockQuantized."""
    tensors, dq = dequantize_linear_initializers(name, qweight, transposed)
    if g.float_type != np.float32:  # the scales set DequantizeLinear's output type
        tensors = [
            numpy_helper.from_array(numpy_helper.to_array(t).astype(g.float_type), t.name)
            if t.data_type == TensorProto.FLOAT
            else t
            for t in tensors
        ]
    g.initializers.extend(tensors)
    g.nodes.append(dq)
    return dq.output[0]


def _folded_bias(
    modules: list[torch.nn.Linear], qweights: list, shift: tuple[float, ...] | None
) -> np.ndarray | None:
    """The bias [Σ out] of linears reading one input whose shift μ [in] the input quantizer took
    out: W(Q(x − μ) + μ) + b = W·Q(x − μ) + (W·μ + b), with W as the graph holds it (the
    dequantized integer weight, or the float one) and W·μ summed in float64. None where there is
    neither a bias nor a shift."""
    if shift is None and all(m.bias is None for m in modules):
        return None
    parts = []
    for module, qweight in zip(modules, qweights, strict=True):
        bias = np.zeros(module.out_features) if module.bias is None else module.bias.detach().double().numpy()
        if shift is not None:
            weight = module.weight if qweight is None else qweight.dequantize()
            bias = bias + weight.detach().double().numpy() @ np.asarray(shift, np.float64)
        parts.append(bias)
    return np.concatenate(parts).astype(np.float32)


def _linear(
    g: _Graph, x: str, name: str, modules: list[torch.nn.Linear], qweights: list,
    shift: tuple[float, ...] | None = None,
) -> str:  # fmt: skip
    """One matmul for linears sharing the input x, their outputs concatenated (q/k/v), plus bias
    (with W·shift folded in where x is Q(x − shift), ``_folded_bias``; ORT fuses the Add into
    MatMulNBits when it loads the graph). Linears on different grids (mixed precision) get one
    matmul each, their outputs concatenated."""
    if all(q is not None for q in qweights) and len({q.grid for q in qweights}) > 1:
        parts = [g.op("MatMul", [x, _dequantized(g, f"{name}.{i}.weight", q)])
                 for i, q in enumerate(qweights)]  # fmt: skip
        out = g.op("Concat", parts, axis=-1)
    elif all(q is not None for q in qweights):
        out = g.op("MatMul", [x, _dequantized(g, f"{name}.weight", concat_rows(qweights))])
    else:  # float weights (an unquantized model, or roles left in float)
        out = _float_matmul(g, x, name, torch.cat([m.weight for m in modules]))
    bias = _folded_bias(modules, qweights, shift)
    if bias is not None:
        out = g.op("Add", [out, g.constant(f"{name}.bias", bias)])
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
        g.constant(f"{name}.start", np.array(0.0, np.float32), exact=True),
        g.constant(f"{name}.delta", np.array(1.0, np.float32), exact=True),
    )
    positions = g.op(
        "Unsqueeze", [g.op("Range", [zero, limit, one]), g.constant(f"{name}.axis", np.array([1]))]
    )
    # angles in float32 whatever the graph's type: p · inv_freq reaches 1e5 at long contexts
    inv = g.constant(f"{name}.inv_freq", inv_freq[None, :], exact=True)
    freqs = g.op("Mul", [positions, inv])  # [T, rotary_dim / 2]
    caches = [g.op("Cos", [freqs]), g.op("Sin", [freqs])]
    if scale != 1.0:
        factor = g.constant(f"{name}.attention_scaling", np.array(scale, np.float32), exact=True)
        caches = [g.op("Mul", [c, factor]) for c in caches]
    if g.float_type != np.float32:
        to = helper.np_dtype_to_tensor_dtype(np.dtype(g.float_type))
        caches = [g.op("Cast", [c], to=to) for c in caches]
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
    # logits stay float32 in a float16 graph: what every consumer (and the perplexity) reads
    out = "logits" if g.float_type == np.float32 else "logits_native"
    if qweight is not None:
        g.op("MatMul", [x, _dequantized(g, f"{adapter.lm_head_path}.weight", qweight)], [out])
    else:
        _float_lm_head(g, x, head, model, adapter, embed_table, out)
    if out != "logits":
        g.op("Cast", [out], ["logits"], to=TensorProto.FLOAT)


def _float_lm_head(g: _Graph, x: str, head, model, adapter: Adapter, embed_table: str, out: str) -> None:
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
    g.op("Reshape", [flat, shape], [out])


def _copy(message, empty):
    empty.CopyFrom(message)
    return empty


class ExternalData:
    """The data file beside model.onnx that initializers stream into as they are written, so the
    graph in memory holds only references: any model over protobuf's 2 GiB needs this, and it keeps
    the writer's memory at one block whatever the depth. Offsets are page-aligned, so ONNX Runtime
    may memory-map them."""

    ALIGN = 4096
    MIN_BYTES = 1024  # smaller tensors (shapes, scalars) stay inside model.onnx

    def __init__(self, path: Path):
        self.path = path
        self.file = path.open("wb")
        self.offset = 0

    def _reference(self, tensor: onnx.TensorProto, length: int) -> None:
        del tensor.external_data[:]
        for key, value in (("location", self.path.name), ("offset", self.offset), ("length", length)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        tensor.data_location = TensorProto.EXTERNAL
        self.offset += length

    def _align(self) -> None:
        pad = -self.offset % self.ALIGN
        self.file.write(b"\0" * pad)
        self.offset += pad

    def write_array(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        """Write ``array``'s bytes (little-endian, C order) straight from its buffer; the
        initializer that refers to them."""
        array = np.ascontiguousarray(array)
        tensor = onnx.TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        self._align()
        self.file.write(memoryview(array).cast("B"))
        self._reference(tensor, array.nbytes)
        return tensor

    def move(self, tensor: onnx.TensorProto) -> None:
        """Write ``tensor``'s bytes to the file and leave a reference in their place."""
        if not tensor.HasField("raw_data"):
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
        if len(tensor.raw_data) < self.MIN_BYTES:
            return
        self._align()
        data = tensor.raw_data
        self.file.write(data)
        self._reference(tensor, len(data))
        tensor.ClearField("raw_data")

    def close(self) -> None:
        self.file.close()


class FusedDecoderWriter:
    """Writes the fused decoder graph block by block into ``out_dir``: ``begin`` (the embedding),
    ``add_block`` for each decoder block in order, ``finish`` (final norm, lm_head, model.onnx).

    Each block's integer weights become MatMulNBits and its initializers go to the external data
    file as soon as the block is added; only node descriptions stay in memory.

    dtype: the graph's float type ("float32" or "float16": weights, scales, activations and the KV
    cache; ``logits`` stay float32). RoPE angles are computed in float32 either way.
    """

    def __init__(
        self, model, adapter: Adapter, out_dir: Path, opset: int = DEFAULT_OPSET,
        accuracy_level: int = DEFAULT_ACCURACY_LEVEL, dtype: str = "float32",
    ):  # fmt: skip
        if dtype not in GRAPH_DTYPES:
            raise ValueError(f"graph dtype must be one of {', '.join(GRAPH_DTYPES)}, got {dtype}")
        out_dir.mkdir(parents=True, exist_ok=True)
        self.model, self.adapter, self.out_dir = model, adapter, out_dir
        self.opset, self.accuracy_level, self.dtype = opset, accuracy_level, dtype
        self.sink = ExternalData(out_dir / EXTERNAL_DATA_FILE)
        self.g = _Graph(GRAPH_DTYPES[dtype], self.sink)
        self.replaced = 0
        self._blocks_written = 0
        g = self.g
        # GroupQueryAttention's view of the mask: valid lengths minus one, and the total length
        mask_sum = g.op("ReduceSum", ["attention_mask", g.constant("mask.axes", np.array([1]))], keepdims=0)
        self.seqlens_k = g.op(
            "Cast", [g.op("Sub", [mask_sum, g.constant("mask.one", np.array(1))])], to=TensorProto.INT32
        )
        self.total_int64 = g.op(
            "Gather", [g.op("Shape", ["attention_mask"]), g.constant("mask.axis1", np.array(1))]
        )
        self.total = g.op("Cast", [self.total_int64], to=TensorProto.INT32)
        self.rope_caches: dict[str, tuple[str, str]] = {}  # by rotary module path, shared by its layers
        self.hidden = self.residual = self.pending = ""
        self.embed_table = ""

    def _flush(self) -> None:
        """Turn the integer matmuls written since the last flush into MatMulNBits and move their
        initializers to the external data file."""
        segment = helper.make_model(helper.make_graph(self.g.nodes, "segment", [], [], self.g.initializers))
        self.g.nodes, self.g.initializers = [], []
        self.replaced += convert_to_matmulnbits(segment, self.accuracy_level, self.g.float_type)
        for tensor in segment.graph.initializer:
            self.sink.move(tensor)
        # copies into messages of their own: protobuf frees a message's memory (the weights' bytes
        # included, cleared or not) only with the whole message it was built in
        self.g.done_nodes.extend(_copy(node, onnx.NodeProto()) for node in segment.graph.node)
        self.g.done_initializers.extend(_copy(t, onnx.TensorProto()) for t in segment.graph.initializer)

    def begin(self, tables: dict[str, QuantizedWeight]) -> None:
        """The embedding (its table final: rotated and quantized as the model will run)."""
        self.hidden, self.embed_table = _embedding(self.g, self.model, self.adapter, tables)
        self.residual = self.hidden
        self._flush()

    def add_block(self, index: int, block, qweights: dict[str, QuantizedWeight]) -> None:
        """Decoder block ``index`` (the next one), its integer weights by role (float where absent)."""
        if index != self._blocks_written:
            raise ValueError(f"blocks must be added in order: expected {self._blocks_written}, got {index}")
        g, adapter, config = self.g, self.adapter, self.model.config
        shape = adapter.attention_shape(config)
        hd, kv_heads = shape.head_dim, shape.num_kv_heads
        prefix = f"{adapter.blocks_path}.{index}"
        linears = adapter.linears(block)
        qw = {role: qweights.get(role) for role in linears}
        norms = adapter.norms(block)
        attn_branch_norm, mlp_branch_norm = adapter.branch_norms or (None, None)
        gamma, eps = _gamma(
            g, f"{prefix}.{adapter.attn_norm}.weight", norms[adapter.attn_norm], adapter.norm_offset
        )
        if not self.pending:
            x = _rms_norm(g, self.hidden, gamma, eps)
        else:
            x, self.residual = _skip_norm(g, self.pending, self.residual, gamma, eps)

        wrappers = {role: adapter.wrapped_input(block, role) for role in linears}
        qkv_roles = ("q", "k", "v")
        x, shift = self._shared_input(x, f"{prefix}.qkv", {r: wrappers[r] for r in qkv_roles}, linears["q"])
        qkv = _linear(
            g, x, f"{prefix}.qkv", [linears[r] for r in qkv_roles], [qw[r] for r in qkv_roles], shift
        )
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
        rotary_path = adapter.layer_rotary_path(config, index)
        if rotary_path not in self.rope_caches:
            rotary = self.model.get_submodule(rotary_path)
            length = config.max_position_embeddings
            self.rope_caches[rotary_path] = _rope_caches(g, rotary_path, rotary, length, self.total_int64)
        window = adapter.sliding_window(config, index)
        # ORT's local_window_size counts the query itself, as transformers' sliding_window does
        local = {"local_window_size": window} if window else {}
        attn, _, _ = g.op(
            "GroupQueryAttention",
            [*qkv_inputs, f"past_key_values.{index}.key", f"past_key_values.{index}.value", self.seqlens_k,
             self.total, *self.rope_caches[rotary_path]],
            [f"{prefix}/attention", f"present.{index}.key", f"present.{index}.value"],
            domain=MS_DOMAIN,
            num_heads=shape.num_heads, kv_num_heads=kv_heads, scale=float(attention.scaling),
            do_rotary=1, rotary_interleaved=0, **local,
        )  # fmt: skip
        attn, shift = self._own_input(attn, f"{prefix}.o", wrappers["o"], linears["o"])
        attn_out = _linear(g, attn, f"{prefix}.o", [linears["o"]], [qw["o"]], shift)
        if attn_branch_norm:  # Gemma3: the branch is normed before the Skip norm adds it
            gamma, eps = _gamma(
                g, f"{prefix}.{attn_branch_norm}.weight", norms[attn_branch_norm], adapter.norm_offset
            )
            attn_out = _rms_norm(g, attn_out, gamma, eps)

        gamma, eps = _gamma(
            g, f"{prefix}.{adapter.mlp_norm}.weight", norms[adapter.mlp_norm], adapter.norm_offset
        )
        x, self.residual = _skip_norm(g, attn_out, self.residual, gamma, eps)
        x, shift = self._shared_input(
            x, f"{prefix}.gate_up", {r: wrappers[r] for r in ("gate", "up")}, linears["up"]
        )
        gate = _linear(g, x, f"{prefix}.gate", [linears["gate"]], [qw["gate"]], shift)
        up = _linear(g, x, f"{prefix}.up", [linears["up"]], [qw["up"]], shift)
        activation = MLP_ACTIVATIONS[getattr(config, adapter.activation_key)]
        act = g.op("Mul", [activation(g, gate), up])
        act, shift = self._own_input(act, f"{prefix}.down", wrappers["down"], linears["down"])
        self.pending = _linear(g, act, f"{prefix}.down", [linears["down"]], [qw["down"]], shift)
        if mlp_branch_norm:
            gamma, eps = _gamma(
                g, f"{prefix}.{mlp_branch_norm}.weight", norms[mlp_branch_norm], adapter.norm_offset
            )
            self.pending = _rms_norm(g, self.pending, gamma, eps)
        self._blocks_written += 1
        self._flush()

    def _shared_input(
        self, x: str, name: str, wrappers: dict[str, QuantInputLinear | None], linear: torch.nn.Linear
    ) -> tuple[str, tuple[float, ...] | None]:
        """x as the linears of ``wrappers`` (reading it together) see it, quantized once, and the
        shift their grid took out (None without one), which ``_linear`` folds into their bias."""
        grid = shared_input_grid(wrappers)
        x = _linear_input(self.g, x, name, None, grid, linear.in_features)
        return x, None if grid is None else grid.shift

    def _own_input(
        self, x: str, name: str, wrapper: QuantInputLinear | None, linear: torch.nn.Linear
    ) -> tuple[str, tuple[float, ...] | None]:
        """x as one linear sees it: its online rotation (R4 on down_proj, R5 on o_proj), then its
        grid; and the grid's shift, as ``_shared_input``."""
        rotation = wrapper.rotation if wrapper is not None else None
        if rotation is not None and not isinstance(rotation, OnlineRotation):
            raise ValueError(f"{name}: the fused graph writes factored OnlineRotations only, got {rotation}")
        grid = input_grid(wrapper)
        x = _linear_input(self.g, x, name, rotation, grid, linear.in_features)
        return x, None if grid is None else grid.shift

    def finish(self, weights: dict[str, QuantizedWeight]) -> OnnxExportInfo:
        """The final norm and lm_head (``weights`` holds its integer weight by path, if quantized),
        the graph's inputs and outputs, and model.onnx; checked with ``onnx.checker``."""
        g, adapter, config = self.g, self.adapter, self.model.config
        count = len(adapter.blocks(self.model))
        if self._blocks_written != count:
            raise ValueError(f"{self._blocks_written} of {count} blocks were written")
        final = adapter.final_norm(self.model)
        gamma, eps = _gamma(g, f"{adapter.final_norm_path}.weight", final, adapter.norm_offset)
        x, _ = _skip_norm(g, self.pending, self.residual, gamma, eps)
        _lm_head(g, x, self.model, adapter, weights, self.embed_table)
        self._flush()
        self.sink.close()

        shape = adapter.attention_shape(config)
        hd, kv_heads = shape.head_dim, shape.num_kv_heads
        batch, past, total_len = "batch_size", "past_sequence_length", "total_sequence_length"
        inputs = [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, [batch, "sequence_length"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [batch, total_len]),
        ]
        outputs = [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, "sequence_length", "vocab"])
        ]
        kv_type = helper.np_dtype_to_tensor_dtype(np.dtype(g.float_type))
        for i in range(count):
            for kv in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kv}", kv_type, [batch, kv_heads, past, hd]))  # fmt: skip
                outputs.append(helper.make_tensor_value_info(
                    f"present.{i}.{kv}", kv_type, [batch, kv_heads, total_len, hd]))  # fmt: skip
        graph = helper.make_graph(g.done_nodes, "edgeq_fused_decoder", inputs, outputs, g.done_initializers)
        opsets = [helper.make_opsetid("", self.opset), helper.make_opsetid(MS_DOMAIN, 1)]
        graph_model = helper.make_model(graph, opset_imports=opsets, producer_name="edgeq")
        path = self.out_dir / MODEL_FILE
        onnx.save_model(graph_model, str(path))
        onnx.checker.check_model(str(path), full_check=True)
        config.save_pretrained(self.out_dir)
        if getattr(self.model, "generation_config", None) is not None:
            self.model.generation_config.save_pretrained(self.out_dir)
        return OnnxExportInfo(path, self.replaced, onnx_bytes(self.out_dir), True,
                              component_bytes(graph_model), graph="fused")  # fmt: skip


def export_fused(
    model, adapter: Adapter, weights: dict[str, QuantizedWeight], tables: dict[str, QuantizedWeight],
    out_dir, opset: int = DEFAULT_OPSET, accuracy_level: int = DEFAULT_ACCURACY_LEVEL, dtype: str = "float32",
) -> OnnxExportInfo:  # fmt: skip
    """Write the fused graph of a model held in memory (``weights``: QuantizedWeight by module
    name, adapter.linear_name and lm_head's path; the model's float weight for any linear not in it;
    ``tables``: the int4 embedding, if any), with MatMulNBits weights and the model's config files."""
    writer = FusedDecoderWriter(model, adapter, Path(out_dir), opset, accuracy_level, dtype)
    writer.begin(tables)
    for i, block in enumerate(adapter.blocks(model)):
        roles = adapter.linears(block)
        writer.add_block(i, block, {r: weights[adapter.linear_name(i, r)] for r in roles
                                    if adapter.linear_name(i, r) in weights})  # fmt: skip
    return writer.finish(weights)

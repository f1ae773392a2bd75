"""Fake-quantized KV cache: keys and values on a per-token, per-head int grid, with R3.

transformers' attention modules call the function registered under ``config._attn_implementation``
with the post-RoPE queries and the keys and values after the cache update. ``KV_QUANT_ATTENTION``
is such a function: it applies R3 (a Hadamard over the head width) to queries and keys — qkᵀ is
unchanged — quantizes keys and values, and hands them to PyTorch's SDPA attention. Quantizing the
whole cache at every step gives what storing quantized entries would, since every entry is
quantized on its own.

Shifts (``ActQuantConfig.kv_shift``). After R3 the keys of a head share a direction: each channel's
mean over the tokens, which a per-token grid spends its levels on (as it does on the linear inputs'
means, ``edgeq.activation_ranges``). Keys and values are quantized as Q(x − μ) + μ, with μ [Hkv, hd]
their mean over the calibration tokens. Both are exact in float, and the keys' μ could even be left
out: q·μ is one constant per query, which softmax ignores. It is added back anyway, so one form
serves keys, values and the linear inputs (two ops per tensor in the graph).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from edgeq.activations import shifted_fake_quant

KV_QUANT_ATTENTION = "edgeq_kv_quant"
# the attention module's buffer [2, Hkv, 1, hd] of the keys' and values' shifts (a buffer, so that
# a block's recorded state, edgeq.resume, and the traced graphs carry it)
KV_SHIFT = "edgeq_kv_shift"


@dataclass
class KVQuant:
    """What one attention module does to its cache: ``rotation`` (R3, or None) and ``bits``
    (asymmetric, one scale and zero point per token and head of ``head_dim`` channels).
    ``observer``, while set, is called with the keys and values [b, Hkv, S, hd] after R3 and before
    the grid (``edgeq.activation_ranges.fit_kv_shift``)."""

    rotation: nn.Module | None
    bits: int
    head_dim: int
    observer: Callable[[torch.Tensor, torch.Tensor], None] | None = None


def kv_quant_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """query [b, H, L, hd], key / value [b, Hkv, S, hd] → SDPA attention on the rotated queries and
    keys with keys and values fake-quantized per (token, head), around their shifts where the module
    has them (``KV_SHIFT``). A module without a KVQuant runs plain
    SDPA: the streamed pipeline attaches them block by block, and a block not reached yet, or the FP
    stream through a block, computes in float."""
    spec: KVQuant | None = getattr(module, "edgeq_kv", None)
    if spec is None:
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)
    if spec.rotation is not None:
        query, key = spec.rotation(query), spec.rotation(key)
    if spec.observer is not None:
        spec.observer(key, value)
    if spec.bits < 16:
        shift = getattr(module, KV_SHIFT, None)
        key_shift, value_shift = (None, None) if shift is None else (shift[0], shift[1])
        key = shifted_fake_quant(key, key_shift, spec.bits, False, 1.0, spec.head_dim)
        value = shifted_fake_quant(value, value_shift, spec.bits, False, 1.0, spec.head_dim)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


def _sdpa_mask(*args, **kwargs):
    # looked up at call time: the ONNX exporter swaps in a traceable SDPA mask while it runs
    return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](*args, **kwargs)


def kv_spec(model: nn.Module, attention: nn.Module, head_dim: int) -> KVQuant:
    """The attention module's KVQuant, attached (float, no rotation) on first use; the model's
    attention then runs through KV_QUANT_ATTENTION."""
    if not hasattr(attention, "edgeq_kv"):
        attention.edgeq_kv = KVQuant(rotation=None, bits=16, head_dim=head_dim)
    # a registration with transformers (idempotent), so the config can name the function
    AttentionInterface.register(KV_QUANT_ATTENTION, kv_quant_attention)
    AttentionMaskInterface.register(KV_QUANT_ATTENTION, _sdpa_mask)
    model.config._attn_implementation = KV_QUANT_ATTENTION
    return attention.edgeq_kv


def set_kv_shift(attention: nn.Module, shift: torch.Tensor) -> None:
    """Give the attention module's cache its shifts, [2, Hkv, 1, hd]: the keys' and the values'."""
    attention.register_buffer(KV_SHIFT, shift)

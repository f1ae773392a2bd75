"""One decoder block during calibration: its inputs, and the attention quantities BoA needs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PretrainedConfig

from edgeq.activations import float_activations
from edgeq.models.adapters import Adapter
from edgeq.quant.boa import apply_rope


def block_forward(adapter: Adapter, block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One decoder block on hidden [b, L, d] → [b, L, d] (what the block returns is an adapter fact)."""
    return adapter.block_hidden(block(hidden, **kwargs))


@dataclass
class BlockContext:
    """A block and its calibration inputs: per batch, hidden states [b, L, d] and the keyword
    arguments the model passed it. ``run`` records the block's outputs (with the weights it had
    when it ran), so the pipeline need not run the unquantized block twice.

    fp_hidden: the same batches' hidden states in the unquantized model (the "FP stream": float
    weights and float activations), kept only
    for methods that correct for the error of the blocks quantized before; ``run_fp`` records the
    block's FP-stream outputs, the next block's fp_hidden."""

    index: int
    block: nn.Module
    adapter: Adapter
    model_config: PretrainedConfig
    hidden: list[torch.Tensor]
    kwargs: list[dict]
    outputs: list[torch.Tensor] = field(default_factory=list)
    fp_hidden: list[torch.Tensor] | None = None
    fp_outputs: list[torch.Tensor] = field(default_factory=list)

    @property
    def linears(self) -> dict[str, nn.Linear]:
        return self.adapter.linears(self.block)

    def run(self, batch: int) -> torch.Tensor:
        out = block_forward(self.adapter, self.block, self.hidden[batch], self.kwargs[batch])
        if len(self.outputs) == batch:
            self.outputs.append(out)
        return out

    def run_fp(self, batch: int) -> torch.Tensor:
        with float_activations(self.block):
            out = block_forward(self.adapter, self.block, self.fp_hidden[batch], self.kwargs[batch])
        self.fp_outputs.append(out)
        return out

    def run_all(self) -> list[torch.Tensor]:
        return [self.run(b) for b in range(len(self.hidden))]


def _heads(t: torch.Tensor, heads: int, head_dim: int, norm: nn.Module | None) -> torch.Tensor:
    """[b, L, heads·hd] → [b, heads, L, hd], with the per-head norm (Gemma3) when there is one."""
    b, length, _ = t.shape
    t = t.view(b, length, heads, head_dim)
    if norm is not None:
        t = norm(t)
    return t.transpose(1, 2)


@torch.no_grad()
def attention_inputs(
    ctx: BlockContext, x: torch.Tensor, kwargs: dict, with_probs: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Post-RoPE queries [b, H, L, hd] and keys [b, Hkv, L, hd] computed from the q/k/v input
    x [b, L, d], the attention probabilities [b, H, L, L] (causal, with the block's own mask) when
    asked, and the (cos, sin) [b, L, hd] used."""
    adapter, shape = ctx.adapter, ctx.adapter.attention_shape(ctx.model_config)
    if adapter.rope != "rotate_half":
        raise NotImplementedError(f"RoPE convention {adapter.rope}")
    linears = ctx.linears
    norms = adapter.qk_norm_modules(ctx.block) or (None, None)
    cos, sin = adapter.rope_cos_sin(ctx.block, kwargs)
    q = apply_rope(_heads(linears["q"](x), shape.num_heads, shape.head_dim, norms[0]), cos, sin)
    k = apply_rope(_heads(linears["k"](x), shape.num_kv_heads, shape.head_dim, norms[1]), cos, sin)
    probs = None
    if with_probs:
        group = shape.num_heads // shape.num_kv_heads
        scores = (
            q @ k.repeat_interleave(group, dim=1).transpose(-1, -2) * adapter.attention(ctx.block).scaling
        )
        mask = kwargs.get("attention_mask")
        length = x.shape[1]
        if mask is None:
            mask = torch.ones(length, length, dtype=torch.bool).tril()
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask[..., -length:, -length:], float("-inf"))
        else:
            scores = scores + mask[..., -length:, -length:]
        probs = torch.softmax(scores.float(), dim=-1)
    return q, k, probs, cos, sin

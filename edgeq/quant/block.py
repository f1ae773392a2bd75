"""One decoder block during calibration: its inputs, and the attention quantities BoA needs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PretrainedConfig

from edgeq.activations import float_activations
from edgeq.config import QuantConfig, WeightQuantConfig
from edgeq.models.adapters import Adapter
from edgeq.quant.boa import apply_rope


def to_device(value, device: torch.device | str, dtype: torch.dtype | None = None):
    """``value`` (a tensor, or tuples, lists and dicts of them) on ``device``; floating tensors cast
    to ``dtype`` when given. A no-op for tensors already there."""
    if isinstance(value, torch.Tensor):
        cast = dtype if dtype is not None and value.is_floating_point() else None
        return value.to(device=device, dtype=cast)
    if isinstance(value, tuple | list):
        return type(value)(to_device(v, device, dtype) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device, dtype) for k, v in value.items()}
    return value


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
    block's FP-stream outputs, the next block's fp_hidden.

    device: where the block is and runs; the stored batches (hidden, fp_hidden and the recorded
    outputs) stay on the CPU in ``storage_dtype`` and move to the device one batch at a time, in
    float32.

    output_hessians: OAC's output-adaptive Hessian of each role's linear (``edgeq.quant.oac``), for
    the methods that use them; None otherwise.
    """

    index: int
    block: nn.Module
    adapter: Adapter
    model_config: PretrainedConfig
    hidden: list[torch.Tensor]
    kwargs: list[dict]
    outputs: list[torch.Tensor] = field(default_factory=list)
    fp_hidden: list[torch.Tensor] | None = None
    fp_outputs: list[torch.Tensor] = field(default_factory=list)
    device: torch.device | str = "cpu"
    storage_dtype: torch.dtype = torch.float32
    output_hessians: dict[str, torch.Tensor] | None = None

    @property
    def linears(self) -> dict[str, nn.Linear]:
        return self.adapter.linears(self.block)

    def grid(self, config: QuantConfig, role: str) -> WeightQuantConfig:
        """The weight grid of this block's ``role`` linear (its own width under mixed precision)."""
        return config.weights_for(self.adapter.linear_name(self.index, role))

    def batch_kwargs(self, batch: int) -> dict:
        """The block's keyword arguments for ``batch``, on the device."""
        return to_device(self.kwargs[batch], self.device)

    def _forward(self, hidden: torch.Tensor, batch: int) -> torch.Tensor:
        x = to_device(hidden, self.device, torch.float32)
        return block_forward(self.adapter, self.block, x, self.batch_kwargs(batch))

    def _stored(self, out: torch.Tensor) -> torch.Tensor:
        return out.to(device="cpu", dtype=self.storage_dtype)

    def run(self, batch: int) -> torch.Tensor:
        out = self._forward(self.hidden[batch], batch)
        if len(self.outputs) == batch:
            self.outputs.append(self._stored(out))
        return out

    def run_fp(self, batch: int) -> torch.Tensor:
        with float_activations(self.block):
            out = self._forward(self.fp_hidden[batch], batch)
        self.fp_outputs.append(self._stored(out))
        return out

    def run_all(self) -> list[torch.Tensor]:
        """Every batch through the block as it is now; the outputs as stored."""
        return [self._stored(self._forward(h, b)) for b, h in enumerate(self.hidden)]


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
            mask = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask[..., -length:, -length:], float("-inf"))
        else:
            scores = scores + mask[..., -length:, -length:]
        probs = torch.softmax(scores.float(), dim=-1)
    return q, k, probs, cos, sin

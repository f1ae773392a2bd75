"""Per-architecture facts, declared in one place.

Nothing outside this module string-matches module names: the pipeline, the rotations and the
exporters ask an :class:`Adapter` for the decoder blocks, the linears by role, the norms and the
attention geometry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from edgeq.activations import QuantInputLinear
from edgeq.errors import EdgeqError

# Roles of the linears inside one decoder block, in the order the block uses them.
LINEAR_ROLES = ("q", "k", "v", "o", "gate", "up", "down")
# What every supported block does with them: the attention norm feeds q/k/v, the MLP norm feeds
# gate/up, and o/down write back into the residual stream.
ATTN_INPUT_ROLES = ("q", "k", "v")
MLP_INPUT_ROLES = ("gate", "up")
RESIDUAL_OUTPUT_ROLES = ("o", "down")
# The linears that read one input, in the order the block computes the inputs: an exported graph
# quantizes each input once for all its readers.
INPUT_GROUPS = (ATTN_INPUT_ROLES, ("o",), MLP_INPUT_ROLES, ("down",))

_LLAMA_LINEARS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


@dataclass(frozen=True)
class AttentionShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int


@dataclass(frozen=True)
class Adapter:
    """Where things are in one architecture family (paths are attribute paths).

    attn_norm / mlp_norm: the RMSNorms whose output feeds q/k/v and gate/up; their scales can be
    folded into those linears.
    branch_norms: norms applied to a block's branch output before the residual add (Gemma3); a
    residual-stream rotation does not commute with them.
    norm_offset: RMSNorm multiplies by (norm_offset + weight): 1.0 for Gemma.
    block_returns_tuple: whether a decoder block returns ``(hidden_states, ...)`` (Gemma3 in
    transformers 4.57) rather than the bare tensor (Llama, Qwen2, Mistral); the model indexes the
    tuple, so anything standing in for a block must return the same kind.
    bos: True when the architecture is trained with BOS at the start of every sequence whatever its
    tokenizer file says (Gemma); None to follow the tokenizer (Llama-3 adds BOS, SmolLM2 and Qwen2 do
    not).
    rope: how RoPE is applied to q and k ("rotate_half": pairs (i, i + head_dim/2)).
    rope_kwargs: the block keyword that carries (cos, sin) [b, L, head_dim], by the block's
    ``attention_type`` ("" when the architecture has one kind of attention layer).
    inexact_rotations: rotations (``r1``, ``r2``, ``r4``) that would change this architecture's
    function, with the reason; the rotation step skips them and reports why.
    rotary_path: the model's rotary embedding module (called as ``rotary(x, position_ids)``).
    fused_graph_unsupported: why ORT's fused decoder graph (``exporters.ort_fused``) cannot express
    this architecture ("" = it can); the ort format then converts optimum's graph instead.
    rotary_paths: the rotary module by ``attention_type`` where the layer kinds use different RoPE
    bases (Gemma3: local and global); a kind not listed uses ``rotary_path``.
    activation_key: the config field naming the MLP's gate activation (a transformers ACT2FN name).
    required_config: config.json fields the weights' shapes follow; transformers gives a missing one
    its default silently, so a config.json lacking one is refused instead.
    genai_types: onnxruntime-genai's model type (``model.type`` in genai_config.json) by
    ``model_type``; genai runs every one of them as its generic decoder-only LLM, whose inputs and
    outputs the config names. A model_type not listed gets no genai config.
    """

    name: str
    model_types: tuple[str, ...]
    linear_paths: dict[str, str] = field(default_factory=lambda: dict(_LLAMA_LINEARS))
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    branch_norms: tuple[str, ...] = ()
    qk_norms: tuple[str, ...] = ()
    norm_offset: float = 0.0
    block_returns_tuple: bool = False
    bos: bool | None = None
    qkv_bias: bool = False
    rope: str = "rotate_half"
    rope_kwargs: dict[str, str] = field(default_factory=lambda: {"": "position_embeddings"})
    attention_path: str = "self_attn"
    blocks_path: str = "model.layers"
    embed_path: str = "model.embed_tokens"
    final_norm_path: str = "model.norm"
    lm_head_path: str = "lm_head"
    inexact_rotations: dict[str, str] = field(default_factory=dict)
    rotary_path: str = "model.rotary_emb"
    fused_graph_unsupported: str = ""
    rotary_paths: dict[str, str] = field(default_factory=dict)
    activation_key: str = "hidden_act"
    required_config: tuple[str, ...] = (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
    )  # fmt: skip
    genai_types: dict[str, str] = field(default_factory=dict)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_path)

    def block_output(self, hidden: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor]:
        """What a decoder block returns for its output hidden states [b, L, d]."""
        return (hidden,) if self.block_returns_tuple else hidden

    def block_hidden(self, output) -> torch.Tensor:
        """The hidden states [b, L, d] in what a decoder block returned; an error when the block
        returned another kind than this adapter declares (a transformers version that changed it)."""
        if isinstance(output, tuple) != self.block_returns_tuple:
            raise EdgeqError(
                f"{self.name} decoder blocks returned a {type(output).__name__}, but the adapter declares "
                f"{'a tuple' if self.block_returns_tuple else 'a tensor'}: this transformers version "
                "changed the block's interface"
            )
        return output[0] if self.block_returns_tuple else output

    def linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        """The block's quantizable linears by role, in LINEAR_ROLES order (inside their
        QuantInputLinear wrapper where the model has one)."""
        out = {}
        for role in LINEAR_ROLES:
            module = block.get_submodule(self.linear_paths[role])
            out[role] = module.linear if isinstance(module, QuantInputLinear) else module
        return out

    def input_quantizer(self, block: nn.Module, role: str) -> QuantInputLinear:
        """The QuantInputLinear around the role's linear, put in place on first use."""
        parent, _, child = self.linear_paths[role].rpartition(".")
        owner = block.get_submodule(parent) if parent else block
        module = getattr(owner, child)
        if not isinstance(module, QuantInputLinear):
            module = QuantInputLinear(module)
            setattr(owner, child, module)
        return module

    def wrapped_input(self, block: nn.Module, role: str) -> QuantInputLinear | None:
        """The QuantInputLinear around the role's linear, or None where the linear is bare (an
        exporter's read-only view: unlike ``input_quantizer`` it never wraps)."""
        module = block.get_submodule(self.linear_paths[role])
        return module if isinstance(module, QuantInputLinear) else None

    def linear_name(self, block_index: int, role: str) -> str:
        """Full module name, e.g. ``model.layers.3.self_attn.q_proj``."""
        return f"{self.blocks_path}.{block_index}.{self.linear_paths[role]}"

    def named_linears(self, model: nn.Module) -> dict[str, nn.Linear]:
        """Every quantizable linear of the model by full module name (embedding and lm_head excluded)."""
        out: dict[str, nn.Linear] = {}
        for i, block in enumerate(self.blocks(model)):
            for role, module in self.linears(block).items():
                out[self.linear_name(i, role)] = module
        return out

    def norms(self, block: nn.Module) -> dict[str, nn.Module]:
        names = (self.attn_norm, self.mlp_norm, *self.branch_norms)
        return {name: block.get_submodule(name) for name in names}

    def attention(self, block: nn.Module) -> nn.Module:
        return block.get_submodule(self.attention_path)

    def qk_norm_modules(self, block: nn.Module) -> tuple[nn.Module, nn.Module] | None:
        """(q_norm, k_norm) applied per head before RoPE, or None."""
        return tuple(block.get_submodule(p) for p in self.qk_norms) if self.qk_norms else None

    def rope_cos_sin(self, block: nn.Module, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The (cos, sin) [b, L, head_dim] this block applies to q and k, from its call's kwargs."""
        key = self.rope_kwargs.get(getattr(block, "attention_type", ""), self.rope_kwargs.get(""))
        return kwargs[key]

    def embedding(self, model: nn.Module) -> nn.Embedding:
        return model.get_submodule(self.embed_path)

    def lm_head(self, model: nn.Module) -> nn.Linear:
        return model.get_submodule(self.lm_head_path)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.final_norm_path)

    def attention_shape(self, config: PretrainedConfig) -> AttentionShape:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return AttentionShape(
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            hidden_size=config.hidden_size,
        )

    def attention_type(self, config: PretrainedConfig, layer_index: int) -> str:
        """Layer ``layer_index``'s kind in ``config.layer_types`` ("full_attention",
        "sliding_attention"), or "" when the config does not list kinds (Llama, Mistral)."""
        layer_types = getattr(config, "layer_types", None)
        return layer_types[layer_index] if layer_types else ""

    def sliding_window(self, config: PretrainedConfig, layer_index: int) -> int | None:
        """How many keys a query of layer ``layer_index`` sees (itself and the sliding_window - 1
        before it, transformers' ``kv_idx > q_idx - sliding_window``), or None: all earlier ones.

        The kind comes from ``layer_types`` where the config has it (Gemma3's pattern, Qwen2's
        max_window_layers); otherwise a set sliding_window covers every layer (Mistral).
        use_sliding_window=False turns it off (Qwen2 also clears sliding_window then).
        """
        window = getattr(config, "sliding_window", None)
        if not window or getattr(config, "use_sliding_window", True) is False:
            return None
        if getattr(config, "layer_types", None):
            return window if self.attention_type(config, layer_index) == "sliding_attention" else None
        return window

    def genai_type(self, config: PretrainedConfig) -> str | None:
        """onnxruntime-genai's name for this model's architecture, or None where it has none."""
        return self.genai_types.get(config.model_type)

    def layer_rotary_path(self, config: PretrainedConfig, layer_index: int) -> str:
        """Path of the rotary module whose (cos, sin) layer ``layer_index`` applies."""
        return self.rotary_paths.get(self.attention_type(config, layer_index), self.rotary_path)


LLAMA = Adapter(
    name="llama", model_types=("llama", "mistral"), genai_types={"llama": "llama", "mistral": "mistral"}
)
QWEN2 = Adapter(name="qwen2", model_types=("qwen2",), qkv_bias=True, genai_types={"qwen2": "qwen2"})
GEMMA3 = Adapter(
    name="gemma3",
    model_types=("gemma3_text",),
    mlp_norm="pre_feedforward_layernorm",
    branch_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
    qk_norms=("self_attn.q_norm", "self_attn.k_norm"),
    norm_offset=1.0,
    block_returns_tuple=True,
    bos=True,
    inexact_rotations={
        "r1": "the post-attention and post-feedforward norms sit on the residual branch, "
        "so a residual-stream rotation does not commute with them"
    },
    rope_kwargs={
        "full_attention": "position_embeddings_global",
        "sliding_attention": "position_embeddings_local",
    },
    rotary_paths={"full_attention": "model.rotary_emb", "sliding_attention": "model.rotary_emb_local"},
    activation_key="hidden_activation",
    genai_types={"gemma3_text": "gemma3_text"},  # genai's "gemma3" is the vision-language model
)

ADAPTERS: tuple[Adapter, ...] = (LLAMA, QWEN2, GEMMA3)


def supported_model_types() -> list[str]:
    return [t for a in ADAPTERS for t in a.model_types]


def adapter_for_config(config: PretrainedConfig) -> Adapter:
    """The adapter of ``config.model_type``; a one-line error naming the supported ones otherwise."""
    for adapter in ADAPTERS:
        if config.model_type in adapter.model_types:
            return adapter
    raise EdgeqError(
        f"unsupported architecture '{config.model_type}': edgeq supports {', '.join(supported_model_types())}"
    )


def adapter_for(model: PreTrainedModel) -> Adapter:
    return adapter_for_config(model.config)

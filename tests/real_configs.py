"""Random-weight test models built from the published configurations of real checkpoints.

Every width, head layout, sliding-window pattern, RoPE setting, bias and tie is the checkpoint's own
(the fields below are copied from its ``config.json``). Two things are cut, and only where the code
under test does not depend on them:

- depth: ``layers`` keeps at least one full period of ``layer_types`` (Gemma3: five sliding layers
  then one full, so 6) and at least 2 blocks elsewhere, so block chaining is exercised;
- vocabulary: ``FIXTURE_VOCAB`` tokens of a byte-level BPE trained on the C4 sample, instead of
  49k-262k. edgeq's code reads the vocabulary only through the tokenizer's conventions (BOS) and
  the embedding and lm_head shapes, which any size exercises. The special tokens take the first ids
  (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2: Gemma's own ids) and the tokenizer adds BOS exactly when the
  checkpoint's tokenizer does (Gemma3, Llama-3: yes; Qwen2.5, SmolLM2, TinyMistral: no).

One thing is added: ``TRAIN_STEPS`` steps of next-token training on the C4 sample after the random
initialization. A random model's next-token distribution is nearly flat, so its argmax is a coin toss
that int4 noise flips: untrained, SmolLM2-360M's fixture agreed with itself at W4A16 RTN on 52 % of
greedy tokens, against the 50 % the default validation gate asks. A few steps make the predictions
peaked the way a trained model's are, so the default gates mean what they mean for real checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast

FIXTURE_VOCAB = 2048
TRAIN_STEPS, TRAIN_BATCH, TRAIN_SEQ_LEN, TRAIN_LR = 10, 4, 32, 3e-3
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>")
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2

_GEMMA3_COMMON = {
    "model_type": "gemma3_text",
    "head_dim": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "query_pre_attn_scalar": 256,
    "sliding_window": 512,
    "sliding_window_pattern": 6,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "rope_scaling": None,
    "max_position_embeddings": 32768,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "attention_bias": False,
    "tie_word_embeddings": True,
}


@dataclass(frozen=True)
class RealConfig:
    """One checkpoint's architecture. config: its config.json fields (vocabulary and depth are set by
    ``fixture_config``); layers: the depth the fixture keeps; adds_bos: whether the checkpoint's
    tokenizer puts BOS in front of every sequence; eval_seq_len: evaluation windows long enough to
    pass the sliding window where there is one."""

    name: str
    checkpoint: str
    config: dict = field(hash=False)
    layers: int
    adds_bos: bool
    eval_seq_len: int = 128
    random_qkv_bias: bool = False


REAL_CONFIGS: dict[str, RealConfig] = {
    c.name: c
    for c in (
        RealConfig(
            "gemma3-270m",
            "google/gemma-3-270m",
            {**_GEMMA3_COMMON, "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18},
            layers=6,
            adds_bos=True,
            eval_seq_len=544,  # > the 512-token sliding window
        ),
        RealConfig(
            "gemma3-1b",
            "google/gemma-3-1b-pt",
            {**_GEMMA3_COMMON, "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26},
            layers=6,
            adds_bos=True,
            eval_seq_len=544,
        ),
        RealConfig(
            "qwen2.5-0.5b",
            "Qwen/Qwen2.5-0.5B",
            {
                "model_type": "qwen2",
                "hidden_size": 896,
                "intermediate_size": 4864,
                "num_hidden_layers": 24,
                "num_attention_heads": 14,
                "num_key_value_heads": 2,
                "hidden_act": "silu",
                "max_position_embeddings": 32768,
                "rope_theta": 1_000_000.0,
                "rms_norm_eps": 1e-6,
                "use_sliding_window": False,
                "sliding_window": 32768,
                "max_window_layers": 24,
                "tie_word_embeddings": True,
            },
            layers=2,
            adds_bos=False,
            random_qkv_bias=True,  # q/k/v biases are zero at init; random ones exercise the bias path
        ),
        RealConfig(
            "llama-3.2-1b",
            "meta-llama/Llama-3.2-1B",
            {
                "model_type": "llama",
                "hidden_size": 2048,
                "intermediate_size": 8192,
                "num_hidden_layers": 16,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "head_dim": 64,
                "hidden_act": "silu",
                "max_position_embeddings": 131072,
                "rope_theta": 500_000.0,
                "rope_scaling": {
                    "factor": 32.0,
                    "high_freq_factor": 4.0,
                    "low_freq_factor": 1.0,
                    "original_max_position_embeddings": 8192,
                    "rope_type": "llama3",
                },
                "rms_norm_eps": 1e-5,
                "attention_bias": False,
                "mlp_bias": False,
                "tie_word_embeddings": True,
            },
            layers=2,
            adds_bos=True,
        ),
        RealConfig(
            "smollm2-360m",
            "HuggingFaceTB/SmolLM2-360M",
            {
                "model_type": "llama",
                "hidden_size": 960,
                "intermediate_size": 2560,
                "num_hidden_layers": 32,
                "num_attention_heads": 15,
                "num_key_value_heads": 5,
                "hidden_act": "silu",
                "max_position_embeddings": 8192,
                "rope_theta": 100_000.0,
                "rope_scaling": None,
                "rms_norm_eps": 1e-5,
                "tie_word_embeddings": True,
            },
            layers=2,
            adds_bos=False,
        ),
        RealConfig(
            "tinymistral-248m",  # a Mistral-architecture checkpoint with a sliding window
            "Locutusque/TinyMistral-248M",
            {
                "model_type": "mistral",
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": 12,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "hidden_act": "silu",
                "max_position_embeddings": 32768,
                "rope_theta": 10_000.0,
                "rms_norm_eps": 1e-6,
                "sliding_window": 32,
                "tie_word_embeddings": False,
            },
            layers=2,
            adds_bos=False,
        ),
    )
}


def fixture_config(real: RealConfig, vocab: int = FIXTURE_VOCAB) -> PretrainedConfig:
    """The checkpoint's config at the fixture's depth and vocabulary (layer_types cut to match)."""
    fields = dict(real.config)
    model_type = fields.pop("model_type")
    fields |= {"num_hidden_layers": real.layers, "vocab_size": vocab}
    fields |= {"pad_token_id": PAD_ID, "eos_token_id": EOS_ID, "bos_token_id": BOS_ID}
    return AutoConfig.for_model(model_type, **fields)


def fixture_tokenizer(real: RealConfig, texts: list[str], vocab: int = FIXTURE_VOCAB):
    """A byte-level BPE of ``vocab`` tokens trained on ``texts``; it adds BOS like the checkpoint's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    if real.adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS_ID)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )


def train_briefly(model, ids: torch.Tensor, steps: int = TRAIN_STEPS, lr: float = TRAIN_LR) -> None:
    """``steps`` AdamW steps of next-token loss on consecutive batches of ids [steps · b, L]."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for batch in ids.chunk(steps):
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def build_fixture(real: RealConfig, folder: Path, texts: list[str], seed: int = 0) -> Path:
    """Save a model of ``real``'s architecture (random, then briefly trained) and its tokenizer as an
    HF folder."""
    from edgeq.data import sample_calibration

    torch.manual_seed(seed)
    tokenizer = fixture_tokenizer(real, texts)
    model = AutoModelForCausalLM.from_config(fixture_config(real))
    if real.random_qkv_bias:
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                torch.nn.init.normal_(param, std=0.1)
    train_ids = sample_calibration(tokenizer, texts, TRAIN_STEPS * TRAIN_BATCH, TRAIN_SEQ_LEN, seed=seed + 1)
    train_briefly(model, train_ids)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

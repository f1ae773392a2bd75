"""A model whose weights stay on disk until a block needs them.

    model = empty_model(config)                       # parameters on the meta device, buffers real
    checkpoint = open_checkpoint(source)              # tensors by name, read one at a time
    load_outer(model, adapter, checkpoint)            # embedding, final norm, lm_head
    block = load_block(model, adapter, checkpoint, 3, device)   # one decoder block, float32
    ...
    release(block)                                    # back to meta: its memory is freed

Peak memory is then one block, the embedding and lm_head, whatever the depth. safetensors files
(one or sharded with an index) are read tensor by tensor; a ``.bin`` checkpoint is memory-mapped by
``torch.load(mmap=True)``. A GGUF checkpoint is first converted to a safetensors folder in edgeq's cache
(``edgeq.models.loading``), once: that conversion holds the whole float32 model one time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from edgeq.errors import EdgeqError, first_line
from edgeq.models.adapters import Adapter

SAFETENSORS_INDEX = "model.safetensors.index.json"
# the header's dtype names (safetensors' spec)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


class Checkpoint:
    """The tensors of a checkpoint by name, each read only when asked for.

    files: tensor name → the safetensors file holding it; state: tensors already mapped (a
    memory-mapped ``.bin``), by name.

    Each read opens its file and closes it again: safetensors reads through a memory map, and the
    pages a read touched stay resident in the process for as long as the map is open — with one
    handle per file kept open, every block ever read would stay counted (measured on a 16-block
    Llama-3.2-1B shape: 5.5 GiB at the last block, one block's weights per block).
    """

    def __init__(self, files: dict[str, Path] | None = None, state: dict[str, torch.Tensor] | None = None):
        self._files = files or {}
        self._state = state or {}

    def names(self) -> set[str]:
        return set(self._files) | set(self._state)

    def __contains__(self, name: str) -> bool:
        return name in self._files or name in self._state

    def _path(self, name: str) -> Path:
        if name not in self._files:
            raise EdgeqError(f"the checkpoint has no tensor '{name}' that the model needs")
        return self._files[name]

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as stored (its own dtype), read from disk now, into memory of its own;
        a one-line error for an unreadable file or a tensor holding NaN or Inf."""
        if name in self._state:
            tensor = self._state[name]
        else:
            from safetensors import safe_open

            path = self._path(name)
            try:
                with safe_open(str(path), framework="pt") as handle:
                    tensor = handle.get_tensor(name).clone()
            except Exception as err:  # noqa: BLE001 - safetensors raises its own and OS errors alike
                raise EdgeqError(f"cannot read tensor '{name}' from {path}: {first_line(err)}") from None
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            # a quantizer fed NaN writes NaN scales: the artifact would load and produce garbage
            raise EdgeqError(f"weight '{name}' of the checkpoint holds NaN or Inf values")
        return tensor

    def dtype_of(self, name: str) -> torch.dtype:
        """The stored dtype of tensor ``name``, read from the file's header (no data is read)."""
        if name in self._state:
            return self._state[name].dtype
        from safetensors import safe_open

        with safe_open(str(self._path(name)), framework="pt") as handle:
            return SAFETENSORS_DTYPES.get(handle.get_slice(name).get_dtype(), torch.float32)

    def floating_dtype(self) -> torch.dtype:
        """The dtype the checkpoint stores its floating-point weights in (of its first such tensor)."""
        for name in sorted(self.names()):
            dtype = self.dtype_of(name)
            if dtype.is_floating_point:
                return dtype
        return torch.float32


def _safetensors_files(folder: Path) -> dict[str, Path]:
    """Tensor name → file, from the sharded index or by listing each .safetensors file's keys."""
    index = folder / SAFETENSORS_INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    from safetensors import safe_open

    files: dict[str, Path] = {}
    for path in sorted(folder.glob("*.safetensors")):
        try:  # the header is checked against the file's size here: a truncated file fails now
            with safe_open(str(path), framework="pt") as handle:
                files |= dict.fromkeys(handle.keys(), path)
        except Exception as err:  # noqa: BLE001 - safetensors raises its own and OS errors alike
            raise EdgeqError(f"{path} is not a readable safetensors file: {first_line(err)}") from None
    return files


def open_checkpoint(folder: Path) -> Checkpoint:
    """The checkpoint in a local Hugging Face folder: safetensors, else a memory-mapped ``.bin``."""
    files = _safetensors_files(folder)
    if files:
        return Checkpoint(files=files)
    bins = sorted(folder.glob("*.bin"))
    if not bins:
        raise EdgeqError(f"{folder} holds no .safetensors or .bin weights")
    state: dict[str, torch.Tensor] = {}
    for path in bins:
        state |= torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    return Checkpoint(state=state)


def empty_model(config: PretrainedConfig) -> nn.Module:
    """The causal LM of ``config`` with every parameter on the meta device (no memory) and its
    buffers (RoPE frequencies, Gemma's embedding scale) computed on the CPU, in eval mode."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def _set_parameter(root: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_path, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def _load_params(
    module: nn.Module, prefix: str, checkpoint: Checkpoint, device: torch.device | str
) -> Iterator[str]:
    for name, param in list(module.named_parameters(recurse=True)):
        full = f"{prefix}.{name}" if prefix else name
        value = checkpoint.get(full)
        if value.shape != param.shape:  # config.json and the weights disagree
            raise EdgeqError(
                f"tensor '{full}' has shape {list(value.shape)} in the checkpoint, but config.json "
                f"implies {list(param.shape)}"
            )
        _set_parameter(module, name, value.to(device=device, dtype=torch.float32))
        yield full


def lm_head_is_tied(model: nn.Module, adapter: Adapter, checkpoint: Checkpoint) -> bool:
    """Whether lm_head reads the embedding's table: the config ties them, or the checkpoint holds
    no lm_head of its own."""
    return bool(getattr(model.config, "tie_word_embeddings", False)) or (
        f"{adapter.lm_head_path}.weight" not in checkpoint
    )


def load_outer(model: nn.Module, adapter: Adapter, checkpoint: Checkpoint) -> None:
    """Read the embedding, the final norm and lm_head (float32, CPU); a tied lm_head shares the
    embedding's parameter, as ``from_pretrained`` would make it."""
    for path in (adapter.embed_path, adapter.final_norm_path):
        list(_load_params(model.get_submodule(path), path, checkpoint, "cpu"))
    head = adapter.lm_head(model)
    if lm_head_is_tied(model, adapter, checkpoint):
        head.weight = adapter.embedding(model).weight
    else:
        list(_load_params(head, adapter.lm_head_path, checkpoint, "cpu"))


def load_block(
    model: nn.Module, adapter: Adapter, checkpoint: Checkpoint, index: int, device: torch.device | str = "cpu"
) -> nn.Module:
    """Decoder block ``index`` with its weights read from the checkpoint, float32 on ``device``."""
    block = adapter.blocks(model)[index]
    list(_load_params(block, f"{adapter.blocks_path}.{index}", checkpoint, device))
    return block


def release(module: nn.Module) -> None:
    """Move a module's parameters back to the meta device, freeing their memory."""
    for name, _ in list(module.named_parameters(recurse=True)):
        param = module.get_parameter(name)
        _set_parameter(module, name, torch.empty_like(param, device="meta"))


def checkpoint_bytes(model: nn.Module) -> int:
    """Float32 bytes of every parameter (a tied table counted once); meta parameters count too."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel() * 4
    return total

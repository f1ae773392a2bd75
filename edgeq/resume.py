"""Resume: an export killed or interrupted after block k continues from block k + 1.

The export writes into a hidden partial folder beside ``--out`` (``edgeq.artifact``). After each
finished decoder block it records there, under ``.resume/``:

- ``block_{i}.pt``: the block's integer weights, the rest of its tensors as quantized (norms,
  biases, quantizer buffers), its layer statistics, seconds and output error;
- ``streams_{i}.pt``: the hidden states each stream carries into block i + 1 (the calibration
  stream, its float twin when the method corrects for earlier blocks, the three evaluation
  streams); the previous block's file is deleted once this one is recorded;
- ``journal.json``: the run's fingerprint and the number of finished blocks, replaced atomically
  last, so a kill while a block's files are written leaves the previous block's record in force;
- ``quant.json`` and ``oac/``: the quantization config after APTQ's width allocation, and OAC's
  per-block Hessians, so neither the backward passes nor the allocation run again.

``edgeq export ... --resume`` reuses the partial folder whose journal carries this run's
fingerprint (the config, the source weights' SHA-256 and edgeq's version; another one is refused),
clears everything else in it, replays the finished blocks into the graph writer from their records
(read from the checkpoint, rotated and given their quantizers as before, then their quantized
tensors restored: no calibration), restores the streams and goes on. The writer receives the same
blocks in the same order, so the files are the uninterrupted run's, byte for byte.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeq.artifact import JOURNAL_FILE, RESUME_DIR
from edgeq.quant.grid import QuantizedWeight

STREAMS = ("calibration", "calibration_fp", "eval_fp", "eval_rotated", "eval_quant")


def fingerprint(config: dict[str, Any], weights_sha256: str | None, version: str) -> str:
    """What a resumed run must share with the interrupted one: SHA-256 of the config (canonical
    JSON), the source weights' hash and edgeq's version."""
    text = json.dumps({"config": config, "weights": weights_sha256, "edgeq": version}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _weight_to_dict(q: QuantizedWeight) -> dict[str, Any]:
    return {f.name: getattr(q, f.name) for f in dataclasses.fields(q)}


@dataclass
class BlockRecord:
    """What block i left behind: ``weights`` its integer weights by role; ``state`` its other tensors
    by state_dict name; ``layers`` its LayerStats as dicts; ``fallbacks`` its numerical fallbacks;
    ``clip_ratios`` its searched activation clip ratios by role."""

    weights: dict[str, QuantizedWeight]
    state: dict[str, torch.Tensor]
    layers: list[dict[str, Any]]
    seconds: float
    output_rel_error: float
    fallbacks: list[str] = dataclasses.field(default_factory=list)
    clip_ratios: dict[str, float] = dataclasses.field(default_factory=dict)  # searched, by role


def block_state(block: nn.Module, linears: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """The block's tensors other than its linears' weights (those are the integer weights), on the
    CPU."""
    skip = {id(layer.weight) for layer in linears.values()}
    named = {**dict(block.named_parameters()), **dict(block.named_buffers())}
    return {name: t.detach().cpu().clone() for name, t in named.items() if id(t) not in skip}


def restore_block(block: nn.Module, linears: dict[str, nn.Linear], record: BlockRecord) -> None:
    """Put a recorded block's tensors back: its state, and each linear's weight as its integer
    weight dequantized (what the quantization pass left in it)."""
    named = {**dict(block.named_parameters()), **dict(block.named_buffers())}
    for name, value in record.state.items():
        named[name].data.copy_(value)
    for role, layer in linears.items():
        q = record.weights[role]
        layer.weight.data.copy_(q.dequantize().to(device=layer.weight.device, dtype=layer.weight.dtype))


class Journal:
    """The ``.resume`` folder of one partial artifact folder (see the module docstring)."""

    def __init__(self, partial: Path, run_fingerprint: str):
        self.folder = partial / RESUME_DIR
        self.fingerprint = run_fingerprint
        self.folder.mkdir(parents=True, exist_ok=True)
        recorded = self.fingerprint_of(partial)
        if recorded not in (None, run_fingerprint):  # edgeq.export.resume_folder picks matching ones
            raise ValueError(f"{partial} holds the records of another run")
        self.path = partial / JOURNAL_FILE
        self.finished: int = json.loads(self.path.read_text())["finished"] if self.path.is_file() else 0

    @staticmethod
    def fingerprint_of(partial: Path) -> str | None:
        """The fingerprint recorded in a partial folder (None when it recorded no block)."""
        path = partial / JOURNAL_FILE
        try:
            return json.loads(path.read_text())["fingerprint"] if path.is_file() else None
        except (json.JSONDecodeError, KeyError, TypeError):
            return "unreadable"  # matches no run: refused, never resumed from

    def _write_state(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "finished": self.finished}) + "\n")
        os.replace(tmp, self.path)

    def record(self, index: int, record: BlockRecord, streams: dict[str, list[torch.Tensor] | None]) -> None:
        """Record finished block ``index`` and the streams' hidden states entering the next block."""
        if index != self.finished:
            raise ValueError(f"block {index} recorded after {self.finished} finished blocks")
        block = {
            "weights": {role: _weight_to_dict(q) for role, q in record.weights.items()},
            "state": record.state,
            "layers": record.layers,
            "seconds": record.seconds,
            "output_rel_error": record.output_rel_error,
            "fallbacks": record.fallbacks,
            "clip_ratios": record.clip_ratios,
        }
        torch.save(block, self.folder / f"block_{index}.pt")
        torch.save({k: v for k, v in streams.items() if v is not None}, self.folder / f"streams_{index}.pt")
        self.finished = index + 1
        self._write_state()
        (self.folder / f"streams_{index - 1}.pt").unlink(missing_ok=True)

    def block(self, index: int) -> BlockRecord:
        data = torch.load(self.folder / f"block_{index}.pt", weights_only=True)
        weights = {role: QuantizedWeight(**q) for role, q in data.pop("weights").items()}
        return BlockRecord(weights=weights, **data)

    def streams(self) -> dict[str, list[torch.Tensor]]:
        """The hidden states entering block ``finished`` (by name in STREAMS; absent ones were None)."""
        return torch.load(self.folder / f"streams_{self.finished - 1}.pt", weights_only=True)

    def save_json(self, name: str, data: dict[str, Any]) -> None:
        (self.folder / f"{name}.json").write_text(json.dumps(data) + "\n")

    def load_json(self, name: str) -> dict[str, Any] | None:
        path = self.folder / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    @property
    def oac_folder(self) -> Path:
        return self.folder / "oac"

    def close(self) -> None:
        """The run finished its blocks' work: the records go, nothing of them is shipped."""
        shutil.rmtree(self.folder, ignore_errors=True)

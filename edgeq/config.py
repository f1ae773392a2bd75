"""Configuration dataclasses: one object per concern, serialized into every artifact.

A scheme (``w4a16``) is a preset of these objects; every field stays overridable from the CLI.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from edgeq.errors import EdgeqError

# ORT fuses a blocked int4 DequantizeLinear -> MatMul into MatMulNBits only for these block sizes.
SUPPORTED_GROUP_SIZES = (16, 32, 64, 128, 256)
PER_CHANNEL = -1


@dataclass(frozen=True)
class WeightQuantConfig:
    """How a linear weight [out, in] is put on an integer grid.

    group_size: consecutive input columns sharing one scale (and zero point); -1 = one per output row.
    A width that is not a multiple of the group size gets a shorter last group (ceil blocks), as
    ONNX blocked quantization defines it.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False

    def validate(self) -> None:
        if self.bits not in (2, 3, 4):
            raise EdgeqError(f"weight bits must be 2, 3 or 4 (int4 containers), got {self.bits}")
        if self.group_size != PER_CHANNEL and self.group_size not in SUPPORTED_GROUP_SIZES:
            sizes = ", ".join(str(s) for s in SUPPORTED_GROUP_SIZES)
            raise EdgeqError(
                f"group size {self.group_size} is not supported: use -1 (per channel) or one of {sizes}"
            )


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and with which algorithm."""

    scheme: str = "w4a16"
    method: str = "rtn"
    weights: WeightQuantConfig = field(default_factory=WeightQuantConfig)


@dataclass(frozen=True)
class CalibrationConfig:
    """Calibration text: ``num_sequences`` windows of ``seq_len`` tokens sampled with ``seed``.

    source: a .parquet (column ``text``), .jsonl (field ``text``) or plain-text file; None = the C4
    sample in the data folder.
    """

    source: str | None = None
    num_sequences: int = 64
    seq_len: int = 512
    seed: int = 0


@dataclass(frozen=True)
class EvalConfig:
    """Perplexity on non-overlapping windows of the WikiText-2 test string (no BOS token).

    max_windows: evaluate only the first N windows (None = the whole string).
    """

    text: str | None = None
    seq_len: int = 512
    max_windows: int | None = 40


@dataclass(frozen=True)
class ExportConfig:
    """Everything ``edgeq export`` did, written as ``edgeq_config.json`` into the artifact."""

    model: str
    quant: QuantConfig = field(default_factory=QuantConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    onnx_opset: int = 21
    format: str = "qdq"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExportConfig:
        quant = dict(data.get("quant", {}))
        quant["weights"] = WeightQuantConfig(**quant.get("weights", {}))
        return cls(
            model=data["model"],
            quant=QuantConfig(**quant),
            calibration=CalibrationConfig(**data.get("calibration", {})),
            evaluation=EvalConfig(**data.get("evaluation", {})),
            onnx_opset=data.get("onnx_opset", 21),
            format=data.get("format", "qdq"),
        )


SCHEMES: dict[str, QuantConfig] = {
    # Weight-only 4-bit, asymmetric group-128: what ORT's MatMulNBits runs natively.
    "w4a16": QuantConfig(scheme="w4a16", weights=WeightQuantConfig(bits=4, group_size=128, symmetric=False)),
}


def scheme_preset(name: str) -> QuantConfig:
    """The QuantConfig a scheme name stands for; a clear error for an unknown name."""
    try:
        return SCHEMES[name]
    except KeyError:
        raise EdgeqError(f"unknown scheme '{name}': choose one of {', '.join(SCHEMES)}") from None

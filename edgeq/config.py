"""Configuration dataclasses: one object per concern, serialized into every artifact.

A scheme (``w4a16``) is a preset of these objects; every field stays overridable from the CLI.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from edgeq.errors import EdgeqError

# ORT fuses a blocked int4 DequantizeLinear -> MatMul into MatMulNBits only for these block sizes.
SUPPORTED_GROUP_SIZES = (16, 32, 64, 128, 256)
PER_CHANNEL = -1


WEIGHT_BITS = (2, 3, 4, 8)  # 2-4 bits are stored in int4 containers


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
        if self.bits not in WEIGHT_BITS:
            raise EdgeqError(f"weight bits must be 2, 3, 4 (int4 containers) or 8, got {self.bits}")
        if self.group_size != PER_CHANNEL and self.group_size not in SUPPORTED_GROUP_SIZES:
            sizes = ", ".join(str(s) for s in SUPPORTED_GROUP_SIZES)
            raise EdgeqError(
                f"group size {self.group_size} is not supported: use -1 (per channel) or one of {sizes}"
            )


@dataclass(frozen=True)
class GPTQOptions:
    """GPTQ's knobs.

    percdamp: dampening λ = percdamp · mean(diag H) added to diag H.
    act_order: quantize columns in order of decreasing diag H (the groups stay the original column
    groups, their grids fixed before the sweep).
    clip_grid: shrink factors of the min-max range tried per (row, group), from 1 down to
    1 - max_shrink; the one with the smallest diag(H)-weighted rounding error wins (1 = no search).
    """

    percdamp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5


@dataclass(frozen=True)
class BoAOptions:
    """BoA's knobs (GPTQ's apply to its column sweeps and to o_proj and the MLP).

    row_block: output rows of every head quantized jointly (TurboBoA); 1 = exact row-by-row BoA.
    relaxed_v: W_V uses the plain input Hessian (no attention weighting), saving heads × d_in² memory.
    v_out_proj: W_V's row Hessian comes from o_proj (W_O,hᵀ W_O,h: its error is weighed where it
    reaches the residual stream); False = identity (the attention output before o_proj). Off by
    default: on SmolLM2 it moved W4 g128 from 33.10 to 33.40 and W4A4 from 58.25 to 57.50.
    row_percdamp: dampening of the row Hessians.
    alpha: strength of the correction for the error of the blocks quantized before (TurboBoA): each
    weight targets W X_fp, the output on the unquantized model's inputs, instead of W X (0 = off;
    needs a second, unquantized stream of block inputs).
    output_adaptive_columns: with OAC's Hessians (boa-oac, aespa), the column factor of W_Q, W_K and
    W_V is each projection's output-adaptive Hessian instead of 2E[x xᵀ] (W_V's attention-weighted
    one); the row factors stay attention-aware. Off by default: on SmolLM2 at W3 per channel it
    moved boa-oac from 62.48 to 64.08.
    """

    row_block: int = 16
    relaxed_v: bool = False
    v_out_proj: bool = False
    row_percdamp: float = 0.01
    alpha: float = 0.0
    output_adaptive_columns: bool = False


@dataclass(frozen=True)
class AespaOptions:
    """aespa's learned rounding of W_Q, W_K, W_V (``edgeq.quant.aespa``; o_proj and the MLP use OAC).

    iterations, lr: Adam steps and step size on the rounding variables of each projection.
    reg: weight λ of the regularizer that drives every rounding to 0 or 1 (its mean over the weights,
    against a loss scaled to 1 at the start).
    warmup: fraction of the steps without the regularizer; beta_start → beta_end its annealing.
    AdaRound's λ = 0.01 with a 20 % warm-up lets the relaxation settle on the continuous optimum,
    whose rounding ended 2.2-3.4 × above exact BoA's loss on the random layers of
    ``tests/test_aespa.py``; these defaults end at 0.80-0.90 × BoA's at 3 bits.
    row_percdamp: dampening of the row Hessians (as BoA's).
    """

    iterations: int = 500
    lr: float = 0.1
    reg: float = 4.0
    warmup: float = 0.0
    beta_start: float = 20.0
    beta_end: float = 2.0
    row_percdamp: float = 0.01


@dataclass(frozen=True)
class MixedPrecisionConfig:
    """APTQ-style mixed precision (``edgeq.quant.aptq``): each block linear gets its own weight width.

    avg_bits: the budget, a parameter-weighted average width over the block linears (None = every
    linear at ``weights.bits``). bit_choices: the widths a linear may get. widths: the allocation,
    linear module name → bits; filled by the export from the calibration data, and what the
    artifact's ``edgeq_config.json`` records.
    """

    avg_bits: float | None = None
    bit_choices: tuple[int, ...] = (2, 3, 4, 8)
    widths: dict[str, int] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.avg_bits is not None

    def validate(self) -> None:
        if not self.enabled:
            return
        for bits in self.bit_choices:
            if bits not in WEIGHT_BITS:
                raise EdgeqError(f"--bit-choices: {bits} is not a weight width; choose from 2, 3, 4, 8")
        low, high = min(self.bit_choices), max(self.bit_choices)
        if not low <= self.avg_bits <= high:
            raise EdgeqError(f"--avg-bits {self.avg_bits:g} is outside the bit choices' range {low}-{high}")


# compensate_rounding's correction is a least-squares fit of in_features² coefficients per linear;
# on fewer tokens per input channel it fits the calibration tokens' rounding noise (SmolLM2 w4a4
# GPTQ on 4 × 256 tokens, 0.7-1.8 per channel: perplexity 57.5 without it, 92.5 with it; on 32 × 512,
# 11-28 per channel, it gains: see ActQuantConfig below)
COMPENSATION_MIN_TOKENS_PER_CHANNEL = 8


@dataclass(frozen=True)
class ActQuantConfig:
    """Per-token dynamic fake quantization of the input of every block linear (not lm_head).

    bits: 16 = activations stay in float (weight-only schemes).
    symmetric: scale = clip_ratio · max|x| / (2^(bits-1) − 1) per token; otherwise an asymmetric
    [clip_ratio · min(x, 0), clip_ratio · max(x, 0)] range with a zero point.
    down_proj_bits: a different width for down_proj's input, the hardest activation (None = bits).
    kv_bits: keys (after RoPE) and values in the KV cache, asymmetric per token and head (16 = float).
    calibrate_quantized: the weights are calibrated on the quantized activations they will see (each
    block's own inputs and everything upstream); otherwise on float activations (QuaRot's recipe).
    clip_search: each input's clip ratio is searched on the calibration data
    (``edgeq.activation_ranges``; clip_ratio is then unused).
    shift: each quantized input loses its calibration mean before the grid and gets it back after,
    Q(x − μ) + μ (``edgeq.activation_ranges``: the mean direction every token shares takes no grid
    levels; two more ops per input in the graphs).
    kv_shift: with a quantized KV cache, keys (after R3) and values lose their per-head, per-channel
    calibration mean before the grid and get it back after (``edgeq.kv_cache``; two more ops per
    tensor in the graph). On in the w4a4 presets. SmolLM2, w4a4 + KV4 (benchmarks/w4a4.py's rows,
    seeds 0, 1, 2, 2026-12-07): BoA 46.81 46.81 46.61 (mean 46.74) → 45.42 46.23 46.17 (45.94),
    GPTQ (seed 0) 48.20 → 45.64.
    compensate_rounding: GPTQ and the BoA family fit each weight to what its linear computed before
    the activation grid: the least-squares target W* = W + W D H⁻¹ on the rounded inputs Q(x), with
    D = 2E[(x − Q(x)) Q(x)ᵀ] and H = 2E[Q(x) Q(x)ᵀ], is rounded in place of W
    (``edgeq.quant.methods.corrected_weight``; RTN and OAC refuse it). Nothing changes in the
    graph. It needs calibrate_quantized (otherwise x = Q(x) during calibration and D = 0) and
    enough calibration tokens per input channel (COMPENSATION_MIN_TOKENS_PER_CHANNEL; with fewer it
    fits their noise and is skipped); with BoA's FP stream (alpha > 0) the FP model's input is the
    target instead. On in the w4a4-down8 preset only (the CLI drops the preset's for RTN and OAC; a
    library caller replacing its method with one of them gets check_compensation's error). SmolLM2,
    32 × 512 calibration tokens, seeds 0, 1, 2 (benchmarks/w4a4.py's rows and evaluation, 2026-12-07):
      GPTQ               44.57 44.71 44.83 (mean 44.70) → 43.74 44.01 44.80 (44.18)
      GPTQ, w4a4-down8   41.29 42.64 42.25 (42.06)      → 40.90 40.20 40.84 (40.65)
      BoA                43.87 42.77 43.18 (43.27)      → 43.00 43.75 44.04 (43.60)
      BoA, w4a4-down8    40.64 41.32 41.40 (41.12)      → 39.96 39.55 40.95 (40.15)
      BoA, compensating only o_proj and the MLP (GPTQ's linears in BoA): 44.47 44.81 (seeds 0, 1).
    GPTQ gains on every seed. BoA, the presets' method, gains with down_proj's input at 8 bits (on
    every seed) and not with it at 4 (not explained); seeds spread by 1 to 2.
    """

    bits: int = 16
    symmetric: bool = True
    clip_ratio: float = 0.9
    down_proj_bits: int | None = None
    kv_bits: int = 16
    calibrate_quantized: bool = True
    clip_search: bool = False
    shift: bool = False
    compensate_rounding: bool = False
    kv_shift: bool = False

    @property
    def enabled(self) -> bool:
        return self.bits < 16

    @property
    def kv_shifted(self) -> bool:
        """Whether the KV cache is quantized with shifts (kv_shift has nothing to shift in float)."""
        return self.kv_shift and self.kv_bits < 16

    def bits_for(self, role: str) -> int:
        return self.down_proj_bits if role == "down" and self.down_proj_bits is not None else self.bits

    def validate(self) -> None:
        for bits in (self.bits, self.down_proj_bits, self.kv_bits):
            if bits is not None and bits not in (4, 8, 16):
                raise EdgeqError(f"activation and KV cache bits must be 4, 8 or 16 (off), got {bits}")
        if not 0 < self.clip_ratio <= 1:
            raise EdgeqError(f"activation clip ratio must be in (0, 1], got {self.clip_ratio}")


ROTATION_KINDS = ("hadamard", "learned")
# the weights inside the learned rotations' objective: on their grid (RTN, STE) or float
ROTATION_OBJECTIVE_WEIGHTS = ("float", "rtn")


@dataclass(frozen=True)
class RotationConfig:
    """QuaRot-style Hadamard rotations (each exact: the FP model's function is unchanged).

    r1: randomized Hadamard of the residual stream, fused into embedding, block linears and lm_head
    (norm scales folded into the linears first; lm_head untied from the embedding).
    r2: per-head randomized Hadamard between v_proj and o_proj, fused.
    r4: Hadamard on down_proj's input, applied online (a factored transform) and fused into down_proj.
    r3: Hadamard on queries and keys after RoPE, online; applied only when the KV cache is quantized.
    r5: Hadamard on o_proj's whole input (every head's attention output), applied online and fused
    into o_proj: R2 mixes channels within one head, R5 across heads, so a head whose outputs run
    larger than the others' no longer sets the per-token grid's range alone (QuaRot's online
    Hadamard before out_proj; edgeq's name). On in the W4A4 presets (benchmarks/w4a4.py's ablation
    row measures it against R4 alone), off by default elsewhere; it adds one online transform per
    block, as R4 does.
    seed: the random signs (and the random orthogonal fallback for widths with no known Hadamard).
    kind: "hadamard" (the randomized Hadamard matrices) or "learned": R1 and one R2 per block
    optimized from them on the quantized network's loss (SpinQuant, ``edgeq.rotation.learned``),
    ``steps`` Cayley SGD steps of step size ``lr`` (decaying linearly to 0), one window per step,
    cycling through the first ``samples`` calibration windows cut to their first ``seq_len`` tokens
    (short windows keep a step to seconds on a CPU). On SmolLM2 (per-token STE gradients of size
    ~50-100 on R1) the objective's loss rose at lr 0.05; with the w4a4 preset's shifts in the
    objective, learned R1/R2 then GPTQ (seed 0, 32 windows) reached 43.79 at lr 0.003, 42.58 at 0.01
    and 45.33 at 0.03 against 44.57 with the Hadamard, and 44.08 at 0.01 over 64 steps: single runs
    whose spread is the STE's noise, so 0.01 and 32 steps, the best measured.
    objective_weights: "rtn" rounds the rotated weights to their grid inside the objective (RTN with a
    straight-through gradient: the setting for ``method="rtn"``, which the CLI picks with it); "float"
    leaves them float, so only the activations are quantized (SpinQuant's recipe when GPTQ-like
    methods choose the integer weights afterwards: rotations fitted to RTN's rounding errors do not
    carry over to GPTQ's).
    """

    enabled: bool = False
    r1: bool = True
    r2: bool = True
    r4: bool = True
    r3: bool = True
    r5: bool = False
    seed: int = 0
    kind: str = "hadamard"
    steps: int = 32
    samples: int = 16
    lr: float = 0.01
    seq_len: int = 128
    objective_weights: str = "float"

    def validate(self) -> None:
        if self.objective_weights not in ROTATION_OBJECTIVE_WEIGHTS:
            raise EdgeqError(
                f"rotation objective weights must be one of {', '.join(ROTATION_OBJECTIVE_WEIGHTS)}, "
                f"got '{self.objective_weights}'"
            )
        if self.kind not in ROTATION_KINDS:
            raise EdgeqError(f"rotation must be one of {', '.join(ROTATION_KINDS)}, got '{self.kind}'")
        if self.steps < 1 or self.samples < 1 or not self.lr > 0:
            raise EdgeqError("rotation learning needs steps ≥ 1, samples ≥ 1 and a positive learning rate")


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and with which algorithm.

    quantize_embedding: also put the embedding table on the weights' grid (round to nearest).
    lm_head_bits: lm_head's grid, round to nearest with the weights' group size and symmetry (lm_head
    is untied from the embedding first); 16 = float. The presets use 8: at batch-1 decode a float
    lm_head is the largest read of every step (in SmolLM2 twice the bytes of all int4 blocks), and
    int8 costs it almost nothing in accuracy, where int4 costs a lot.
    """

    scheme: str = "w4a16"
    method: str = "boa"
    weights: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    activations: ActQuantConfig = field(default_factory=ActQuantConfig)
    rotation: RotationConfig = field(default_factory=RotationConfig)
    gptq: GPTQOptions = field(default_factory=GPTQOptions)
    boa: BoAOptions = field(default_factory=BoAOptions)
    aespa: AespaOptions = field(default_factory=AespaOptions)
    mixed: MixedPrecisionConfig = field(default_factory=MixedPrecisionConfig)
    quantize_embedding: bool = False
    lm_head_bits: int = 16

    def weights_for(self, linear_name: str) -> WeightQuantConfig:
        """The grid of one block linear: the mixed-precision width where one was allocated."""
        bits = self.mixed.widths.get(linear_name)
        return self.weights if bits is None else dataclasses.replace(self.weights, bits=bits)

    @property
    def lm_head_weights(self) -> WeightQuantConfig | None:
        """lm_head's grid, or None when it stays float."""
        if self.lm_head_bits >= 16:
            return None
        return dataclasses.replace(self.weights, bits=self.lm_head_bits)


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
    """Perplexity on non-overlapping windows of the WikiText-2 test string, with the model's BOS
    convention (``edgeq.data.bos_convention``).

    max_windows: evaluate only the first N windows (None = the whole string).
    """

    text: str | None = None
    seq_len: int = 512
    max_windows: int | None = 40


# Gates that catch a broken model whatever the scheme (see edgeq.validate.GATES for what each
# compares); CI sets its own, tighter ones (examples/ci-workflow.yml).
DEFAULT_GATES = {"perplexity_ratio": 2.0, "top1_agreement": 0.5, "size_ratio": 0.6}


@dataclass(frozen=True)
class ValidationConfig:
    """The checks ``edgeq export`` runs on its artifact at the end (``edgeq validate`` runs the same).

    providers: ONNX Runtime execution providers to try ("cpu", "cuda"); those missing here are
    skipped with the reason. threads: intra-op threads for the latency measurements; latency_runs
    timed runs (after one warm-up) of a 128-token prefill and decode_tokens greedy steps.
    """

    enabled: bool = True
    providers: tuple[str, ...] = ("cpu", "cuda")
    gates: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_GATES))
    threads: int = 2
    latency_runs: int = 5
    decode_tokens: int = 64


@dataclass(frozen=True)
class ExportConfig:
    """Everything ``edgeq export`` did, written as ``edgeq_config.json`` into the artifact."""

    model: str
    quant: QuantConfig = field(default_factory=QuantConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    onnx_opset: int = 21
    format: str = "qdq"
    # the qdq graph's form: "standard", or "openvino" (what OpenVINO's ONNX frontend reads)
    qdq_form: str = "standard"
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    # where calibration and quantization run ("cpu", "cuda", or "auto": CUDA when torch sees one)
    device: str = "auto"
    # the exported graph's float type ("float32" or "float16"; the CUDA provider needs float16)
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (tuples as lists), as ``edgeq_config.json`` holds them."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExportConfig:
        quant = dict(data.get("quant", {}))
        quant["weights"] = WeightQuantConfig(**quant.get("weights", {}))
        quant["gptq"] = GPTQOptions(**quant.get("gptq", {}))
        quant["boa"] = BoAOptions(**quant.get("boa", {}))
        quant["aespa"] = AespaOptions(**quant.get("aespa", {}))
        mixed = dict(quant.get("mixed", {}))
        if "bit_choices" in mixed:
            mixed["bit_choices"] = tuple(mixed["bit_choices"])
        quant["mixed"] = MixedPrecisionConfig(**mixed)
        quant["activations"] = ActQuantConfig(**quant.get("activations", {}))
        quant["rotation"] = RotationConfig(**quant.get("rotation", {}))
        if quant.pop("quantize_lm_head", False):  # edgeq_config.json before lm_head_bits
            quant.setdefault("lm_head_bits", quant["weights"].bits)
        return cls(
            model=data["model"],
            quant=QuantConfig(**quant),
            calibration=CalibrationConfig(**data.get("calibration", {})),
            evaluation=EvalConfig(**data.get("evaluation", {})),
            onnx_opset=data.get("onnx_opset", 21),
            format=data.get("format", "qdq"),
            qdq_form=data.get("qdq_form", "standard"),
            validation=_validation_from_dict(data.get("validation", {})),
            device=data.get("device", "auto"),
            dtype=data.get("dtype", "float32"),
        )


def _validation_from_dict(data: dict[str, Any]) -> ValidationConfig:
    data = dict(data)
    if "providers" in data:
        data["providers"] = tuple(data["providers"])
    return ValidationConfig(**data)


SCHEMES: dict[str, QuantConfig] = {
    # Weight-only 4-bit, asymmetric group-128: what ORT's MatMulNBits runs natively.
    # Every preset keeps the embedding float and puts lm_head on an 8-bit grid (see lm_head_bits).
    "w4a16": QuantConfig(
        scheme="w4a16", weights=WeightQuantConfig(bits=4, group_size=128, symmetric=False), lm_head_bits=8
    ),
    "w3a16": QuantConfig(
        scheme="w3a16", weights=WeightQuantConfig(bits=3, group_size=-1, symmetric=False), lm_head_bits=8
    ),
    # QuaRot-style W4A4: rotations on, per-channel asymmetric int4 weights (an integer kernel pays one
    # zero-point term per token for them), per-token asymmetric int4 activations (KV cache in float;
    # with --kv-bits, keys and values shifted too), each input shifted by its calibration mean and its
    # clip ratio searched (benchmarks/w4a4.py); R5 mixes o_proj's input across heads.
    "w4a4": QuantConfig(
        scheme="w4a4",
        weights=WeightQuantConfig(bits=4, group_size=-1, symmetric=False),
        activations=ActQuantConfig(
            bits=4, symmetric=False, clip_ratio=0.9, clip_search=True, shift=True, kv_shift=True
        ),
        rotation=RotationConfig(enabled=True, r5=True),
        lm_head_bits=8,
    ),
}
# w4a4 with down_proj's input at 8 bits: the hardest activation (the MLP's product, heavy-tailed
# even after R4) gets an int8 grid, the other six inputs stay int4. Here the weights compensate the
# activations' rounding: over three seeds it lowered both GPTQ and BoA (see ActQuantConfig).
SCHEMES["w4a4-down8"] = dataclasses.replace(
    SCHEMES["w4a4"],
    scheme="w4a4-down8",
    activations=dataclasses.replace(SCHEMES["w4a4"].activations, down_proj_bits=8, compensate_rounding=True),
)
# 4-bit weights with 8-bit per-token activations, for the NPUs that run int8 activations.
SCHEMES["w4a8"] = dataclasses.replace(
    SCHEMES["w4a4"], scheme="w4a8", activations=dataclasses.replace(SCHEMES["w4a4"].activations, bits=8)
)


def scheme_preset(name: str) -> QuantConfig:
    """The QuantConfig a scheme name stands for; a clear error for an unknown name."""
    try:
        return SCHEMES[name]
    except KeyError:
        raise EdgeqError(f"unknown scheme '{name}': choose one of {', '.join(SCHEMES)}") from None

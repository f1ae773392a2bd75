"""llm-compressor's GPTQ recipes on a Hugging Face model, run in the llm-compressor virtual
environment by ``benchmarks/compare.py``:

    /work/venvs/llmcompressor/bin/python benchmarks/peers/llmcompressor_run.py \\
        --model-dir DIR --data FILE --out DIR --recipe gptq-g128|gptq-pc|w4a4|w4a4-pc

Recipes, lm_head left float as in all the toolkit's examples:

    gptq-g128   GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]): the preset, int4
                weights, symmetric, group 128
    gptq-pc     the same with one scale per output channel (strategy "channel"): llm-compressor
                refuses group 128 on a linear whose input width is not a multiple of 128 (SmolLM2's
                576), so this is what a SmolLM2 user falls back to; it pairs with edgeq's per-channel
                GPTQ row
    w4a4        SpinQuantModifier(rotations=["R1", "R2", "R4"], transform_type="hadamard",
                transform_block_size=64), then GPTQModifier(scheme="W4A4"): the preset, int4 weights
                (symmetric, group 128) on the rotated model and every linear input on a dynamic
                per-token symmetric int4 grid. Block 64 as in the toolkit's SpinQuant example: its
                Sylvester Hadamard needs a power-of-two size, and SmolLM2's 576 and 1536 are
                multiples of 64
    w4a4-pc     the same with per-channel weights (what QuaRot and SpinQuant use, and edgeq's w4a4)

``oneshot`` runs on the CPU with the calibration windows of ``--data`` as a dataset of token ids (one
window per sample, no shuffling: the order edgeq uses). The quantized model stays in the toolkit's
fake-quantized form, whose forward pass applies the online R4 rotation and the activation
quantization; result.json gets the NLL of every evaluation window through that forward pass (float32).
For the weight-only recipes weights.safetensors also gets every quantized linear's weight as that
forward pass quantizes it, for compare.py to score in edgeq's float model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peer_io import PeerResult, load_windows, parse_args, run, save_weights, score, timed, versions

RECIPES = ("gptq-g128", "gptq-pc", "w4a4", "w4a4-pc")
WEIGHT_ONLY = ("gptq-g128", "gptq-pc")
SPINQUANT = {"rotations": ["R1", "R2", "R4"], "transform_type": "hadamard", "transform_block_size": 64}
# the presets' int4 weight grid with one scale per output channel instead of per 128 columns
INT4_CHANNEL = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
INT4_TOKEN = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}


def gptq_settings(name: str) -> dict:
    """GPTQModifier's arguments for one recipe: a preset scheme, or the preset's grids per channel."""
    settings: dict = {"ignore": ["lm_head"]}
    if name in ("gptq-g128", "w4a4"):
        return {"targets": "Linear", "scheme": "W4A16" if name == "gptq-g128" else "W4A4", **settings}
    group = {"targets": ["Linear"], "weights": INT4_CHANNEL}
    if name == "w4a4-pc":
        group["input_activations"] = INT4_TOKEN
    return {"config_groups": {"group_0": group}, **settings}


def recipe_for(name: str) -> tuple[list, dict]:
    """The modifiers of one recipe and their settings (for result.json)."""
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.transform import SpinQuantModifier

    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name}: choose among {', '.join(RECIPES)}")
    gptq = gptq_settings(name)
    if name in WEIGHT_ONLY:
        return [GPTQModifier(**gptq)], {"GPTQModifier": gptq}
    return [SpinQuantModifier(**SPINQUANT), GPTQModifier(**gptq)], {
        "SpinQuantModifier": SPINQUANT,
        "GPTQModifier": gptq,
    }


def quantized_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every quantized linear's weight [out, in] as its fake-quantized forward pass uses it."""
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    weights = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if isinstance(module, torch.nn.Linear) and scheme is not None and scheme.weights is not None:
            if module.quantization_status >= QuantizationStatus.COMPRESSED:
                raise RuntimeError(f"{name} is compressed: its weight is not the dequantized one")
            with torch.no_grad():
                weights[f"{name}.weight"] = forward_quantize(
                    module, module.weight.data, "weight", scheme.weights
                )
    return weights


def body(result: PeerResult, model_dir: Path, data: Path, recipe_name: str, out: Path) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    calibration, evaluation = load_windows(data)
    recipe, settings = recipe_for(recipe_name)
    result.settings = {"recipe": settings, "device": "cpu", "dtype": "float32", "lm_head": "float"}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    dataset = Dataset.from_list(
        [{"input_ids": ids.tolist(), "attention_mask": [1] * len(ids)} for ids in calibration]
    )
    samples, length = calibration.shape
    oneshot_args = {"max_seq_length": length, "num_calibration_samples": samples,
                    "shuffle_calibration_samples": False}  # fmt: skip
    result.settings["oneshot"] = oneshot_args
    timed(result, lambda: oneshot(model=model, dataset=dataset, recipe=recipe, **oneshot_args))
    model.eval()
    if recipe_name in WEIGHT_ONLY:
        save_weights(result, out, quantized_weights(model))
    score(result, model, evaluation)


def main() -> int:
    args = parse_args(__doc__, RECIPES)
    result = PeerResult("llmcompressor", args.recipe, versions("llmcompressor", "compressed-tensors"))
    return run(result, args.out, lambda r: body(r, args.model_dir, args.data, args.recipe, args.out))


if __name__ == "__main__":
    sys.exit(main())

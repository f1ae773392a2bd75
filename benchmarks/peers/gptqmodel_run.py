"""GPTQModel's GPTQ (4 bits, group 128, the toolkit's other defaults) on a Hugging Face model, run in
the GPTQModel virtual environment by ``benchmarks/compare.py``:

    /work/venvs/gptqmodel/bin/python benchmarks/peers/gptqmodel_run.py --model-dir DIR --data FILE --out DIR

Quantizes on the CPU with the calibration windows of ``--data`` (fed as token ids, one window per
sample), saves the GPTQ checkpoint and loads it back with GPTQModel's torch kernel as a user does,
then writes result.json (time and peak RSS of the ``quantize`` call) and weights.safetensors (each
quantized linear dequantized from its packed codes) for compare.py to score in edgeq's float model.

The evaluation windows are not run through GPTQModel's own forward pass here: its CPU kernel takes
float16 or bfloat16 activations only, and float16 matmuls on a CPU without native half-precision
arithmetic ran 9 times slower than float32 (about 2.5 minutes per 512-token window on a 2-core
machine). Instead every quantized linear's kernel output on a random input is compared with the
dequantized weight's matmul (``kernel_check``), which is what ties the saved weights to the kernel.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
from pathlib import Path

import torch
from peer_io import PeerResult, load_windows, parse_args, run, save_weights, timed, versions

BITS, GROUP_SIZE = 4, 128
# GPTQModel 7.6 gives its CPU pool (cores + 1) // 2 workers, then asks 2 of them for its model-loader
# pool: on a 2-core machine that raises "requests 2 workers but parent 'cpu' only has 1"
CPU_WORKERS = "2"


def dequantized_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every GPTQModel quantized linear's weight [out, in] under its Hugging Face state-dict name:
    its packed int4 codes and zero points times its scales (float16 in the checkpoint), computed in
    float32 so that the product is the stored model's exact value."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseQuantLinear):
            scales = module.scales
            module.scales = scales.float()  # dequantize_weight computes in the scales' dtype
            try:
                weights[f"{name}.weight"] = module.dequantize_weight().T.float()  # GPTQ's layout is [in, out]
            finally:
                module.scales = scales
    return weights


def load_quantized(checkpoint: Path) -> torch.nn.Module:
    """The saved GPTQ checkpoint loaded for inference as a user does, with GPTQModel's torch kernel
    (the one that runs on the CPU; it takes float16 or bfloat16 activations: float16, the closer to
    float32). Returns the Hugging Face model inside."""
    from gptqmodel import BACKEND, GPTQModel

    quantized = GPTQModel.load(str(checkpoint), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    return quantized.model.eval()


def kernel_check(model: torch.nn.Module, weights: dict[str, torch.Tensor], tokens: int = 8) -> dict:
    """Largest relative error, over the quantized linears, between the toolkit's kernel output on a
    random float16 input [tokens, in] and the same input times the dequantized weight in float32."""
    generator = torch.Generator().manual_seed(0)
    worst, worst_name = 0.0, None
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, weight in weights.items():
            module = modules[key.removesuffix(".weight")]
            x = torch.randn(tokens, weight.shape[1], generator=generator).half()
            reference = x.float() @ weight.T
            if getattr(module, "bias", None) is not None:
                reference = reference + module.bias.float()
            error = float((module(x).float() - reference).norm() / reference.norm())
            if error > worst:
                worst, worst_name = error, key
    return {"max_relative_error": worst, "layer": worst_name, "tokens": tokens, "dtype": "float16"}


def body(result: PeerResult, model_dir: Path, data: Path, out: Path) -> None:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", CPU_WORKERS)  # read when gptqmodel is imported
    from gptqmodel import GPTQModel, QuantizeConfig

    calibration, _ = load_windows(data)
    config = QuantizeConfig(bits=BITS, group_size=GROUP_SIZE)
    result.settings = {
        "quantize_config": config.to_dict(), "device": "cpu", "dtype": "float32", "lm_head": "float",
        "GPTQMODEL_CPU_WORKERS": os.environ["GPTQMODEL_CPU_WORKERS"],
    }  # fmt: skip
    model = GPTQModel.load(str(model_dir), config, device="cpu", dtype=torch.float32)
    samples = [{"input_ids": ids.tolist(), "attention_mask": [1] * len(ids)} for ids in calibration]
    timed(result, functools.partial(model.quantize, samples, batch_size=1))
    # quantize() leaves the layers offloaded to disk: save the checkpoint and load it back
    checkpoint = out / "checkpoint"
    model.save(str(checkpoint))
    del model
    result.settings["checkpoint_bytes"] = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    torch._dynamo.config.disable = True  # the kernel's torch.compile recompiles for every layer shape
    quantized = load_quantized(checkpoint)
    weights = dequantized_weights(quantized)
    result.settings["kernel_check"] = kernel_check(quantized, weights)
    save_weights(result, out, weights)
    shutil.rmtree(checkpoint)


def main() -> int:
    args = parse_args(__doc__, ("gptq-g128",))
    result = PeerResult("gptqmodel", args.recipe, versions("gptqmodel"))
    return run(result, args.out, lambda r: body(r, args.model_dir, args.data, args.out))


if __name__ == "__main__":
    sys.exit(main())

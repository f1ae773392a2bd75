"""W4A4 on one model: what rotations and each weight method buy, and what limits the rest.

    python benchmarks/w4a4.py                      # SmolLM2, the settings the README shows

Main table (the w4a4 scheme: per-channel symmetric int4 weights, per-token symmetric int4
activations with clip 0.9, KV cache in float): no rotation + RTN, rotation + RTN / GPTQ / BoA.
Limits table: one quantized model evaluated under other activation settings (its weights were
calibrated on the w4a4 activations; re-calibrating for each setting would move each row a little):
FP weights with int4 activations isolate the activations' share, A16 the weights' share;
asymmetric activations, clip 1.0 and an 8-bit down_proj input show what moves it.

Writes benchmarks/results/w4a4.json (with machine and versions) and w4a4.md, and puts the tables into
README.md between the W4A4 markers. Every number comes from this run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from common import add_data_arguments, load_data, publish, save_results

from edgeq.config import ActQuantConfig, RotationConfig, scheme_preset
from edgeq.evaluation import perplexity, torch_logits_fn
from edgeq.latency import PeakRSS
from edgeq.models.adapters import adapter_for
from edgeq.models.loading import load_model
from edgeq.pipeline import enable_activation_quantization, quantize_model
from edgeq.rotation.rotate import rotate_model

README_MARKER = "w4a4 results"
DEFAULT_ACT = scheme_preset("w4a4").activations
# (label, rotation on, weight method or None for FP weights)
MAIN_ROWS = (
    ("no rotation + RTN", False, "rtn"),
    ("rotation + RTN", True, "rtn"),
    ("rotation + GPTQ", True, "gptq"),
    ("rotation + BoA", True, "boa"),
)
ACT_VARIANTS = {
    "A4 sym, clip 0.9 (w4a4 default)": DEFAULT_ACT,
    "A4 sym, clip 1.0": dataclasses.replace(DEFAULT_ACT, clip_ratio=1.0),
    "A4 asym, clip 1.0": dataclasses.replace(DEFAULT_ACT, symmetric=False, clip_ratio=1.0),
    "A4, down_proj input A8": dataclasses.replace(DEFAULT_ACT, down_proj_bits=8),
    "A16 (activations in float)": ActQuantConfig(bits=16),
}
# the models whose activation variants are measured: FP weights (rotated) and rotation + BoA
VARIANT_MODELS = ("rotation, FP weights", "rotation + BoA")


def _quantized(source, data, rotate: bool, method: str | None):
    """A fresh model, rotated or not, with weights quantized by ``method`` (None: left in float);
    activation quantization as the w4a4 scheme sets it. Returns (model, seconds, peak RSS, config)."""
    model = load_model(source)
    adapter = adapter_for(model)
    config = dataclasses.replace(
        scheme_preset("w4a4"), method=method or "rtn", rotation=RotationConfig(enabled=rotate)
    )
    with PeakRSS() as peak:
        start = time.perf_counter()
        rotation = rotate_model(model, adapter, config.rotation)
        if method is None:
            enable_activation_quantization(model, adapter, config.activations)
        else:
            quantize_model(model, adapter, config, data.calibration)
        seconds = time.perf_counter() - start
    return model, seconds, peak.peak, config, dataclasses.asdict(rotation)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_data_arguments(parser)
    args = parser.parse_args(argv)
    if args.render:
        write_tables(json.loads((args.out / "w4a4.json").read_text()), args.out, not args.no_readme)
        return

    source, data = load_data(args)
    windows = data.evaluation
    fp_ppl = perplexity(torch_logits_fn(load_model(source)), windows, "FP")
    print(f"FP ppl {fp_ppl:.3f}", flush=True)
    rows, variants, rotation_report = [], [], None
    for label, rotate, method in (("rotation, FP weights", True, None), *MAIN_ROWS):
        model, seconds, peak, config, rotation = _quantized(source, data, rotate, method)
        rotation_report = rotation if rotate else rotation_report
        if method is not None:
            ppl = perplexity(torch_logits_fn(model), windows, label)
            rows.append({"label": label, "perplexity": ppl, "seconds": seconds, "peak_rss_bytes": peak,
                         "config": dataclasses.asdict(config)})  # fmt: skip
            print(f"{label:24s} ppl {ppl:10.3f}  {seconds:6.1f} s  {peak / 2**30:.2f} GiB", flush=True)
        if label in VARIANT_MODELS:
            adapter = adapter_for(model)
            for name, act in ACT_VARIANTS.items():
                enable_activation_quantization(model, adapter, act)
                ppl = perplexity(torch_logits_fn(model), windows, f"{label} / {name}")
                variants.append({"weights": label, "activations": name, "perplexity": ppl,
                                 "config": dataclasses.asdict(act)})  # fmt: skip
                print(f"{label:24s} {name:32s} ppl {ppl:10.3f}", flush=True)
        del model
    results = save_results(
        args,
        "w4a4",
        windows,
        fp_perplexity=fp_ppl,
        rotation=rotation_report,
        rows=rows,
        activation_variants=variants,
    )
    write_tables(results, args.out, not args.no_readme)


def markdown(results: dict) -> str:
    s, fp = results["settings"], results["fp_perplexity"]
    rotation = ", ".join(f"{k.upper()} {v}" for k, v in results["rotation"]["applied"].items())
    lines = [
        f"Model `{results['model']}`, FP perplexity **{fp:.2f}**. Calibration: {s['calib_samples']} × "
        f"{s['calib_seq_len']} tokens of C4 (seed {s['seed']}); evaluation: WikiText-2 test, "
        f"{results['eval_windows']} windows of {s['eval_seq_len']} tokens, no BOS; PyTorch fake-quant; "
        f"{results['machine']['cpus']} CPU threads. W4A4: per-channel symmetric int4 weights, per-token "
        f"symmetric int4 activations (clip 0.9) on every block linear's input, KV cache and lm_head in "
        f"float. Rotations: {rotation}.",
        "",
        "| W4A4 | perplexity | gap to FP | quantization time (s) | peak RSS (GiB) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['label']} | {row['perplexity']:.2f} | {row['perplexity'] - fp:+.2f} | "
            f"{row['seconds']:.0f} | {row['peak_rss_bytes'] / 2**30:.2f} |"
        )
    by_label = {r["label"]: r for r in results["rows"]}
    rtn, boa = by_label.get("rotation + RTN"), by_label.get("rotation + BoA")
    if rtn and boa:
        ratio = (boa["perplexity"] - fp) / (rtn["perplexity"] - fp)
        lines += ["", f"Rotation + BoA's gap to FP is {ratio:.2f} × rotation + RTN's."]
    lines += [
        "",
        "What limits W4A4 here: the same weights under other activation settings.",
        "",
        "| weights | activations | perplexity | gap to FP |",
        "| --- | --- | ---: | ---: |",
    ]
    for v in results["activation_variants"]:
        lines.append(
            f"| {v['weights']} | {v['activations']} | {v['perplexity']:.2f} | {v['perplexity'] - fp:+.2f} |"
        )
    lines += ["", f"Produced by `{results['command']}` on {results['date']}."]
    return "\n".join(lines) + "\n"


def write_tables(results: dict, out: Path, readme: bool) -> None:
    publish(markdown(results), out / "w4a4.md", README_MARKER, readme)


if __name__ == "__main__":
    main()

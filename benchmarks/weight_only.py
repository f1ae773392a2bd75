"""Weight-only quantization of one model with RTN, GPTQ, BoA, OAC, BoA-OAC and aespa, and APTQ's mixed
precision at average widths: perplexity, wall time, peak memory, weight bytes.

    python benchmarks/weight_only.py                      # SmolLM2, the settings the README shows
    python benchmarks/weight_only.py --eval-windows all   # the whole WikiText-2 test string

Writes benchmarks/results/weight_only.json (with machine and versions) and weight_only.md, and puts
the table into README.md between the weight-only markers. Every number comes from this run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from common import add_data_arguments, load_data, publish, save_results

from edgeq.config import PER_CHANNEL, MixedPrecisionConfig, QuantConfig, WeightQuantConfig
from edgeq.evaluation import perplexity, torch_logits_fn
from edgeq.latency import PeakRSS
from edgeq.models.adapters import adapter_for
from edgeq.models.loading import load_model
from edgeq.pipeline import quantize_model
from edgeq.quant.aptq import average_bits
from edgeq.quant.methods import needs_output_hessians
from edgeq.quant.oac import collect_output_hessians

SETTINGS = {
    "W4 per-channel": WeightQuantConfig(bits=4, group_size=PER_CHANNEL),
    "W4 g128": WeightQuantConfig(bits=4, group_size=128),
    "W3 per-channel": WeightQuantConfig(bits=3, group_size=PER_CHANNEL),
}
METHODS = ("rtn", "gptq", "boa", "oac", "boa-oac", "aespa")
# APTQ rows: widths from {2, 3, 4, 8} averaging at most these bits, on the per-channel grid
APTQ_BUDGETS = (3.5, 3.0)
APTQ_GRID = "W3 per-channel"
NAMES = {"boa": "BoA", "oac": "OAC", "boa-oac": "BoA-OAC", "aespa": "aespa"}  # the methods compared with GPTQ
README_MARKER = "weight-only results"


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [
        f"Model `{results['model']}`, FP perplexity **{results['fp_perplexity']:.2f}**. "
        f"Calibration: {s['calib_samples']} × {s['calib_seq_len']} tokens of C4 (seed {s['seed']}); "
        f"evaluation: WikiText-2 test, {results['eval_windows']} windows of {s['eval_seq_len']} tokens, "
        f"no BOS; asymmetric grids; PyTorch fake-quant; {results['machine']['cpus']} CPU threads.",
        "",
        "| setting | method | perplexity | gap to FP | quantization time (s) | peak RSS (GiB) | weight MB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["rows"]:
        size = f"{row['weight_bytes'] / 1e6:.2f}" if "weight_bytes" in row else "—"
        lines.append(
            f"| {row['setting']} | {row['method']} | {row['perplexity']:.2f} | "
            f"{row['perplexity'] - results['fp_perplexity']:+.2f} | {row['seconds']:.0f} | "
            f"{row['peak_rss_bytes'] / 2**30:.2f} | {size} |"
        )
    by_key = {(r["setting"], r["method"]): r for r in results["rows"]}
    lines.append("")
    fp = results["fp_perplexity"]
    for setting in dict.fromkeys(r["setting"] for r in results["rows"]):
        gptq = by_key.get((setting, "gptq"))
        for method, name in NAMES.items():
            row = by_key.get((setting, method))
            if row and gptq:
                gap = (row["perplexity"] - fp) / (gptq["perplexity"] - fp)
                lines.append(
                    f"- {setting}: {name}'s gap to FP is {gap:.2f} × GPTQ's; "
                    f"{name}'s quantization time {row['seconds'] / gptq['seconds']:.2f} × GPTQ's."
                )
    for row in results["rows"]:
        uniform = by_key.get((APTQ_GRID, row["method"]))
        if "avg_bits" in row and uniform:
            size = row["weight_bytes"] / uniform["weight_bytes"] - 1
            lines.append(
                f"- {row['setting']} ({row['method']}, {row['allocated_bits']:.3f} allocated): perplexity "
                f"{row['perplexity']:.2f} against {uniform['perplexity']:.2f} for uniform W3 with the same "
                f"objective; weight bytes {size:+.1%} against uniform W3's."
            )
    lines.append("")
    lines.append(
        "Weight MB counts the block linears' codes at their own width, float32 scales and zero points. "
        "APTQ rows: widths from {2, 3, 4, 8} on per-channel grids, allocated by OAC's Hessian traces."
    )
    lines.append("")
    lines.append(f"Produced by `{results['command']}` on {results['date']}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_data_arguments(parser)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument(
        "--aptq-budgets",
        default=",".join(map(str, APTQ_BUDGETS)),
        help="average bits of the APTQ rows ('' = none)",
    )
    # BoA: the objective with the lowest uniform-W3 perplexity measured (the "best objective")
    parser.add_argument("--aptq-method", default="boa", help="the objective of the APTQ rows")
    args = parser.parse_args(argv)
    if args.render:
        write_tables(json.loads((args.out / "weight_only.json").read_text()), args.out, not args.no_readme)
        return

    source, data = load_data(args)
    calib, windows = data.calibration, data.evaluation
    fp_model = load_model(source)
    fp_ppl = perplexity(torch_logits_fn(fp_model), windows, "FP")
    runs = [
        (setting, QuantConfig(method=method, weights=SETTINGS[setting]))
        for setting in filter(None, args.settings.split(","))
        for method in filter(None, args.methods.split(","))
    ]
    for budget in (float(b) for b in args.aptq_budgets.split(",") if b):
        mixed = MixedPrecisionConfig(avg_bits=budget)
        config = QuantConfig(method=args.aptq_method, weights=SETTINGS[APTQ_GRID], mixed=mixed)
        runs.append((f"APTQ {budget:g} bits", config))
    # OAC's Hessians depend on the float model and the calibration only: collected once, their time
    # added to every row that uses them, as if each had collected its own
    output_hessians, gradient_seconds = None, 0.0
    if any(needs_output_hessians(config) for _, config in runs):
        start = time.perf_counter()
        output_hessians = collect_output_hessians(fp_model, adapter_for(fp_model), calib)
        gradient_seconds = time.perf_counter() - start
    del fp_model
    rows = [run_row(source, setting, config, calib, windows, output_hessians, gradient_seconds)
            for setting, config in runs]  # fmt: skip
    results = save_results(args, "weight_only", windows, fp_perplexity=fp_ppl, rows=rows)
    write_tables(results, args.out, not args.no_readme)


def run_row(
    source, setting: str, config: QuantConfig, calib, windows, output_hessians, gradient_seconds
) -> dict:
    """Quantize a fresh copy of the model with ``config``; its row."""
    model = load_model(source)
    reuse = output_hessians if needs_output_hessians(config) else None
    with PeakRSS() as peak:
        start = time.perf_counter()
        result = quantize_model(model, adapter_for(model), config, calib, output_hessians=reuse)
        seconds = time.perf_counter() - start + (gradient_seconds if reuse else 0.0)
    ppl = perplexity(torch_logits_fn(model), windows, f"{setting} {config.method}")
    row = {"setting": setting, "method": config.method, "perplexity": ppl, "seconds": seconds,
           "peak_rss_bytes": peak.peak, "weight_bytes": sum(q.storage_bytes for q in result.weights.values()),
           "config": dataclasses.asdict(config)}  # fmt: skip
    if config.mixed.enabled:
        sizes = {name: q.codes.numel() for name, q in result.weights.items()}
        row["avg_bits"] = config.mixed.avg_bits
        row["allocated_bits"] = average_bits(result.widths, sizes)
        row["config"]["mixed"]["widths"] = result.widths
    print(f"{setting:16s} {config.method:7s} ppl {ppl:8.3f}  {seconds:6.1f} s  {peak.peak / 2**30:.2f} GiB",
          flush=True)  # fmt: skip
    return row


def write_tables(results: dict, out: Path, readme: bool) -> None:
    publish(markdown(results), out / "weight_only.md", README_MARKER, readme)


if __name__ == "__main__":
    main()

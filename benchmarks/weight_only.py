"""Weight-only quantization of one model with RTN, GPTQ, BoA, OAC and BoA-OAC: perplexity, wall time,
peak memory.

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

from edgeq.config import PER_CHANNEL, QuantConfig, WeightQuantConfig
from edgeq.evaluation import perplexity, torch_logits_fn
from edgeq.latency import PeakRSS
from edgeq.models.adapters import adapter_for
from edgeq.models.loading import load_model
from edgeq.pipeline import quantize_model

SETTINGS = {
    "W4 per-channel": WeightQuantConfig(bits=4, group_size=PER_CHANNEL),
    "W4 g128": WeightQuantConfig(bits=4, group_size=128),
    "W3 per-channel": WeightQuantConfig(bits=3, group_size=PER_CHANNEL),
}
METHODS = ("rtn", "gptq", "boa", "oac", "boa-oac")
NAMES = {"boa": "BoA", "oac": "OAC", "boa-oac": "BoA-OAC"}  # the methods compared with GPTQ
README_MARKER = "weight-only results"


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [
        f"Model `{results['model']}`, FP perplexity **{results['fp_perplexity']:.2f}**. "
        f"Calibration: {s['calib_samples']} × {s['calib_seq_len']} tokens of C4 (seed {s['seed']}); "
        f"evaluation: WikiText-2 test, {results['eval_windows']} windows of {s['eval_seq_len']} tokens, "
        f"no BOS; asymmetric grids; PyTorch fake-quant; {results['machine']['cpus']} CPU threads.",
        "",
        "| setting | method | perplexity | gap to FP | quantization time (s) | peak RSS (GiB) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['setting']} | {row['method']} | {row['perplexity']:.2f} | "
            f"{row['perplexity'] - results['fp_perplexity']:+.2f} | {row['seconds']:.0f} | "
            f"{row['peak_rss_bytes'] / 2**30:.2f} |"
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
    args = parser.parse_args(argv)
    if args.render:
        write_tables(json.loads((args.out / "weight_only.json").read_text()), args.out, not args.no_readme)
        return

    source, data = load_data(args)
    calib, windows = data.calibration, data.evaluation
    fp_model = load_model(source)
    fp_ppl = perplexity(torch_logits_fn(fp_model), windows, "FP")
    del fp_model
    rows = []
    for setting in args.settings.split(","):
        for method in args.methods.split(","):
            model = load_model(source)
            config = QuantConfig(method=method, weights=SETTINGS[setting])
            with PeakRSS() as peak:
                start = time.perf_counter()
                quantize_model(model, adapter_for(model), config, calib)
                seconds = time.perf_counter() - start
            ppl = perplexity(torch_logits_fn(model), windows, f"{setting} {method}")
            rows.append({"setting": setting, "method": method, "perplexity": ppl, "seconds": seconds,
                         "peak_rss_bytes": peak.peak, "config": dataclasses.asdict(config)})  # fmt: skip
            print(
                f"{setting:16s} {method:5s} ppl {ppl:8.3f}  {seconds:6.1f} s  {peak.peak / 2**30:.2f} GiB",
                flush=True,
            )
            del model
    results = save_results(args, "weight_only", windows, fp_perplexity=fp_ppl, rows=rows)
    write_tables(results, args.out, not args.no_readme)


def write_tables(results: dict, out: Path, readme: bool) -> None:
    publish(markdown(results), out / "weight_only.md", README_MARKER, readme)


if __name__ == "__main__":
    main()

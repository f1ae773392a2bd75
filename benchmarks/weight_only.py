"""Weight-only quantization of one model with RTN, GPTQ and BoA: perplexity, wall time, peak memory.

    python benchmarks/weight_only.py                      # SmolLM2, the settings the README shows
    python benchmarks/weight_only.py --eval-windows all   # the whole WikiText-2 test string

Writes benchmarks/results/weight_only.json (with machine and versions) and weight_only.md, and puts
the table into README.md between the weight-only markers. Every number comes from this run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import re
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

import edgeq
from edgeq.config import PER_CHANNEL, CalibrationConfig, EvalConfig, QuantConfig, WeightQuantConfig
from edgeq.data import prepare_text_data
from edgeq.evaluation import perplexity, torch_logits_fn
from edgeq.models.adapters import adapter_for
from edgeq.models.loading import load_model, load_tokenizer, resolve_model
from edgeq.pipeline import quantize_model

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "W4 per-channel": WeightQuantConfig(bits=4, group_size=PER_CHANNEL),
    "W4 g128": WeightQuantConfig(bits=4, group_size=128),
    "W3 per-channel": WeightQuantConfig(bits=3, group_size=PER_CHANNEL),
}
METHODS = ("rtn", "gptq", "boa")


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


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
    for setting in dict.fromkeys(r["setting"] for r in results["rows"]):
        boa, gptq = by_key.get((setting, "boa")), by_key.get((setting, "gptq"))
        if boa and gptq:
            fp = results["fp_perplexity"]
            gap = (boa["perplexity"] - fp) / (gptq["perplexity"] - fp)
            lines.append(
                f"- {setting}: BoA's gap to FP is {gap:.2f} × GPTQ's; "
                f"BoA's quantization time {boa['seconds'] / gptq['seconds']:.2f} × GPTQ's."
            )
    lines.append("")
    lines.append(f"Produced by `{results['command']}` on {results['date']}.")
    return "\n".join(lines) + "\n"


def update_readme(table: str, readme: Path = ROOT / "README.md") -> None:
    text = readme.read_text()
    start, end = "<!-- weight-only results: start -->", "<!-- weight-only results: end -->"
    if start in text and end in text:
        pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
        readme.write_text(pattern.sub(lambda _m: f"{start}\n{table}{end}", text))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", default="40", help="number of windows or 'all'")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--no-readme", action="store_true", help="do not update README.md")
    parser.add_argument("--render", action="store_true", help="only rewrite the tables from the results JSON")
    args = parser.parse_args(argv)
    if args.render:
        write_tables(json.loads((args.out / "weight_only.json").read_text()), args.out, not args.no_readme)
        return

    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    max_windows = None if args.eval_windows == "all" else int(args.eval_windows)
    data = prepare_text_data(
        tokenizer,
        CalibrationConfig(None, args.calib_samples, args.calib_seq_len, args.seed),
        EvalConfig(None, args.eval_seq_len, max_windows),
    )
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
    results = {
        "model": args.model,
        "fp_perplexity": fp_ppl,
        "eval_windows": windows.shape[0],
        "settings": vars(args) | {"out": str(args.out)},
        "rows": rows,
        "command": " ".join(["python benchmarks/weight_only.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": torch.get_num_threads(),
            "memory_bytes": psutil.virtual_memory().total,
        },
        "versions": {
            "edgeq": edgeq.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "weight_only.json").write_text(json.dumps(results, indent=2) + "\n")
    write_tables(results, args.out, not args.no_readme)


def write_tables(results: dict, out: Path, readme: bool) -> None:
    table = markdown(results)
    (out / "weight_only.md").write_text(table)
    if readme:
        update_readme(table)
    print(table)


if __name__ == "__main__":
    main()

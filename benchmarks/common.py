"""What the benchmark scripts share: the model and text setup, peak-memory sampling, machine facts,
and writing a table into README.md between a pair of markers."""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

import psutil
import torch

import edgeq
from edgeq.config import CalibrationConfig, EvalConfig
from edgeq.data import TextData, prepare_text_data
from edgeq.models.loading import ModelSource, load_tokenizer, resolve_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and text options every benchmark takes, with the README's settings as defaults."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", default="40", help="number of windows or 'all'")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-readme", action="store_true", help="do not update README.md")
    parser.add_argument("--render", action="store_true", help="only rewrite the tables from the results JSON")


def load_data(args: argparse.Namespace) -> tuple[ModelSource, TextData]:
    source = resolve_model(args.model)
    max_windows = None if args.eval_windows == "all" else int(args.eval_windows)
    data = prepare_text_data(
        load_tokenizer(source),
        CalibrationConfig(None, args.calib_samples, args.calib_seq_len, args.seed),
        EvalConfig(None, args.eval_seq_len, max_windows),
    )
    return source, data


def machine_and_versions() -> dict:
    return {
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


def update_readme(table: str, marker: str, readme: Path = ROOT / "README.md") -> None:
    """Replace what stands between ``<!-- {marker}: start -->`` and ``<!-- {marker}: end -->``."""
    text = readme.read_text()
    start, end = f"<!-- {marker}: start -->", f"<!-- {marker}: end -->"
    if start in text and end in text:
        pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
        readme.write_text(pattern.sub(lambda _m: f"{start}\n{table}{end}", text))


def publish(table: str, path: Path, marker: str, readme: bool) -> None:
    """Write a benchmark's Markdown table to ``path`` and, when asked, into the README."""
    path.write_text(table)
    if readme:
        update_readme(table, marker)
    print(table)


def save_results(args: argparse.Namespace, name: str, windows, **fields) -> dict:
    """The results of one benchmark run, with its settings, command line, machine and versions,
    written to ``args.out / f"{name}.json"``; returns them."""
    results = {
        "model": args.model,
        "eval_windows": windows.shape[0],
        "settings": vars(args) | {"out": str(args.out)},
        **fields,
        "command": " ".join([f"python benchmarks/{name}.py", *sys.argv[1:]]),
        **machine_and_versions(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    return results

"""OpenVINO as a second consumer of the ``qdq`` graph: SmolLM2 exported in the form OpenVINO reads
(``--qdq-form openvino``) and scored in PyTorch, ONNX Runtime and OpenVINO by the export itself.

    python benchmarks/openvino_qdq.py                  # the README's two exports, 40 windows
    python benchmarks/openvino_qdq.py --eval-windows 8 --no-readme

Each row is one ``edgeq export ... --format qdq --qdq-form openvino --providers cpu,openvino`` (the
commands the README shows); the table holds its ``report.json`` perplexities: PyTorch's fake-quantized
model, ONNX Runtime at MatMulNBits accuracy levels 0 and 4, OpenVINO at ``f32_exact`` (float32
throughout, like ORT's level 0) and at ``cpu_defaults`` (the CPU plugin's own precision choices), and
OpenVINO ``f32_exact`` relative to ORT level 0. Writes benchmarks/results/openvino_qdq.json and
openvino_qdq.md and the table into README.md between the openvino markers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import RESULTS, publish, save_results

from edgeq.cli import main as edgeq_main
from edgeq.export import ONNX_PROVIDER
from edgeq.openvino_runtime import OPENVINO_CPU
from edgeq.validate import load_fp_reference

# row key → (label, the export options besides model, format, form, providers and output)
ROWS = {
    "w4a16-rtn-g128": ("w4a16 RTN g128", ["--scheme", "w4a16", "--method", "rtn"]),
    "w4a4-gptq": (
        "w4a4 GPTQ (32 calibration windows)",
        ["--scheme", "w4a4", "--method", "gptq", "--calib-samples", "32"],
    ),
}
FORM = ["--format", "qdq", "--qdq-form", "openvino", "--providers", "cpu,openvino"]


def run_row(model: str, options: list[str], eval_windows: str, out: Path) -> dict:
    """One export; returns its report's perplexities and what the table shows of them."""
    argv = ["export", "--model", model, *options, *FORM, "--eval-windows", eval_windows, "--out", str(out)]
    status = edgeq_main(argv)
    report = json.loads((out / "report.json").read_text())
    ppl = report["perplexity"]
    ort, ov = ppl["quant_onnx"][ONNX_PROVIDER], ppl["quant_onnx"].get(OPENVINO_CPU, {})
    return {
        "command": "edgeq " + " ".join(argv[:-2]),
        "exit_status": status,
        "validation_passed": report["validation"]["passed"],
        "pytorch": ppl["quant_torch"],
        "ort_level_0": ort["accuracy_level_0"],
        "ort_level_4": ort["accuracy_level_4"],
        "openvino_f32_exact": ov.get("f32_exact"),
        "openvino_cpu_defaults": ov.get("cpu_defaults"),
        "openvino_not_run": ppl.get("quant_onnx_not_run", {}).get(OPENVINO_CPU),
    }


def table(results: dict) -> str:
    def cell(value: float | None) -> str:
        return "not run" if value is None else f"{value:.3f}"

    lines = [
        f"Model `{results['model']}`, {results['eval_windows']} evaluation windows, each export's own "
        "scoring; OpenVINO f32_exact relative to ORT level 0 in brackets.",
        "",
        "| artifact | PyTorch | ORT level 0 | ORT level 4 | OpenVINO f32_exact | OpenVINO cpu_defaults |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["rows"].values():
        exact = cell(row["openvino_f32_exact"])
        if row["openvino_f32_exact"] is not None:
            exact += f" ({(row['openvino_f32_exact'] / row['ort_level_0'] - 1) * 100:+.2f} %)"
        lines.append(
            f"| {row['label']}, `--qdq-form openvino` | {cell(row['pytorch'])} | "
            f"{cell(row['ort_level_0'])} | {cell(row['ort_level_4'])} | {exact} | "
            f"{cell(row['openvino_cpu_defaults'])} |"
        )
    lines += ["", f"Produced by `{results['command']}` on {results['date']}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--eval-windows", default="40")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row keys")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    unknown = sorted(set(args.rows.split(",")) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="edgeq-openvino-") as tmp:
        for key in args.rows.split(","):
            label, options = ROWS[key]
            rows[key] = {"label": label, **run_row(args.model, options, args.eval_windows, Path(tmp) / key)}
        windows = load_fp_reference(Path(tmp) / key).ids  # the evaluation windows every row scored
    results = save_results(args, "openvino_qdq", windows, rows=rows)
    publish(table(results), args.out / "openvino_qdq.md", "openvino results", readme=not args.no_readme)


if __name__ == "__main__":
    main()

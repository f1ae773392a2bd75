"""The two ONNX formats of one quantized model: parity with PyTorch, size and CPU decode speed.

    python benchmarks/onnx_formats.py              # SmolLM2, RTN weights (the formats, not the method)

For w4a16 and w4a4, one model is quantized and written in both formats as ``edgeq export --format``
writes them (``exporters.export_onnx``): ``qdq`` is optimum's graph with int4 DequantizeLinear
weights, ``ort`` the fused graph (``exporters.ort_fused``) where the model allows it. Both are scored
in one pass over the evaluation windows against the PyTorch fake-quantized model (perplexity, greedy
top-1 agreement; MatMulNBits accuracy levels 0 and 4), and timed with the KV cache as a user runs
them, at ONNX Runtime's default accuracy level (128-token prompt, 64 greedy steps, 2 threads),
beside the FP32 ONNX export of the same model, measured in the same run.

Writes benchmarks/results/onnx_formats.json and .md, and the README table between its markers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

from common import add_data_arguments, load_data, publish, save_results

from edgeq.config import scheme_preset
from edgeq.evaluation import OrtCausalLM, perplexity, torch_logits_fn
from edgeq.latency import measure_decode
from edgeq.models.adapters import adapter_for
from edgeq.models.loading import load_model
from edgeq.pipeline import quantize_model
from edgeq.rotation.rotate import rotate_model
from edgeq.scoring import perplexities_and_agreement
from exporters import export_onnx
from exporters.onnx_qdq import export_qdq

README_MARKER = "onnx format results"
SCHEMES = ("w4a16", "w4a4")
LEVELS = (0, 4)
FORMATS = ("qdq", "ort")
METHOD_NAMES = {"rtn": "RTN", "gptq": "GPTQ", "boa": "BoA"}


def _speed(folder: Path, threads: int, repeats: int) -> dict:
    """Decode timings as a user runs the graph: at the MatMulNBits accuracy level ORT picks (the
    fused graph's own; level 4 where ORT fuses a qdq graph's int4 weights)."""
    return measure_decode(OrtCausalLM(folder, threads=threads, accuracy_level=None), 128, 64, repeats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_data_arguments(parser)
    parser.add_argument("--method", default="rtn", help="weight method of the quantized models")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads for the timings")
    parser.add_argument("--repeats", type=int, default=5, help="timed decode runs per model")
    args = parser.parse_args(argv)
    if args.render:
        write_tables(json.loads((args.out / "onnx_formats.json").read_text()), args.out, not args.no_readme)
        return

    source, data = load_data(args)
    windows = data.evaluation
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgeq-formats-") as tmp:
        fp_dir = Path(tmp) / "fp32"
        info = export_qdq(load_model(source), {}, fp_dir)
        fp_ppl = perplexity(OrtCausalLM(fp_dir).logits, windows, "FP32 ONNX")
        fp_speed = _speed(fp_dir, args.threads, args.repeats)
        rows.append({"model": "FP32 ONNX", "perplexity": {"accuracy_level_0": fp_ppl}, "speed": fp_speed,
                     "bytes": info.bytes_total, "components": info.components})  # fmt: skip
        print(
            f"FP32 ONNX ppl {fp_ppl:.3f}, {fp_speed['decode_tokens_per_s']['p50']:.1f} tokens/s", flush=True
        )
        for scheme in SCHEMES:
            config = dataclasses.replace(scheme_preset(scheme), method=args.method)
            model = load_model(source)
            adapter = adapter_for(model)
            rotate_model(model, adapter, config.rotation)
            result = quantize_model(model, adapter, config, data.calibration)
            infos = {fmt: export_onnx(model, adapter, result, Path(tmp) / f"{scheme}-{fmt}", fmt)
                     for fmt in FORMATS}  # fmt: skip
            candidates = {
                f"{fmt} {level}": OrtCausalLM(info.path.parent, accuracy_level=level).logits
                for fmt, info in infos.items()
                for level in LEVELS
            }
            compared = perplexities_and_agreement(
                torch_logits_fn(model), candidates, windows, f"{scheme}: PyTorch vs ONNX"
            )
            torch_ppl = compared.pop("reference")
            for fmt, info in infos.items():
                speed = _speed(info.path.parent, args.threads, args.repeats)
                levels = {f"accuracy_level_{lvl}": compared[f"{fmt} {lvl}"] for lvl in LEVELS}
                rows.append({
                    "model": f"{scheme} {fmt}", "scheme": scheme, "format": fmt, "graph": info.graph,
                    "torch_perplexity": torch_ppl,
                    "perplexity": {k: v["perplexity"] for k, v in levels.items()},
                    "top1_agreement": {k: v["top1_agreement"] for k, v in levels.items()},
                    "bytes": info.bytes_total, "components": info.components, "speed": speed,
                })  # fmt: skip
                print(f"{scheme} {fmt}: {rows[-1]['perplexity']} vs torch {torch_ppl:.3f}, "
                      f"{speed['decode_tokens_per_s']['p50']:.1f} tokens/s", flush=True)  # fmt: skip
            del model
    results = save_results(args, "onnx_formats", windows, method=args.method, rows=rows)
    write_tables(results, args.out, not args.no_readme)


def markdown(results: dict) -> str:
    s = results["settings"]
    fp = results["rows"][0]
    fp_speed = fp["speed"]["decode_tokens_per_s"]["p50"]
    method = METHOD_NAMES.get(results["method"], results["method"])
    lines = [
        f"Model `{results['model']}`, weights by {method}; perplexity on WikiText-2 test, "
        f"{results['eval_windows']} windows of {s['eval_seq_len']} tokens; ONNX Runtime CPU, "
        f"MatMulNBits accuracy level 0 (level 4 in brackets); top-1: greedy agreement with the PyTorch "
        f"fake-quantized model; decode (at the accuracy level ONNX Runtime picks by default): "
        f"{fp['speed']['prompt_tokens']}-token prompt, "
        f"{fp['speed']['new_tokens']} steps with the KV cache, {s['threads']} threads, p50 of "
        f"{fp['speed']['repeats']} runs.{_graphs(results['rows'])}",
        "",
        "| model | PyTorch ppl | ONNX ppl | top-1 | size (MB) | embedding / blocks / lm_head (MB) "
        "| prefill (ms) | decode (tokens/s) | decode vs FP32 |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for row in results["rows"]:
        ppl, top1 = row["perplexity"], row.get("top1_agreement")
        onnx_ppl = f"{ppl['accuracy_level_0']:.2f}"
        if "accuracy_level_4" in ppl:
            onnx_ppl += f" ({ppl['accuracy_level_4']:.2f})"
        agreement = (
            ""
            if top1 is None
            else (f"{top1['accuracy_level_0'] * 100:.2f}% ({top1['accuracy_level_4'] * 100:.1f}%)")
        )
        torch_ppl = f"{row['torch_perplexity']:.2f}" if "torch_perplexity" in row else ""
        parts = " / ".join(f"{row['components'][k] / 1e6:.1f}" for k in ("embedding", "blocks", "lm_head"))
        tps = row["speed"]["decode_tokens_per_s"]["p50"]
        lines.append(
            f"| {row['model']} | {torch_ppl} | {onnx_ppl} | {agreement} | {row['bytes'] / 1e6:.1f} | {parts} "
            f"| {row['speed']['prefill_ms']['p50']:.0f} | {tps:.1f} | {tps / fp_speed:.2f} × |"
        )
    lines += _w4a4_ratio(results["rows"])
    lines += ["", f"Produced by `{results['command']}` on {results['date']}."]
    return "\n".join(lines) + "\n"


def _w4a4_ratio(rows: list[dict]) -> list[str]:
    """The W4A4 ``ort`` graph's decode speed against W4A16's, both measured in this run."""
    speed = {row["model"]: row["speed"]["decode_tokens_per_s"]["p50"] for row in rows}
    if "w4a4 ort" not in speed or "w4a16 ort" not in speed:
        return []
    ratio = speed["w4a4 ort"] / speed["w4a16 ort"]
    return ["", f"The w4a4 `ort` graph decodes at {ratio:.2f} × the w4a16 `ort` graph's speed in this run."]


def _graphs(rows: list[dict]) -> str:
    """Which graph each exported row is (runs before the field was recorded: nothing)."""
    graphs = [f"{row['model']}: {GRAPH_NAMES[row['graph']]}" for row in rows if "graph" in row]
    return f" Graphs: {'; '.join(graphs)}." if graphs else ""


GRAPH_NAMES = {"optimum": "optimum's traced graph", "fused": "the fused graph (ORT's contrib operators)"}


def write_tables(results: dict, out: Path, readme: bool) -> None:
    publish(markdown(results), out / "onnx_formats.md", README_MARKER, readme)


if __name__ == "__main__":
    main()

"""W4A4 on one model: the presets, what rotations, clip search and each weight method buy, with their
noise, and the fused W4A4 graph's speed in ONNX Runtime.

    python benchmarks/w4a4.py                      # SmolLM2, the settings the README shows

Quality rows: PyTorch fake-quant perplexity. The main rows run with 3 calibration seeds (the windows
sampled from the C4 sample; the rotation seed stays 0) and give mean and standard deviation; the
rest run with seed 0. Learned rotations (SpinQuant, ``edgeq.rotation.learned``) use the same weight
method and seeds as the Hadamard row they are compared with.

Speed: the seed-0 ``w4a4`` preset model is written as the fused ``ort`` graph (MatMulNBits,
GroupQueryAttention, SkipSimplifiedLayerNormalization, online R4 and R5, per-token quantization in
front of the matmuls) and scored in ONNX Runtime against its PyTorch model; a ``w4a16`` preset
model (RTN: the speed does not depend on the method) is written as the same graph, and the two are
timed interleaved in this run (128-token prompt, 64 greedy steps with the KV cache, 2 threads).

Writes benchmarks/results/w4a4.json (with machine and versions) and w4a4.md, and puts the tables into
README.md between the W4A4 markers. Every number comes from this run.

The run takes two to three hours on 2 cores, so each finished quantization is also appended to
benchmarks/results/w4a4.runs.jsonl (removed when the run completes). ``--resume`` reuses the runs
recorded there by the same code (a hash of edgeq/, exporters/ and these scripts) with the same
settings, and runs the rest; the table then says which dates its runs come from.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnxruntime
import torch
from common import ROOT, add_data_arguments, load_data, publish, save_results

from edgeq.config import CalibrationConfig, EvalConfig, QuantConfig, RotationConfig, scheme_preset
from edgeq.data import prepare_text_data
from edgeq.evaluation import OrtCausalLM, perplexity, torch_logits_fn
from edgeq.latency import PeakRSS, measure_decode
from edgeq.models.adapters import adapter_for
from edgeq.models.loading import load_model, load_tokenizer
from edgeq.pipeline import quantize_model
from edgeq.rotation.learned import learn_rotations
from edgeq.rotation.rotate import apply_plan, plan_rotations
from edgeq.scoring import perplexities_and_agreement
from exporters.ort_fused import export_fused

README_MARKER = "w4a4 results"
SEEDS = (0, 1, 2)
PRESET_LABEL = "rotation + BoA"  # the w4a4 preset: its method is BoA


@dataclass(frozen=True)
class Row:
    """One setting: a scheme preset with overrides, over ``seeds`` calibration seeds."""

    label: str
    scheme: str
    method: str
    seeds: tuple[int, ...] = (0,)
    rotate: bool = True
    learned: bool = False
    objective_weights: str | None = None  # learned: the weights in the objective (None = the default)
    activations: dict = field(default_factory=dict)  # ActQuantConfig overrides
    weights: dict = field(default_factory=dict)  # WeightQuantConfig overrides
    rotation: dict = field(default_factory=dict)  # RotationConfig overrides (e.g. r5)

    def config(self, steps: int, samples: int, lr: float) -> QuantConfig:
        quant = scheme_preset(self.scheme)
        kind = "learned" if self.learned else "hadamard"
        objective = self.objective_weights or quant.rotation.objective_weights
        rotation = dataclasses.replace(quant.rotation, enabled=self.rotate, kind=kind, steps=steps,
                                       samples=samples, lr=lr, objective_weights=objective,
                                       **self.rotation)  # fmt: skip
        act = dataclasses.replace(quant.activations, **self.activations)
        weights = dataclasses.replace(quant.weights, **self.weights)
        return dataclasses.replace(
            quant, method=self.method, rotation=rotation, activations=act, weights=weights
        )


# RTN rows and activation ablations of earlier runs are in this file's git history (2026-11-23,
# 64 calibration windows: rotation + GPTQ with symmetric activations at a fixed clip 0.9, 57.50).
ROWS = (
    Row("rotation + GPTQ", "w4a4", "gptq", SEEDS),
    Row(PRESET_LABEL, "w4a4", "boa", SEEDS),
    # what the preset's activation shift buys (``edgeq.activation_ranges``)
    Row("rotation + BoA, no shift", "w4a4", "boa", activations={"shift": False}),
    # and its asymmetric weight grids (symmetric ones: what an NPU without weight zero points takes)
    Row("rotation + BoA, symmetric weights", "w4a4", "boa", weights={"symmetric": True}),
    # and its R5 (o_proj's input mixed across heads): R1, R2 and R4 alone
    Row("rotation + BoA, no R5", "w4a4", "boa", rotation={"r5": False}),
    # float weights in the objective: SpinQuant's recipe when GPTQ rounds the weights afterwards
    Row("learned rotation + GPTQ", "w4a4", "gptq", SEEDS[:1], learned=True, objective_weights="float"),
    Row("learned rotation + BoA", "w4a4", "boa", SEEDS[:1], learned=True, objective_weights="float"),
    # RTN rounds afterwards what the objective rounded: SpinQuant's RTN setting
    Row("rotation + RTN", "w4a4", "rtn"),
    Row("learned rotation + RTN", "w4a4", "rtn", learned=True, objective_weights="rtn"),
    Row("w4a4-down8 (down_proj input A8) + GPTQ", "w4a4-down8", "gptq"),
    Row("w4a4-down8 (down_proj input A8) + BoA", "w4a4-down8", "boa", SEEDS),  # the preset's method
    Row("w4a8 + GPTQ", "w4a8", "gptq"),
    Row("w4a8 + BoA", "w4a8", "boa"),
    Row("w4a4 + KV4 + GPTQ", "w4a4", "gptq", activations={"kv_bits": 4}),
    Row("w4a4 + KV4 + BoA", "w4a4", "boa", SEEDS, activations={"kv_bits": 4}),
)
# must-shows, on the presets' method: row label → the largest perplexity / FP allowed
LIMITS = {
    PRESET_LABEL: 1.5,
    "w4a4-down8 (down_proj input A8) + BoA": 1.35,
    "w4a8 + BoA": 1.15,
    "w4a4 + KV4 + BoA": 1.6,
}
# learned rotations against the Hadamard ones, with the same weight method: (learned, Hadamard)
LEARNED_PAIRS = (
    ("learned rotation + GPTQ", "rotation + GPTQ"),
    ("learned rotation + BoA", PRESET_LABEL),
    ("learned rotation + RTN", "rotation + RTN"),
)


def quantized(source, calibration: torch.Tensor, config: QuantConfig):
    """A fresh model rotated (Hadamard, or learned on ``calibration``) and quantized by ``config``.
    Returns (model, its QuantizationResult, seconds, peak RSS, rotation report, learning seconds)."""
    with PeakRSS() as peak:
        start = time.perf_counter()
        model = load_model(source)
        adapter = adapter_for(model)
        plan = plan_rotations(adapter, model.config, config.rotation, config.activations.kv_bits < 16)
        learning = 0.0
        if config.rotation.kind == "learned" and plan.applied:
            plan, log = learn_rotations(load_model(source), adapter, config, plan, calibration)
            learning = log.seconds
        apply_plan(model, adapter, plan)
        result = quantize_model(model, adapter, config, calibration)
        seconds = time.perf_counter() - start
    return model, result, seconds, peak.peak, dataclasses.asdict(plan.report), learning


def code_fingerprint(root: Path = ROOT) -> str:
    """A hash of the code a run executes (edgeq/, exporters/, benchmarks/w4a4.py and common.py) and
    of torch's version: a recorded run is reused only by the code that produced it."""
    digest = hashlib.sha256(torch.__version__.encode())
    files = [*root.glob("edgeq/**/*.py"), *root.glob("exporters/**/*.py")]
    for path in sorted(files) + [root / "benchmarks" / "w4a4.py", root / "benchmarks" / "common.py"]:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def run_key(config: QuantConfig, seed: int, settings: dict, fingerprint: str) -> str:
    """What identifies one quantization and its perplexity: config, calibration seed, data settings
    and code."""
    identity = {"config": dataclasses.asdict(config), "seed": seed, "settings": settings, "code": fingerprint}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


class RunLog:
    """The finished runs of one benchmark invocation, one JSON line each in ``path``, so an
    interrupted run can go on (``--resume``) instead of starting over."""

    def __init__(self, path: Path, resume: bool):
        self.path = path
        self.saved: dict[str, dict] = {}
        if resume and path.exists():
            for line in path.read_text().splitlines():
                entry = json.loads(line)
                self.saved[entry["key"]] = entry["run"]
        elif path.exists():
            path.unlink()

    def get(self, key: str) -> dict | None:
        return self.saved.get(key)

    def add(self, key: str, run: dict) -> None:
        self.saved[key] = run
        with self.path.open("a") as f:
            f.write(json.dumps({"key": key, "run": run}) + "\n")

    def close(self) -> None:
        """The run completed: its results file holds every run."""
        self.path.unlink(missing_ok=True)


def _run(seed: int, ppl: float, seconds: float, peak: int, rotation: dict, learning: float) -> dict:
    """One seed's entry in a row of the results (and of the run log)."""
    return {"seed": seed, "perplexity": ppl, "seconds": seconds, "peak_rss_bytes": peak,
            "learning_seconds": learning, "rotation": rotation,
            "date": time.strftime("%Y-%m-%d")}  # fmt: skip


def _calibration(args, source, seed: int) -> torch.Tensor:
    config = CalibrationConfig(None, args.calib_samples, args.calib_seq_len, seed)
    evaluation = EvalConfig(None, args.eval_seq_len, 1)
    return prepare_text_data(load_tokenizer(source), config, evaluation).calibration


def _speed(folder: Path, threads: int) -> dict:
    return measure_decode(OrtCausalLM(folder, threads=threads, accuracy_level=None), 128, 64, 1)


def fused_parity(model, result, windows: torch.Tensor, folder: Path) -> dict:
    """Write ``model`` (quantized in memory, ``result`` its integer weights) as the fused ``ort``
    graph into ``folder`` and score it in ONNX Runtime (as a user runs it: the graph's MatMulNBits
    accuracy level) against the PyTorch model: perplexities and greedy top-1 agreement."""
    info = export_fused(model, adapter_for(model), result.weights, result.tables, folder)
    ort = OrtCausalLM(folder, accuracy_level=None)
    compared = perplexities_and_agreement(torch_logits_fn(model), {"ort": ort.logits}, windows, "fused w4a4")
    return {
        "graph": info.graph,
        "torch_perplexity": compared["reference"],
        "ort_perplexity": compared["ort"]["perplexity"],
        "top1_agreement": compared["ort"]["top1_agreement"],
        "bytes": info.bytes_total,
    }


def runtime_nodes(folder: Path) -> int:
    """The nodes of the graph in ``folder`` as ONNX Runtime's CPU provider runs it: after the fusions
    it applies when it loads the graph (a bias Add folds into the MatMulNBits before it)."""
    options = onnxruntime.SessionOptions()
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "data")
        onnxruntime.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        return len(onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node)


def ort_speed(fused: dict[str, Path], threads: int, rounds: int) -> dict[str, dict]:
    """Decode tokens/s of each fused graph, timed in ``rounds`` interleaved rounds (one warm-up and
    one timed run each), so a change in the machine's load hits all of them alike."""
    runs: dict[str, list[float]] = {name: [] for name in fused}
    for _ in range(rounds):
        for name, folder in fused.items():
            runs[name].append(_speed(folder, threads)["decode_tokens_per_s"]["p50"])
    return {name: {"tokens_per_s": statistics.median(v), "runs": v} for name, v in runs.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_data_arguments(parser)
    # 32 windows: three seeds of every main row fit in an hour on 2 cores
    parser.set_defaults(calib_samples=32)
    learn = RotationConfig()
    parser.add_argument("--rotation-steps", type=int, default=learn.steps, help="learned: Cayley SGD steps")
    parser.add_argument("--rotation-samples", type=int, default=learn.samples, help="learned: windows")
    parser.add_argument("--rotation-lr", type=float, default=learn.lr, help="learned rotations: step size")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads for the timings")
    parser.add_argument("--speed-rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--resume", action="store_true", help="reuse the runs that an interrupted "
                        "invocation recorded in <out>/w4a4.runs.jsonl")  # fmt: skip
    args = parser.parse_args(argv)
    if args.render:
        write_tables(json.loads((args.out / "w4a4.json").read_text()), args.out, not args.no_readme)
        return

    source, data = load_data(args)
    windows = data.evaluation
    fp_ppl = perplexity(torch_logits_fn(load_model(source)), windows, "FP")
    print(f"FP ppl {fp_ppl:.3f}", flush=True)
    calibrations = {seed: _calibration(args, source, seed) for seed in SEEDS}
    rows, rotation_report = [], None
    tmp = Path(tempfile.mkdtemp(prefix="edgeq-w4a4-"))
    fused: dict[str, Path] = {}
    parity = None
    settings = {k: getattr(args, k) for k in ("model", "calib_samples", "calib_seq_len", "eval_seq_len",
                                               "eval_windows")}  # fmt: skip
    fingerprint = code_fingerprint()
    log = RunLog(args.out / "w4a4.runs.jsonl", args.resume)
    for row in ROWS:
        config = row.config(args.rotation_steps, args.rotation_samples, args.rotation_lr)
        per_seed = []
        for seed in row.seeds:
            key = run_key(config, seed, settings, fingerprint)
            fused_model = row.label == PRESET_LABEL and seed == 0  # the fused graph's model
            if (run := log.get(key)) is None or fused_model:
                # quantized again when resumed: the same code and seed give the same model
                model, result, *measured = quantized(source, calibrations[seed], config)
            if run is None:
                run = _run(seed, perplexity(torch_logits_fn(model), windows, f"{row.label} seed {seed}"),
                           *measured)  # fmt: skip
                log.add(key, run)
            per_seed.append(run)
            if rotation_report is None and row.rotate and not row.learned:
                rotation_report = run["rotation"]
            ppl, seconds = run["perplexity"], run["seconds"]
            print(f"{row.label:44s} seed {seed} ppl {ppl:9.3f}  {seconds:6.1f} s", flush=True)
            if fused_model:
                parity = fused_parity(model, result, windows, tmp / "w4a4-ort")
                fused["w4a4 ort"] = tmp / "w4a4-ort"
                print(f"fused w4a4 ort: {parity}", flush=True)
            model = result = None  # freed before the next run: its peak RSS is its own
        ppls = [s["perplexity"] for s in per_seed]
        rows.append({
            "label": row.label,
            "perplexity": statistics.mean(ppls),
            "std": statistics.stdev(ppls) if len(ppls) > 1 else None,
            "seeds": per_seed,
            "seconds": statistics.mean(s["seconds"] for s in per_seed),
            "peak_rss_bytes": max(s["peak_rss_bytes"] for s in per_seed),
            "config": dataclasses.asdict(config),
        })  # fmt: skip
    w4a16 = dataclasses.replace(scheme_preset("w4a16"), method="rtn")
    model, result, *_ = quantized(source, calibrations[0], w4a16)
    export_fused(model, adapter_for(model), result.weights, result.tables, tmp / "w4a16-ort")
    fused["w4a16 ort"] = tmp / "w4a16-ort"
    del model, result
    speed = ort_speed(fused, args.threads, args.speed_rounds)
    for name, folder in fused.items():
        speed[name]["nodes"] = runtime_nodes(folder)
    print(f"speed: {speed}", flush=True)
    results = save_results(
        args,
        "w4a4",
        windows,
        fp_perplexity=fp_ppl,
        rotation=rotation_report,
        rows=rows,
        fused=parity | {"speed": speed},
    )
    write_tables(results, args.out, not args.no_readme)
    log.close()


def _ppl(row: dict) -> str:
    return f"{row['perplexity']:.2f}" + (f" ± {row['std']:.2f}" if row.get("std") is not None else "")


def _row_settings_text(rows: list[dict]) -> str:
    """Sentences after the settings naming the rows whose weights compensated the activations'
    rounding (``--act-compensate``) and the rows whose quantized KV cache was shifted by its
    calibration mean (``--kv-shift``), one sentence per cache width, read from each row's config; ""
    where no row did either."""

    def act(row: dict) -> dict:
        return row["config"].get("activations", {})

    kv_widths = sorted({act(r).get("kv_bits", 16) for r in rows} - {16})
    named = [
        ("Weights compensating the activations' rounding (`--act-compensate`)",
         lambda a: a.get("compensate_rounding")),
    ] + [
        (f"KV cache int{bits} with keys and values shifted by their calibration means (`--kv-shift`)",
         lambda a, bits=bits: a.get("kv_shift") and a.get("kv_bits", 16) == bits)
        for bits in kv_widths
    ]  # fmt: skip
    text = ""
    for sentence, applies in named:
        if labels := [r["label"] for r in rows if applies(act(r))]:
            text += f" {sentence}: " + "; ".join(f"`{label}`" for label in labels) + "."
    return text


def markdown(results: dict) -> str:
    s, fp = results["settings"], results["fp_perplexity"]
    # the first row's (a Hadamard w4a4 row; ``rotation`` may hold another row's, e.g. KV4's R3)
    first = (results["rows"][0].get("seeds") or [{}])[0].get("rotation") or results["rotation"]
    rotation = ", ".join(f"{k.upper()} {v}" for k, v in first["applied"].items())
    by_label = {r["label"]: r for r in results["rows"]}
    lines = [
        f"Model `{results['model']}`, FP perplexity **{fp:.2f}**. Calibration: {s['calib_samples']} × "
        f"{s['calib_seq_len']} tokens of C4; evaluation: WikiText-2 test, {results['eval_windows']} windows "
        f"of {s['eval_seq_len']} tokens, no BOS; PyTorch fake-quant; {results['machine']['cpus']} CPU "
        f"threads. `w4a4`: per-channel asymmetric int4 weights, per-token asymmetric int4 activations "
        f"on every block linear's input, each shifted by its calibration mean and its clip ratio "
        f"searched; KV cache float; lm_head "
        f"int8. Rotations: {rotation}. Rows with ± ran with calibration seeds "
        f"{', '.join(map(str, SEEDS))} (mean ± standard deviation); the "
        f"others with seed 0. Learned "
        f"rotations: {s['rotation_steps']} Cayley SGD steps on {s['rotation_samples']} windows, step "
        f"size {s['rotation_lr']:g}.{_row_settings_text(results['rows'])}",
        "",
        "| W4A4 | perplexity | × FP | must show | quantization time (s) | peak RSS (GiB) |",
        "| --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for row in results["rows"]:
        limit = LIMITS.get(row["label"])
        ratio = row["perplexity"] / fp
        verdict = "" if limit is None else f"≤ {limit} × {'✓' if ratio <= limit else '✗'}"
        lines.append(
            f"| {row['label']} | {_ppl(row)} | {ratio:.2f} | {verdict} | {row['seconds']:.0f} | "
            f"{row['peak_rss_bytes'] / 2**30:.2f} |"
        )
    for learned_label, hadamard_label in LEARNED_PAIRS:
        hadamard, learned = by_label.get(hadamard_label), by_label.get(learned_label)
        if not (hadamard and learned):
            continue
        seeds = [x["seed"] for x in learned["seeds"]]  # compared on the seeds both ran
        had = statistics.mean(x["perplexity"] for x in hadamard["seeds"] if x["seed"] in seeds)
        closed = (had - learned["perplexity"]) / (had - fp)
        seconds = statistics.mean(x["learning_seconds"] for x in learned["seeds"])
        method = hadamard_label.removeprefix("rotation + ")
        objective = learned["config"]["rotation"]["objective_weights"]
        lines += [
            "",
            f"Learned rotations close {closed * 100:.0f} % of the randomized Hadamard's gap to FP ({method} "
            f"weights, {objective} weights in the objective, seeds {', '.join(map(str, seeds))}: "
            f"{learned['perplexity']:.2f} against {had:.2f}; must show ≥ 15 %), for {seconds:.0f} s of "
            f"learning per run.",
        ]
    boa, gptq = by_label.get(PRESET_LABEL), by_label.get("rotation + GPTQ")
    if boa and gptq and boa.get("std") is not None:
        lines += ["", f"BoA against GPTQ at W4A4: {_ppl(boa)} against {_ppl(gptq)}."]
    f = results["fused"]
    speed = f["speed"]
    w4, w16 = speed["w4a4 ort"]["tokens_per_s"], speed["w4a16 ort"]["tokens_per_s"]
    parity = f["ort_perplexity"] / f["torch_perplexity"] - 1
    lines += [
        "",
        f"The seed-0 `w4a4` preset model as the fused `ort` graph ({f['graph']}; {f['bytes'] / 1e6:.1f} MB): "
        f"ONNX Runtime perplexity {f['ort_perplexity']:.2f} against PyTorch's {f['torch_perplexity']:.2f} "
        f"({parity * 100:+.1f} %; must show within 2 %), greedy top-1 agreement "
        f"{f['top1_agreement'] * 100:.1f} %. Decode: {w4:.1f} tokens/s against {w16:.1f} for the fused "
        f"`w4a16` graph, {w4 / w16:.2f} × (must show ≥ 0.9 ×; median of {s['speed_rounds']} interleaved "
        f"rounds, 128-token prompt, 64 steps, {s['threads']} threads).{_nodes(speed)}",
        "",
        f"Produced by `{results['command']}` on {results['date']}{_resumed(results)}.",
    ]
    return "\n".join(lines) + "\n"


def _resumed(results: dict) -> str:
    """Where a resumed run reused quantizations from earlier days: the dates of its runs."""
    dates = {run.get("date", results["date"]) for row in results["rows"] for run in row["seeds"]}
    dates = sorted(dates - {results["date"]})
    return f" (resumed: the other runs on {', '.join(dates)})" if dates else ""


def _nodes(speed: dict) -> str:
    """The graphs' sizes in nodes, where the run counted them, and what each extra node cost a decode
    step: at batch 1 ORT spends microseconds dispatching each node whatever its work, and per-token
    quantization adds standard ops to every quantized input (11 asymmetric, one more for a shift, 5
    symmetric: ``exporters.ort_fused``), as ONNX has no one-op dynamic per-row grid."""
    w4, w16 = speed["w4a4 ort"], speed["w4a16 ort"]
    if "nodes" not in w4 or "nodes" not in w16:
        return ""
    extra = w4["nodes"] - w16["nodes"]
    ms = 1000 / w4["tokens_per_s"] - 1000 / w16["tokens_per_s"]
    return (
        f" As ONNX Runtime runs them (after its load-time fusions), the W4A4 graph holds {w4['nodes']} "
        f"nodes against {w16['nodes']}; its {extra} more cost "
        f"{ms:.1f} ms a step, {ms * 1000 / extra:.1f} µs each."
    )


def write_tables(results: dict, out: Path, readme: bool) -> None:
    publish(markdown(results), out / "w4a4.md", README_MARKER, readme)


if __name__ == "__main__":
    main()

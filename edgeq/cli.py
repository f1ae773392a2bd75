"""The ``edgeq`` command line. User errors print one line and exit with status 2."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import signal
import sys
from pathlib import Path

from edgeq.config import (
    DEFAULT_GATES,
    ROTATION_KINDS,
    ROTATION_OBJECTIVE_WEIGHTS,
    SCHEMES,
    CalibrationConfig,
    EvalConfig,
    ExportConfig,
    RotationConfig,
    ValidationConfig,
    scheme_preset,
)
from edgeq.errors import EdgeqError
from edgeq.models.loading import DEFAULT_MODEL
from edgeq.quant import METHODS, method_class
from edgeq.validate import GATES, load_gates


class _Parser(argparse.ArgumentParser):
    """argparse with edgeq's error format: one line, ``edgeq: error: ...``, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"edgeq: error: {message} (see '{self.prog} --help')\n")


class _RaisingParser(argparse.ArgumentParser):
    """argparse that raises what ``_Parser`` prints as an EdgeqError, for callers that are not the
    command line (the Olive pass): they reject an option with the CLI's own message."""

    def error(self, message: str):
        raise EdgeqError(f"{message} (see '{self.prog} --help')")


def _windows(value: str) -> int | None:
    if value == "all":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', got '{value}'") from None


def _add_eval_options(parser: argparse.ArgumentParser) -> None:
    defaults = EvalConfig()
    parser.add_argument("--eval-text", help="WikiText-2 raw test file (default: from the data folder)")
    parser.add_argument("--eval-seq-len", type=int, default=defaults.seq_len, help="tokens per window")
    parser.add_argument(
        "--eval-windows",
        type=_windows,
        default=defaults.max_windows,
        help="evaluate the first N windows, or 'all' (default %(default)s)",
    )


# flag -> gate name (edgeq.validate.GATES says what each compares)
GATE_FLAGS = {
    "max_ppl_ratio": "perplexity_ratio",
    "min_top1": "top1_agreement",
    "max_kl": "kl_divergence",
    "min_speedup": "decode_speedup",
    "max_size_ratio": "size_ratio",
}


def _add_validation_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("validation gates (default: " + ", ".join(
        f"{k} {GATES[k][0]} {v}" for k, v in DEFAULT_GATES.items()) + ")")  # fmt: skip
    group.add_argument(
        "--providers", default="cpu,cuda", help="runtimes to check: cpu, cuda (ORT), openvino (%(default)s)"
    )
    group.add_argument("--gates", type=Path, help="TOML file with a [gates] table (replaces the defaults)")
    group.add_argument("--max-ppl-ratio", type=float, help="ONNX perplexity / FP perplexity at most")
    group.add_argument("--min-top1", type=float, help="greedy top-1 agreement with the FP model at least")
    group.add_argument("--max-kl", type=float, help="KL(FP ‖ ONNX) per token at most (nats)")
    group.add_argument("--min-speedup", type=float, help="decode tokens/s over FP32 ONNX at least")
    group.add_argument("--max-size-ratio", type=float, help="ONNX bytes / FP32 parameter bytes at most")
    group.add_argument(
        "--threads", type=int, default=2, help="ORT threads for the latency timings (%(default)s)"
    )
    group.add_argument(
        "--latency-runs",
        type=int,
        default=ValidationConfig.latency_runs,
        help="timed prefill + decode runs for p50/p90 (%(default)s)",
    )
    group.add_argument(
        "--decode-tokens",
        type=int,
        default=ValidationConfig.decode_tokens,
        help="greedy decode steps per timed run (%(default)s)",
    )


def _gates_from_args(args: argparse.Namespace) -> dict[str, float]:
    gates = load_gates(args.gates) if args.gates else dict(DEFAULT_GATES)
    for flag, name in GATE_FLAGS.items():
        if getattr(args, flag) is not None:
            gates[name] = getattr(args, flag)
    return gates


def _providers(value: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in value.split(",") if p.strip())


def add_export_options(export: argparse.ArgumentParser) -> None:
    """Every ``edgeq export`` option (the Olive pass, ``edgeq.olive_pass``, mirrors these)."""
    export.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="local HF folder, .gguf file, hub id, or 'smollm2-135m' (default)",
    )
    export.add_argument(
        "--scheme", default="w4a16", help=f"one of {', '.join(SCHEMES)} (default %(default)s)"
    )
    export.add_argument("--method", help=f"one of {', '.join(METHODS)} (default: the scheme's, boa)")
    export.add_argument("--bits", type=int, help="weight bits (default: the scheme's)")
    export.add_argument(
        "--group-size",
        type=int,
        help="input columns per scale, or -1 for per channel (default: the scheme's, 128)",
    )
    sym = export.add_mutually_exclusive_group()
    sym.add_argument(
        "--symmetric", dest="symmetric", action="store_true", default=None, help="symmetric weight grid"
    )
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false", help="asymmetric weight grid")
    export.add_argument(
        "--quantize-embedding",
        action="store_true",
        default=None,
        help="also put the embedding table on the weight grid (GatherBlockQuantized in the ort format)",
    )
    head = export.add_mutually_exclusive_group()
    head.add_argument(
        "--lm-head-bits", type=int, choices=(4, 8, 16),
        help="lm_head's grid: 8 (the presets'), 4, or 16 to keep it float",
    )  # fmt: skip
    head.add_argument(
        "--quantize-lm-head", action="store_true", default=None, help="put lm_head on the weights' own grid"
    )
    algo = export.add_argument_group("GPTQ / BoA options")
    algo.add_argument(
        "--no-act-order",
        dest="act_order",
        action="store_false",
        default=None,
        help="GPTQ columns in their natural order instead of decreasing Hessian diagonal",
    )
    algo.add_argument("--percdamp", type=float, help="Hessian dampening, fraction of mean diagonal (0.01)")
    algo.add_argument("--clip-grid", type=int, help="clipping candidates per group, 1 = min-max grid (20)")
    algo.add_argument("--row-block", type=int, help="BoA: output rows of every head quantized jointly (16)")
    algo.add_argument(
        "--relaxed-v",
        action="store_true",
        default=None,
        help="BoA: plain input Hessian for W_V (saves heads x d^2 memory)",
    )
    algo.add_argument(
        "--alpha", type=float, help="BoA: correction for earlier blocks' error, 0 = off (TurboBoA)"
    )
    algo.add_argument(
        "--aespa-iterations", type=int, help="aespa: Adam steps of each projection's rounding (300)"
    )
    mixed = export.add_argument_group("mixed precision (APTQ)")
    mixed.add_argument(
        "--avg-bits", type=float,
        help="give each block linear its own width, averaging at most this many bits per weight",
    )  # fmt: skip
    mixed.add_argument(
        "--bit-choices", type=_bit_choices, help="comma-separated widths --avg-bits may use (default 2,3,4,8)"
    )
    act = export.add_argument_group("activations and rotations (W4A4)")
    act.add_argument("--act-bits", type=int, help="activation bits: 4, 8 or 16 = off (default: the scheme's)")
    asym = act.add_mutually_exclusive_group()
    asym.add_argument(
        "--act-symmetric", dest="act_symmetric", action="store_true", default=None, help="symmetric per token"
    )
    asym.add_argument(
        "--act-asymmetric", dest="act_symmetric", action="store_false", help="asymmetric per token"
    )
    act.add_argument(
        "--act-clip",
        type=_clip,
        help="activation clip ratio in (0, 1], or 'search': one per input, fitted on the calibration data "
        "(default: the scheme's)",
    )
    act.add_argument("--down-act-bits", type=int, help="bits of down_proj's input (default: --act-bits)")
    act.add_argument(
        "--act-shift", action=argparse.BooleanOptionalAction, default=None,
        help="take each quantized input's calibration mean out before its grid and add it back after "
        "(default: the scheme's)",
    )  # fmt: skip
    act.add_argument(
        "--act-compensate", action=argparse.BooleanOptionalAction, default=None,
        help="fit each weight to its linear's output before the activation grid, so it compensates its "
        "input's rounding (GPTQ and BoA; default: the scheme's, where the method applies it)",
    )  # fmt: skip
    act.add_argument(
        "--kv-bits", type=int, help="KV cache bits, asymmetric per token and head; 16 = float (default)"
    )
    act.add_argument(
        "--kv-shift", action=argparse.BooleanOptionalAction, default=None,
        help="with a quantized KV cache, take the keys' and values' calibration means (per head and "
        "channel) out before their grid and add them back after (default: the scheme's)",
    )  # fmt: skip
    rot = act.add_mutually_exclusive_group()
    rot.add_argument("--rotate", dest="rotate", action="store_true", default=None, help="Hadamard rotations")
    rot.add_argument("--no-rotate", dest="rotate", action="store_false", help="no rotations")
    act.add_argument("--rotation-seed", type=int, help="seed of the randomized Hadamard matrices (0)")
    act.add_argument(
        "--r5", action=argparse.BooleanOptionalAction, default=None,
        help="with rotations on, R5: an online Hadamard on o_proj's whole input, mixing across heads "
        "(R2 mixes within one); its inverse fused into o_proj (default: on in the W4A4 presets)",
    )  # fmt: skip
    act.add_argument(
        "--rotation",
        choices=ROTATION_KINDS,
        help="hadamard: randomized Hadamard matrices; learned: R1/R2 optimized from them on the quantized "
        "model's loss (SpinQuant; the whole float model in memory). Implies --rotate",
    )
    learn = RotationConfig()  # the defaults' one home
    act.add_argument(
        "--rotation-steps", type=int, help=f"learned rotations: Cayley SGD steps ({learn.steps})"
    )
    act.add_argument(
        "--rotation-samples", type=int, help=f"learned rotations: calibration windows used ({learn.samples})"
    )
    act.add_argument("--rotation-lr", type=float, help=f"learned rotations: step size ({learn.lr})")
    act.add_argument(
        "--rotation-objective-weights",
        choices=ROTATION_OBJECTIVE_WEIGHTS,
        help="learned rotations: weights float in the objective (default; GPTQ/BoA round them later) "
        "or rounded to their grid by RTN (default with --method rtn)",
    )
    cal = CalibrationConfig()
    export.add_argument("--calib", help="calibration text: .parquet, .jsonl or .txt (default: the C4 sample)")
    export.add_argument("--calib-samples", type=int, default=cal.num_sequences, help="calibration sequences")
    export.add_argument(
        "--calib-seq-len", type=int, default=cal.seq_len, help="tokens per calibration sequence"
    )
    export.add_argument("--seed", type=int, default=cal.seed, help="calibration sampling seed")
    _add_eval_options(export)
    export.add_argument(
        "--format",
        default="qdq",
        help="qdq: standard ONNX int4 QuantizeLinear/DequantizeLinear (what NPU toolchains compile); "
        "ort: ONNX Runtime's fast CPU/CUDA path: MatMulNBits weights in a graph of ORT's fused operators "
        "(GroupQueryAttention, SkipSimplifiedLayerNormalization) where the model allows, otherwise in "
        "optimum's graph (default %(default)s)",
    )
    export.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where calibration and quantization run, one block at a time (auto: CUDA when torch sees "
        "one; default %(default)s)",
    )
    export.add_argument(
        "--qdq-form",
        default="standard",
        help="standard: the qdq graph as above; openvino: the same numbers in the form OpenVINO's ONNX "
        "frontend reads (a weight whose input width is not a whole number of blocks split in two "
        "MatMuls; per-token activation Q/DQ per axis on a transposed view) (default %(default)s)",
    )
    export.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "float16"),
        help="float type of the exported graph, either format; float16 for ORT's CUDA provider "
        "(default %(default)s)",
    )
    export.add_argument("--out", type=Path, help="artifact folder (default: out/<model>-<scheme>-<method>)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    export.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted export into --out from its last finished block (same options)",
    )
    export.add_argument(
        "--no-validate", action="store_true", help="skip the validation gates at the end (not recommended)"
    )
    _add_validation_options(export)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edgeq", description=__doc__)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    export = sub.add_parser(
        "export",
        help="quantize a causal LM and export it to ONNX",
        description="Quantize a causal LM, export ONNX, check it in ONNX Runtime.",
    )
    add_export_options(export)

    ev = sub.add_parser("eval", help="perplexity of a model (PyTorch) or an exported folder (ONNX Runtime)")
    ev.add_argument(
        "--model", default=DEFAULT_MODEL, help="artifact folder with model.onnx, or a model as for export"
    )
    ev.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="where a PyTorch model runs"
    )
    ev.add_argument(
        "--accuracy-level",
        type=int,
        default=0,
        choices=(0, 1, 2, 3, 4),
        help="ORT MatMulNBits accuracy level (0 = float32, 4 = int8 activations)",
    )
    _add_eval_options(ev)

    val = sub.add_parser(
        "validate",
        help="check an artifact folder in ONNX Runtime against gates (exit 1 on a failed gate)",
        description="Perplexity, agreement with the FP model, generation, latency and size of an artifact, "
        "per execution provider, compared with gates; a table, optional JUnit XML, exit 1 on failure.",
    )
    val.add_argument("folder", type=Path, help="artifact folder written by edgeq export")
    val.add_argument("--junit", type=Path, help="write JUnit XML here (for CI systems)")
    _add_validation_options(val)

    ver = sub.add_parser("verify", help="re-check the sha256 of every file of an artifact folder")
    ver.add_argument("folder", type=Path, help="artifact folder with manifest.json")
    return parser


def _replace(options, **overrides):
    """``options`` with the overrides the user actually gave (None = not given)."""
    return dataclasses.replace(options, **{k: v for k, v in overrides.items() if v is not None})


def _bit_choices(text: str) -> tuple[int, ...]:
    try:
        return tuple(sorted({int(part) for part in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated widths like 2,4,8, got '{text}'"
        ) from None


def _clip(text: str) -> float | str:
    """--act-clip: a ratio, or 'search'."""
    if text == "search":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a ratio in (0, 1] or 'search', got '{text}'") from None


def export_config_from_args(args: argparse.Namespace) -> ExportConfig:
    quant = scheme_preset(args.scheme)
    weights = _replace(quant.weights, bits=args.bits, group_size=args.group_size, symmetric=args.symmetric)
    gptq = _replace(quant.gptq, act_order=args.act_order, percdamp=args.percdamp, clip_grid=args.clip_grid)
    boa = _replace(quant.boa, row_block=args.row_block, relaxed_v=args.relaxed_v, alpha=args.alpha)
    activations = _replace(
        quant.activations,
        bits=args.act_bits,
        symmetric=args.act_symmetric,
        clip_ratio=None if args.act_clip == "search" else args.act_clip,
        clip_search=None if args.act_clip is None else args.act_clip == "search",
        down_proj_bits=args.down_act_bits,
        kv_bits=args.kv_bits,
        shift=args.act_shift,
        compensate_rounding=args.act_compensate,
        kv_shift=args.kv_shift,
    )
    method = args.method or quant.method
    if args.act_compensate is None and activations.compensate_rounding:
        # a preset's compensation goes with the methods that can apply it; only the flag makes RTN refuse
        activations = dataclasses.replace(
            activations, compensate_rounding=method_class(method).compensates_rounding
        )
    # RTN rounds afterwards what an RTN objective rounded; the other methods choose their own integers
    objective = args.rotation_objective_weights or ("rtn" if method == "rtn" else None)
    rotation = _replace(
        quant.rotation,
        enabled=True if args.rotation and args.rotate is None else args.rotate,
        seed=args.rotation_seed,
        r5=args.r5,
        kind=args.rotation,
        steps=args.rotation_steps,
        samples=args.rotation_samples,
        lr=args.rotation_lr,
        objective_weights=objective,
    )
    aespa = _replace(quant.aespa, iterations=args.aespa_iterations)
    mixed = _replace(quant.mixed, avg_bits=args.avg_bits, bit_choices=args.bit_choices)
    quant = dataclasses.replace(
        quant,
        method=method,
        weights=weights,
        activations=activations,
        rotation=rotation,
        gptq=gptq,
        boa=boa,
        aespa=aespa,
        mixed=mixed,
        quantize_embedding=bool(args.quantize_embedding or quant.quantize_embedding),
        lm_head_bits=weights.bits if args.quantize_lm_head else args.lm_head_bits or quant.lm_head_bits,
    )
    return ExportConfig(
        model=args.model,
        quant=quant,
        calibration=CalibrationConfig(args.calib, args.calib_samples, args.calib_seq_len, args.seed),
        evaluation=EvalConfig(args.eval_text, args.eval_seq_len, args.eval_windows),
        format=args.format,
        qdq_form=args.qdq_form,
        device=args.device,
        dtype=args.dtype,
        validation=ValidationConfig(
            enabled=not args.no_validate,
            providers=_providers(args.providers),
            gates=_gates_from_args(args),
            threads=args.threads,
            latency_runs=args.latency_runs,
            decode_tokens=args.decode_tokens,
        ),
    )


def export_parser() -> argparse.ArgumentParser:
    """``edgeq export``'s options alone, raising EdgeqError where the CLI prints its error line."""
    parser = _RaisingParser(prog="edgeq export", add_help=False)
    add_export_options(parser)
    return parser


def export_config_from_argv(argv: list[str]) -> ExportConfig:
    """The ExportConfig ``edgeq export ARGV`` runs (``--out`` and the run flags have no effect on
    it); an option the CLI rejects raises EdgeqError with the CLI's message."""
    return export_config_from_args(export_parser().parse_args(argv))


def default_out(config: ExportConfig) -> Path:
    name = Path(config.model.rstrip("/")).name.removesuffix(".gguf")
    suffix = "" if config.format == "qdq" else f"-{config.format}"
    return Path("out") / f"{name}-{config.quant.scheme}-{config.quant.method}{suffix}"


def log_to_stderr() -> None:
    """edgeq's own progress messages on stderr; other libraries' logging is left as it is."""
    logger = logging.getLogger("edgeq")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("edgeq: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


class Terminated(BaseException):
    """SIGTERM, raised where the run is, so it unwinds as Ctrl-C's KeyboardInterrupt does."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


def resume_command(argv: list[str]) -> str:
    """The command line that continues an interrupted export: the same one, with --resume."""
    return shlex.join(["edgeq", *argv, *([] if "--resume" in argv else ["--resume"])])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    log_to_stderr()
    progress = not args.no_progress
    try:
        if args.command == "export":
            from edgeq.export import run_export

            config = export_config_from_args(args)
            out = args.out or default_out(config)
            previous = signal.signal(signal.SIGTERM, _raise_terminated)
            try:
                report = run_export(config, out, args.overwrite, progress, args.resume)
            except (KeyboardInterrupt, Terminated) as stop:
                print(f"edgeq: interrupted; resume with: {resume_command(argv)}", file=sys.stderr)
                return 143 if isinstance(stop, Terminated) else 130
            finally:
                signal.signal(signal.SIGTERM, previous)
            ppl = report["perplexity"]
            print(f"wrote {out}")
            rotated = f"  rotated {ppl['rotated_torch']:.3f}" if "rotated_torch" in ppl else ""
            print(
                f"perplexity  FP {ppl['fp_torch']:.3f}{rotated}  "
                f"quantized (PyTorch) {ppl['quant_torch']:.3f}  "
                f"ONNX (ORT CPU) {ppl['quant_onnx']['CPUExecutionProvider']['accuracy_level_0']:.3f}"
            )
            if "validation" in report and not report["validation"]["passed"]:
                print("edgeq: validation gates FAILED (see report.md)", file=sys.stderr)
                return 1
        elif args.command == "eval":
            from edgeq.export import evaluate

            result = evaluate(
                args.model,
                args.eval_text,
                args.eval_seq_len,
                args.eval_windows,
                args.accuracy_level,
                progress,
                args.device,
            )
            print(json.dumps(result))
        elif args.command == "validate":
            from edgeq.validate import format_table, junit_xml, validate

            result = validate(args.folder, list(_providers(args.providers)), _gates_from_args(args),
                              args.threads, progress, latency_runs=args.latency_runs,
                              decode_tokens=args.decode_tokens)  # fmt: skip
            print(format_table(result))
            if args.junit:
                args.junit.parent.mkdir(parents=True, exist_ok=True)
                args.junit.write_text(junit_xml(result))
            return 0 if result.passed else 1
        elif args.command == "verify":
            from edgeq.manifest import layout_problems, verify_bundle

            if not args.folder.is_dir():
                raise EdgeqError(f"artifact folder not found: {args.folder}")
            layout = layout_problems(args.folder)
            if layout:  # bad input, not a failed check: the folder is not the one exported
                raise EdgeqError(f"{args.folder} differs from its manifest.json: {'; '.join(layout)}")
            problems = verify_bundle(args.folder)
            for problem in problems:
                print(f"edgeq: {problem}", file=sys.stderr)
            print(f"{args.folder}: {'FAILED' if problems else 'all files match manifest.json'}")
            return 1 if problems else 0
    except EdgeqError as err:
        print(f"edgeq: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

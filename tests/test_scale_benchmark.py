"""benchmarks/scale.py's CPU-only parts: the sharded random-weight writer, the real shapes' parameter
counts, an init whose predictions survive 4-bit noise, a child's own peak RSS, the rows read from a
report, and the two checks the scale table must show."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import benchmark_module
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
MiB, GiB = 2**20, 2**30


@pytest.fixture(scope="module")
def sm():
    return benchmark_module("scale_models")


@pytest.fixture(scope="module")
def scale():
    return benchmark_module("scale")


TINY = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
}


@pytest.mark.parametrize("tied", [True, False])
def test_sharded_folder_reloads_exactly_what_was_written(sm, tmp_path, monkeypatch, tied):
    monkeypatch.setattr(sm, "CHUNK_BYTES", 4096)  # 16 row blocks for the embedding: the streaming path
    config = sm.hf_config({**TINY, "tie_word_embeddings": tied})
    folder = sm.build_model_folder(config, tmp_path / "m", seed=3)
    plan = sm.plan_tensors(config)

    index = json.loads((folder / sm.INDEX_FILE).read_text())
    names = set(AutoModelForCausalLM.from_config(config).state_dict()) - (
        {"lm_head.weight"} if tied else set()
    )
    assert set(index["weight_map"]) == names == {t.name for t in plan}
    assert index["metadata"]["total_size"] == sum(4 * math.prod(t.shape) for t in plan)
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]  # rest + one per block
    assert index["weight_map"]["model.layers.1.mlp.down_proj.weight"] == shards[2]
    assert (folder / sm.MARKER).read_text() == sm.marker_text(config, 3)

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    state = model.state_dict()
    for t in plan:
        assert torch.equal(state[t.name], sm.tensor_value(t, seed=3)), t.name
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])  # tied or copied
    assert torch.equal(state["model.norm.weight"], torch.full((64,), sm.SELF_LOGIT / 64))

    again = sm.build_model_folder(config, tmp_path / "again", seed=3)
    assert all((again / s).read_bytes() == (folder / s).read_bytes() for s in shards)  # deterministic


def test_a_built_model_is_reused_until_its_config_or_seed_changes(sm, tmp_path, monkeypatch):
    from conftest import byte_tokenizer

    monkeypatch.setitem(sm.SCALE_MODELS, "tiny", sm.ScaleModel("tiny", "none", TINY))
    monkeypatch.setattr(sm, "smollm2_tokenizer", byte_tokenizer)
    folder = sm.ensure_model("tiny", tmp_path, seed=0)
    assert (folder / "tokenizer.json").exists() and (folder / "config.json").exists()
    written = (folder / sm.MARKER).stat().st_mtime_ns
    assert sm.ensure_model("tiny", tmp_path, seed=0) == folder
    assert (folder / sm.MARKER).stat().st_mtime_ns == written  # reused, not rebuilt
    sm.ensure_model("tiny", tmp_path, seed=1)
    assert json.loads((folder / sm.MARKER).read_text())["seed"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no temporary folder left behind


@pytest.mark.parametrize(
    ("name", "published"),
    [
        ("smollm2-135m", 0.1345e9),
        ("qwen2.5-0.5b", 0.494e9),
        ("llama-3.2-1b", 1.24e9),
        ("llama-3.2-3b", 3.21e9),
    ],
)
def test_real_shapes_have_the_published_parameter_counts(sm, name, published):
    config = sm.hf_config(sm.SCALE_MODELS[name].config)
    assert sm.parameter_count(config) == pytest.approx(published, rel=5e-3)


def _rtn(w: torch.Tensor, bits: int = 4, group: int = 128) -> torch.Tensor:
    """w [rows, cols] on an asymmetric min-max grid of ``bits`` per group of ``group`` columns."""
    g = w.reshape(-1, group)
    lo, hi = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
    scale = (hi - lo).clamp_min(1e-12) / (2**bits - 1)
    return (((g - lo) / scale).round().clamp(0, 2**bits - 1) * scale + lo).reshape(w.shape)


def test_random_init_keeps_top1_agreement_under_4bit_noise(sm, tmp_path):
    # SmolLM2-135M's shapes at 2 layers: the fewer the layers, the larger each block's weights, so
    # this is the noisiest depth
    config = sm.hf_config({**sm.SCALE_MODELS["smollm2-135m"].config, "num_hidden_layers": 2})
    model = AutoModelForCausalLM.from_pretrained(sm.build_model_folder(config, tmp_path / "m")).eval()
    ids = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp = model(ids).logits
        for name, p in model.named_parameters():
            if ".layers." in name and p.ndim == 2:
                p.copy_(_rtn(p))
        quant = model(ids).logits

    def nll(logits: torch.Tensor) -> float:
        return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()

    assert (fp.argmax(-1) == ids).float().mean() == 1.0  # peaked at the input token
    assert (quant.argmax(-1) == fp.argmax(-1)).float().mean() >= 0.95  # the gate asks 0.5
    assert math.isfinite(nll(fp)) and math.exp(nll(quant) - nll(fp)) < 1.1  # the gate asks 2.0


def test_peak_rss_is_the_childs_alone(scale, tmp_path):
    held = b"\x01" * (320 * MiB)  # the parent's high-water mark, above the child's
    child = "import sys; b = b'\\x01' * (200 * 2**20); sys.exit(3)"
    run = scale.run_measured([sys.executable, "-c", child], tmp_path / "child.log")
    assert len(held) == 320 * MiB
    assert run["returncode"] == 3
    assert 200 * MiB <= run["peak_rss_bytes"] < 300 * MiB
    assert run["wall_s"] > 0


def _row(model: str, peak: float | None, params: float, error: str | None = None, method: str = "rtn"):
    return {"model": model, "method": method, "peak_rss_bytes": peak, "parameters": params, "error": error}


def test_must_show_checks(scale):
    small, big = _row("llama-3.2-1b", 4 * GiB, 1.24e9), _row("llama-3.2-3b", 6 * GiB, 3.21e9)
    checks = scale.must_show_checks([small, big, _row("llama-3.2-3b", 20 * GiB, 3.21e9, method="boa")])
    assert checks["peak_3b_within_limit"]["passed"] is True
    assert checks["peak_3b_within_limit"]["peak_rss_bytes"] == 6 * GiB
    ratio = checks["peak_ratio_below_parameter_ratio"]
    assert ratio["passed"] is True and ratio["peak_ratio"] == 1.5
    assert ratio["parameter_ratio"] == pytest.approx(3.21 / 1.24)

    over = scale.must_show_checks(
        [_row("llama-3.2-1b", 2 * GiB, 1.24e9), _row("llama-3.2-3b", 9 * GiB, 3.21e9)]
    )
    assert over["peak_3b_within_limit"]["passed"] is False  # 9 GiB > 8 GiB
    assert over["peak_ratio_below_parameter_ratio"]["passed"] is False  # 4.5 > 2.59

    failed = scale.must_show_checks([small, _row("llama-3.2-3b", 5 * GiB, 3.21e9, error="exit code -9")])
    assert failed["peak_3b_within_limit"]["passed"] is False
    assert failed["peak_ratio_below_parameter_ratio"]["passed"] is False

    missing = scale.must_show_checks([big])
    assert missing["peak_3b_within_limit"]["passed"] is True
    assert missing["peak_ratio_below_parameter_ratio"]["passed"] is None
    assert missing["main_job_within_limit"]["passed"] is None

    job = _row(scale.MAIN_JOB, 1.5 * GiB, 1.35e8, method="boa") | {"main_job": True}
    assert scale.must_show_checks([big, job])["main_job_within_limit"]["passed"] is True
    heavy = job | {"peak_rss_bytes": 2.5 * GiB}
    assert scale.must_show_checks([heavy])["main_job_within_limit"]["passed"] is False


def test_block_seconds_wherever_the_report_keeps_them(scale):
    assert scale.block_seconds({"timings_s": {"blocks_s": [1, 2]}}) == [1.0, 2.0]
    assert scale.block_seconds({"quantization": {"block_seconds": [3.5]}}) == [3.5]
    assert scale.block_seconds({"quantization": {"blocks": [{"seconds": 2}, {"seconds": 4}]}}) == [2.0, 4.0]
    assert scale.block_seconds({"timings_s": {"quantize_s": 9.0}, "quantization": {"layers": []}}) is None


REPORT = {
    "model": {"parameters": 1000},
    "timings_s": {"load_s": 1.0, "quantize_s": 20.0, "blocks_s": [4.0, 6.0]},
    "perplexity": {"fp_torch": 100.0, "quant_onnx": {"CPUExecutionProvider": {"accuracy_level_0": 110.0}}},
    "validation": {"passed": False},
}


def test_rows_come_from_the_report_and_failures_keep_their_log(scale, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text(json.dumps(REPORT))
    (out / "model.onnx").write_bytes(b"x" * 10)
    (out / "model.onnx_data").write_bytes(b"x" * 90)
    run = {"returncode": 1, "peak_rss_bytes": 3 * GiB, "wall_s": 50.0}
    row = scale.make_row("m", "rtn", run, out, tmp_path / "log", parameters=999)
    keys = ("model", "method", "parameters", "peak_rss_bytes", "wall_s", "timings_s", "block_seconds_mean")
    keys += ("onnx_bytes", "artifact_bytes", "validated", "perplexity", "error")
    assert set(keys) <= set(row)
    assert row["parameters"] == 1000 and row["onnx_bytes"] == 100
    assert row["artifact_bytes"] == 100 + len(json.dumps(REPORT))
    assert (row["block_seconds_mean"], row["block_seconds_max"]) == (5.0, 6.0)
    assert row["validated"] is False and row["error"] is None  # failed gates are a result, not an error

    log = tmp_path / "crash.log"
    log.write_text("".join(f"line {i}\n" for i in range(30)) + "MemoryError\n")
    crashed = scale.make_row("m", "boa", {**run, "returncode": -9}, tmp_path / "none", log, parameters=999)
    assert crashed["parameters"] == 999 and crashed["peak_rss_bytes"] == 3 * GiB
    assert crashed["error"].startswith("exit code -9") and crashed["error"].endswith("MemoryError")
    assert "line 10\n" not in crashed["error"]  # only the last lines

    results = {
        "settings": {
            "calib_samples": 8,
            "calib_seq_len": 128,
            "seed": 0,
            "eval_windows": 4,
            "eval_seq_len": 128,
            "latency_runs": 1,
            "decode_tokens": 8,
        },  # fmt: skip
        "machine": {"cpus": 2, "memory_bytes": 24 * GiB},
        "rows": [row, crashed],
        "checks": scale.must_show_checks([row, crashed]),
        "command": "python benchmarks/scale.py",
        "date": "2026-01-01",
    }
    table = scale.markdown(results)
    assert "| m | rtn | 0.000 | 3.00 | 50 | 20 | 5.0 / 6.0 | 0.00 | 0.00 | 1.100 | no |" in table
    assert "| m | boa |" in table and "failed: MemoryError |" in table
    assert table.count("not run") == 3  # the 3B peak, the ratio and the main job

    job_report = REPORT | {"perplexity": {**REPORT["perplexity"], "quant_torch": 109.0}}
    (out / "report.json").write_text(json.dumps(job_report))
    job = scale.make_row(scale.MAIN_JOB, "boa", {**run, "peak_rss_bytes": GiB}, out, log, 0) | {
        "main_job": True
    }
    results |= {"rows": [row, job], "checks": scale.must_show_checks([row, job])}
    table = scale.markdown(results)
    assert f"| {scale.MAIN_JOB} |" not in table  # not a random-weight row of the table
    assert "peak RSS 1.00 GiB ≤ 2 GiB: **pass**; perplexity FP 100.000, quantized PyTorch 109.000" in table


def test_every_export_flag_is_one_the_cli_takes(scale):
    from edgeq.cli import build_parser

    args = scale.parse_args([])
    assert scale.planned_rows(args) == [
        ("smollm2-135m", "rtn"), ("smollm2-135m", "boa"), ("qwen2.5-0.5b", "rtn"), ("qwen2.5-0.5b", "boa"),
        ("llama-3.2-1b", "rtn"), ("llama-3.2-3b", "rtn"),
    ]  # fmt: skip
    cli = scale.export_args(Path("/models/m"), "boa", Path("/tmp/out"), args, device=False)
    parsed = build_parser().parse_args(cli)
    assert (parsed.calib_samples, parsed.calib_seq_len, parsed.eval_seq_len) == (8, 128, 128)
    assert "--device" not in cli
    assert scale.export_args(Path("m"), "rtn", Path("o"), args, device=True)[-5:-3] == ["--device", "cpu"]
    main_job = build_parser().parse_args(scale.main_job_args(Path("/tmp/main")))
    # the scheme's defaults: BoA, qdq
    assert (main_job.model, main_job.scheme, main_job.method) == ("smollm2-135m", "w4a16", None)
    assert main_job.format == "qdq"


def test_readme_has_the_scale_markers(scale):
    text = (ROOT / "README.md").read_text()
    assert f"<!-- {scale.README_MARKER}: start -->" in text and f"<!-- {scale.README_MARKER}: end -->" in text

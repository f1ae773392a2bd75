"""The benchmark scripts' tables are computed from their results, and land only between the markers."""

from __future__ import annotations

from conftest import benchmark_module


def _weight_only():
    return benchmark_module("weight_only")


RESULTS = {
    "model": "m",
    "fp_perplexity": 10.0,
    "eval_windows": 4,
    "settings": {"calib_samples": 8, "calib_seq_len": 64, "seed": 0, "eval_seq_len": 128},
    "rows": [
        {"setting": "W4", "method": "rtn", "perplexity": 20.0, "seconds": 1.0, "peak_rss_bytes": 2**30},
        {"setting": "W4", "method": "gptq", "perplexity": 14.0, "seconds": 2.0, "peak_rss_bytes": 2**30},
        {"setting": "W4", "method": "boa", "perplexity": 12.0, "seconds": 5.0, "peak_rss_bytes": 2**30},
        {"setting": "W4", "method": "oac", "perplexity": 11.0, "seconds": 6.0, "peak_rss_bytes": 2**30},
    ],
    "command": "python benchmarks/weight_only.py",
    "date": "2026-01-01",
    "machine": {"cpus": 2},
}


def test_table_rows_and_ratios_come_from_the_results():
    table = _weight_only().markdown(RESULTS)
    assert "| W4 | boa | 12.00 | +2.00 |" in table
    assert "BoA's gap to FP is 0.50 × GPTQ's" in table
    assert "2.50 × GPTQ's" in table
    assert "OAC's gap to FP is 0.25 × GPTQ's; OAC's quantization time 3.00 × GPTQ's" in table
    assert "BoA-OAC" not in table  # no row, no line
    assert "| W4 | boa | 12.00 | +2.00 | 5 | 1.00 | — |" in table  # rows from before weight bytes


def test_aptq_rows_are_compared_with_uniform_w3_of_the_same_objective():
    module = _weight_only()
    grid = module.APTQ_GRID
    rows = [
        {"setting": grid, "method": "aespa", "perplexity": 30.0, "seconds": 1.0, "peak_rss_bytes": 2**30,
         "weight_bytes": 1_000_000},
        {"setting": "APTQ 3 bits", "method": "aespa", "perplexity": 25.0, "seconds": 1.0,
         "peak_rss_bytes": 2**30, "weight_bytes": 1_020_000, "avg_bits": 3.0, "allocated_bits": 2.998},
    ]  # fmt: skip
    table = module.markdown({**RESULTS, "rows": rows})
    assert "| APTQ 3 bits | aespa | 25.00 | +15.00 | 1 | 1.00 | 1.02 |" in table
    assert "APTQ 3 bits (aespa, 2.998 allocated): perplexity 25.00 against 30.00" in table
    assert "weight bytes +2.0% against uniform W3's" in table


def test_readme_is_updated_only_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        "before\n<!-- weight-only results: start -->\nold\n<!-- weight-only results: end -->\nafter\n"
    )
    benchmark_module("common").update_readme("new table\n", "weight-only results", readme)
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("after\n")
    assert "new table" in text and "old" not in text


def _w4a4_row(label, ppl, std=None, learning=0.0, objective="float", compensate=None, kv_bits=16):
    seeds = [{"seed": 0, "perplexity": ppl, "learning_seconds": learning}]
    config = {"rotation": {"objective_weights": objective}}
    if compensate is not None:  # rows written before compensate_rounding and kv_shift have no such keys
        config["activations"] = {"compensate_rounding": compensate, "kv_shift": True, "kv_bits": kv_bits}
    return {"label": label, "perplexity": ppl, "std": std, "seeds": seeds, "seconds": 9.0,
            "peak_rss_bytes": 2**30, "config": config}  # fmt: skip


W4A4_RESULTS = {
    "model": "m",
    "fp_perplexity": 10.0,
    "eval_windows": 4,
    "settings": {
        "calib_samples": 8,
        "calib_seq_len": 64,
        "seed": 0,
        "eval_seq_len": 128,
        "rotation_steps": 48,
        "rotation_samples": 16,
        "rotation_lr": 0.002,
        "speed_rounds": 5,
        "threads": 2,
    },  # fmt: skip
    "rotation": {"applied": {"r1": "randomized Hadamard 36 x 16"}, "skipped": {}},
    "rows": [
        _w4a4_row("no rotation + RTN", 9000.0),
        _w4a4_row("rotation + GPTQ", 16.0, 0.5),
        _w4a4_row("rotation + BoA", 14.0, 0.25),
        _w4a4_row("learned rotation + GPTQ", 14.5, 0.5, learning=120.0),
        _w4a4_row("learned rotation + BoA", 13.0, learning=110.0),
        _w4a4_row("rotation + RTN", 50.0),
        _w4a4_row("learned rotation + RTN", 30.0, learning=100.0, objective="rtn"),
        _w4a4_row("w4a4-down8 (down_proj input A8) + GPTQ", 13.0, compensate=True),
        _w4a4_row("w4a4-down8 (down_proj input A8) + BoA", 13.6, 0.5, compensate=True),
        _w4a4_row("w4a8 + GPTQ", 12.0, compensate=False),
        _w4a4_row("w4a8 + BoA", 11.0),
        _w4a4_row("w4a4 + KV4 + GPTQ", 17.0),
        _w4a4_row("w4a4 + KV4 + BoA", 16.5, compensate=False, kv_bits=4),
        _w4a4_row("w4a4 + KV8 + BoA", 15.0, compensate=False, kv_bits=8),
    ],
    "fused": {
        "graph": "fused",
        "torch_perplexity": 14.0,
        "ort_perplexity": 14.14,
        "top1_agreement": 0.9,
        "bytes": 1e8,
        "speed": {
            "w4a4 ort": {"tokens_per_s": 95.0, "nodes": 2000},
            "w4a16 ort": {"tokens_per_s": 100.0, "nodes": 300},
        },
    },  # fmt: skip
    "command": "python benchmarks/w4a4.py",
    "date": "2026-01-01",
    "machine": {"cpus": 2},
}


def test_w4a4_table_must_shows_and_speed_come_from_the_results():
    table = benchmark_module("w4a4").markdown(W4A4_RESULTS)
    assert "| rotation + BoA | 14.00 ± 0.25 | 1.40 | ≤ 1.5 × ✓ | 9 | 1.00 |" in table
    assert "| w4a8 + BoA | 11.00 | 1.10 | ≤ 1.15 × ✓ |" in table
    assert "| w4a4-down8 (down_proj input A8) + BoA | 13.60 ± 0.50 | 1.36 | ≤ 1.35 × ✗ |" in table
    compensated = "`w4a4-down8 (down_proj input A8) + GPTQ`; `w4a4-down8 (down_proj input A8) + BoA`."
    assert f"Weights compensating the activations' rounding (`--act-compensate`): {compensated}" in table
    # only the row that quantizes its KV cache; w4a8's kv_shift has nothing to shift, KV4 GPTQ's no key
    assert (
        "KV cache int4 with keys and values shifted by their calibration means (`--kv-shift`): "
        "`w4a4 + KV4 + BoA`." in table
    )
    assert (
        "KV cache int8 with keys and values shifted by their calibration means (`--kv-shift`): "
        "`w4a4 + KV8 + BoA`." in table
    )  # each width from its rows' configs
    assert "| w4a8 + GPTQ | 12.00 | 1.20 |  |" in table  # the limit is the preset's (BoA's)
    assert "| no rotation + RTN | 9000.00 | 900.00 |  |" in table
    assert "| w4a4 + KV4 + BoA | 16.50 | 1.65 | ≤ 1.6 × ✗ |" in table
    assert "| w4a4 + KV4 + GPTQ | 17.00 | 1.70 |  |" in table
    # (16 − 14.5) / (16 − 10) with GPTQ, (50 − 30) / (50 − 10) with RTN
    assert "close 25 % of the randomized Hadamard's gap to FP (GPTQ weights, float weights" in table
    assert "seeds 0: 14.50 against 16.00" in table and "120 s of learning per run" in table
    # (14 − 13) / (14 − 10) with BoA, against the preset row's seed 0
    assert "close 25 % of the randomized Hadamard's gap to FP (BoA weights, float weights" in table
    assert "seeds 0: 13.00 against 14.00" in table and "110 s of learning per run" in table
    assert "close 50 % of the randomized Hadamard's gap to FP (RTN weights, rtn weights" in table
    assert "30.00 against 50.00" in table and "100 s of learning per run" in table
    # 1000/95 − 1000/100 ms for 1700 nodes
    assert "holds 2000 nodes against 300; its 1700 more cost 0.5 ms a step, 0.3 µs each" in table
    assert "BoA against GPTQ at W4A4: 14.00 ± 0.25 against 16.00 ± 0.50" in table
    assert "(+1.0 %; must show within 2 %)" in table
    assert "95.0 tokens/s against 100.0" in table and "0.95 ×" in table
    assert "R1 randomized Hadamard 36 x 16" in table

    assert "Produced by `python benchmarks/w4a4.py` on 2026-01-01." in table  # every run on that day


def test_w4a4_table_names_the_dates_of_resumed_runs():
    results = dict(W4A4_RESULTS, rows=[dict(r) for r in W4A4_RESULTS["rows"]])
    results["rows"][1] = dict(
        results["rows"][1], seeds=[{"seed": 0, "perplexity": 16.0, "date": "2025-12-31"}]
    )
    table = benchmark_module("w4a4").markdown(results)
    assert "on 2026-01-01 (resumed: the other runs on 2025-12-31)." in table


def test_w4a4_rows_override_the_presets_rotation():
    w4a4 = benchmark_module("w4a4")
    assert w4a4.Row("x", "w4a4", "boa", rotation={"r5": True}).config(4, 2, 0.01).rotation.r5
    config = w4a4.Row("x", "w4a4", "boa", rotation={"r5": False}).config(4, 2, 0.01)
    assert not config.rotation.r5 and config.rotation.r4 and config.rotation.enabled
    assert "rotation + BoA, no R5" in {row.label for row in w4a4.ROWS}


def test_w4a4_run_log_resumes_only_runs_of_the_same_code_and_settings(tmp_path):
    w4a4 = benchmark_module("w4a4")
    config = w4a4.Row("x", "w4a4", "gptq").config(4, 2, 0.01)
    settings = {"calib_samples": 32}
    key = w4a4.run_key(config, 0, settings, "code-a")
    others = {
        w4a4.run_key(config, 1, settings, "code-a"),
        w4a4.run_key(config, 0, {"calib_samples": 64}, "code-a"),
        w4a4.run_key(config, 0, settings, "code-b"),
        w4a4.run_key(w4a4.Row("x", "w4a4", "boa").config(4, 2, 0.01), 0, settings, "code-a"),
    }
    assert key not in others and len(others) == 4
    path = tmp_path / "w4a4.runs.jsonl"
    log = w4a4.RunLog(path, resume=False)
    log.add(key, {"seed": 0, "perplexity": 40.0})
    assert w4a4.RunLog(path, resume=True).get(key) == {"seed": 0, "perplexity": 40.0}
    assert all(w4a4.RunLog(path, resume=True).get(k) is None for k in others)
    assert w4a4.RunLog(path, resume=False).get(key) is None and not path.exists()  # a fresh run
    log = w4a4.RunLog(path, resume=True)
    log.add(key, {"seed": 0})
    log.close()  # the run completed
    assert not path.exists()


def test_w4a4_code_fingerprint_follows_the_code(tmp_path):
    w4a4 = benchmark_module("w4a4")
    for name in (
        "edgeq/a.py",
        "edgeq/quant/b.py",
        "exporters/c.py",
        "benchmarks/w4a4.py",
        "benchmarks/common.py",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    before = w4a4.code_fingerprint(tmp_path)
    (tmp_path / "README.md").write_text("not code")
    assert w4a4.code_fingerprint(tmp_path) == before
    (tmp_path / "edgeq/quant/b.py").write_text("x = 2\n")
    assert w4a4.code_fingerprint(tmp_path) != before


def _compare_row(key, kind, ppl, tps, error=None, lm_head="float"):
    measured = error is None
    return {
        "key": key, "label": key.upper(), "kind": kind, "settings": {}, "perplexity": ppl, "error": error,
        "quantization_seconds": 3.0 if kind != "fp32" and measured else None, "export_seconds": 1.0,
        "rss_before_bytes": None, "peak_rss_bytes": 2**30 if kind != "fp32" and measured else None,
        "bytes": 5e8 if measured else None, "lm_head": lm_head if measured else None,
        "prefill_ms": 100.0 if measured else None, "decode_tokens_per_s": tps,
        "prefill_vs_fp32": 1.0 if measured else None, "decode_vs_fp32": tps / 10.0 if measured else None,
        "speed": {"prompt_tokens": 128, "new_tokens": 64, "repeats": 5},
    }  # fmt: skip


COMPARE_RESULTS = {
    "model": "m",
    "fp_perplexity": 10.0,
    "eval_windows": 4,
    "settings": {
        "calib_samples": 8,
        "calib_seq_len": 64,
        "seed": 0,
        "eval_seq_len": 128,
        "eval_windows": "4",
        "threads": 2,
    },
    "packages": {"onnxruntime": "1.0"},
    "rows": [
        _compare_row("fp32", "fp32", 10.0, 10.0) | {"lm_head_weight": "Transpose"},
        _compare_row("ort-rtn-asym", "ort-quantizer", None, None, error="ValueError: a | b"),
        _compare_row("edgeq-boa-g128", "edgeq", 12.0, 25.0),
    ],
    "command": "python benchmarks/compare.py",
    "date": "2026-01-01",
    "machine": {"cpus": 2},
}


def _peer_row(key, toolkit, ppl, peer_ppl=None, error=None):
    """A peer row as run_peer_row leaves it: PyTorch perplexity, no ONNX size or speed."""
    row = _compare_row(key, "peer", ppl, 0.0, error=error) | {
        "bytes": None, "prefill_ms": None, "prefill_vs_fp32": None, "decode_vs_fp32": None,
        "decode_tokens_per_s": None,
        "quantization_seconds": None if error else 40.0, "peak_rss_bytes": None if error else 2**29,
        "settings": {"toolkit": toolkit, "recipe": "r"},
    }  # fmt: skip
    if error is None:
        versions = {"torch": "2.13.0", "transformers": "5.0", toolkit: "7.6.0"}
        row["settings"]["peer"] = {"versions": versions, "settings": {}}
        row |= {"peer_perplexity": peer_ppl, "scored_in": "edgeq" if peer_ppl else "peer"}
    return row


def test_compare_table_shows_peer_rows_without_onnx_columns_and_says_how_they_were_scored(tmp_path):
    compare = benchmark_module("compare")
    rows = [
        *COMPARE_RESULTS["rows"],
        _peer_row("gptqmodel-gptq-g128", "gptqmodel", 13.0, peer_ppl=13.1),
        _peer_row("llmcompressor-gptq-g128", "llmcompressor", None, error="ValueError: not divisible"),
        _peer_row("llmcompressor-w4a4", "llmcompressor", 20.0),
    ]
    results = {**COMPARE_RESULTS, "rows": rows}
    table = compare.markdown(results, "compare.png")
    assert (
        "| GPTQMODEL-GPTQ-G128 | `gptqmodel-gptq-g128` | float | 13.00 |  | 40 | 0.50 |  |  |  |  |" in table
    )
    assert "| `llmcompressor-gptq-g128` |  | failed: ValueError: not divisible |" in table
    assert "GPTQModel 7.6.0 with torch 2.13.0, transformers 5.0" in table
    assert "(edgeq's scoring in brackets): `gptqmodel-gptq-g128` 13.10 (13.00)." in table
    assert "`llmcompressor-w4a4` 20.00" not in table  # scored only in its own forward pass: no pair
    compare.plot(results, tmp_path / "compare.png")  # peer rows as lines: no speed to place them
    assert (tmp_path / "compare.png").stat().st_size > 0
    assert "other toolkits" not in compare.markdown(COMPARE_RESULTS)  # no peer rows, no word of them


def test_compare_table_has_failures_ratios_and_the_plot(tmp_path):
    compare = benchmark_module("compare")
    table = compare.markdown(COMPARE_RESULTS, "compare.png")
    assert "| ORT-RTN-ASYM | `ort-rtn-asym` |  | failed: ValueError: a \\| b |" in table
    assert (
        "| EDGEQ-BOA-G128 | `edgeq-boa-g128` | float | 12.00 | 500.0 | 3 | 1.00 | 100 | 1.00 | 25.0 | 2.50 |"
        in table
    )
    assert "the first 4 windows of 128 tokens" in table and "![" in table
    assert "Transpose node" not in table  # only when an ORT row left lm_head in float
    compare.plot(COMPARE_RESULTS, tmp_path / "compare.png")
    assert (tmp_path / "compare.png").stat().st_size > 0


def test_compare_rows_select_by_key_or_label_and_always_keep_fp32():
    compare = benchmark_module("compare")
    assert [r.key for r in compare.select_rows("edgeq-w4a4-boa,ORT HQQ block 128")] == [
        "fp32", "ort-hqq", "edgeq-w4a4-boa",
    ]  # fmt: skip
    assert [r.kind for r in compare.select_rows("llmcompressor-w4a4,gptqmodel-gptq-g128")] == [
        "fp32",
        "peer",
        "peer",
    ]
    assert len({r.key for r in compare.ROWS}) == len(compare.ROWS)


def test_w4a4_counts_the_nodes_onnx_runtime_runs(tmp_path):
    """A bias Add after MatMulNBits is fused into it when ONNX Runtime loads the graph: one node."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k, n, block = 32, 8, 32
    initializers = [
        numpy_helper.from_array(np.zeros((n, k // block, block // 2), np.uint8), "B"),
        numpy_helper.from_array(np.ones(n * k // block, np.float32), "scales"),
        numpy_helper.from_array(np.ones(n, np.float32), "bias"),
    ]
    shape = {"K": k, "N": n, "bits": 4, "block_size": block}
    nodes = [
        helper.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], domain="com.microsoft", **shape),
        helper.make_node("Add", ["y", "bias"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, n])], initializers,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), tmp_path / "model.onnx")
    assert benchmark_module("w4a4").runtime_nodes(tmp_path) == 1


def test_compare_finds_the_lm_head_by_the_logits_output_not_by_name():
    import onnx
    from onnx import TensorProto, helper

    compare = benchmark_module("compare")
    nodes = [
        helper.make_node("MatMul", ["h", "w1"], ["x"], name="a"),
        helper.make_node("MatMul", ["x", "w2"], ["y"], name="whatever"),
        helper.make_node("Cast", ["y"], ["logits"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes, "g", [], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)]
    )
    assert compare.lm_head_node(graph).name == "whatever"
    assert compare.lm_head_node(onnx.GraphProto()) is None


def test_reliability_table_says_what_each_run_showed():
    module = benchmark_module("reliability")
    run = {"exit_status": 0, "seconds": 100.0, "last_line": ""}
    results = {
        "model": "m",
        "blocks": 30,
        "command_line": "edgeq.cli export --model m --out OUT",
        "runs": {
            "first": run,
            "second": {**run, "seconds": 101.0},
            "killed": {
                "exit_status": 143,
                "seconds": 50.0,
                "blocks_recorded": 15,
                "last_line": "edgeq: interrupted; resume with: edgeq export --resume",
            },
            "resumed": {**run, "seconds": 60.0},
        },  # fmt: skip
        "determinism": {
            "identical_files": {"model.onnx": True, "model.onnx_data": False},
            "manifest_equal_outside_run": True,
        },  # fmt: skip
        "resume": {
            "identical_files": {"model.onnx": True, "model.onnx_data": True},
            "content_sha256_equal": True,
        },  # fmt: skip
        "date": "2026-01-01",
    }
    table = module.markdown(results)
    assert "| 3: SIGTERM after 15 of 30 blocks | 50 | exit 143; `edgeq: interrupted" in table
    # one file differed: the whole comparison says no
    assert "files identical to run 1: **no**; manifests equal outside `run`: yes" in table
    assert "| 4: `--resume` | 60 | files identical to run 1: yes; content_sha256 equal: yes |" in table


def test_openvino_table_gives_openvino_relative_to_ort_level_0_and_names_what_did_not_run():
    row = {"pytorch": 40.0, "ort_level_0": 40.0, "ort_level_4": 40.4, "openvino_cpu_defaults": 40.2}
    results = {
        "model": "m",
        "eval_windows": 4,
        "rows": {
            "a": {"label": "w4a16 RTN g128", **row, "openvino_f32_exact": 39.8},
            "b": {"label": "w4a4 GPTQ", **row, "openvino_f32_exact": None, "openvino_cpu_defaults": None},
        },
        "command": "python benchmarks/openvino_qdq.py",
        "date": "2026-01-01",
    }
    table = benchmark_module("openvino_qdq").table(results)
    form = "`--qdq-form openvino`"
    assert f"| w4a16 RTN g128, {form} | 40.000 | 40.000 | 40.400 | 39.800 (-0.50 %) | 40.200 |" in table
    assert f"| w4a4 GPTQ, {form} | 40.000 | 40.000 | 40.400 | not run | not run |" in table

"""Real-model integration: SmolLM2-135M (the built-in default) exported end to end, as CI runs it.

Few calibration sequences and evaluation windows keep it to a couple of minutes; the full
measurements live in benchmarks/.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeq.cli import main
from edgeq.config import CalibrationConfig, EvalConfig, ExportConfig, QuantConfig, WeightQuantConfig
from edgeq.data import bos_convention, prepare_text_data
from edgeq.evaluation import perplexity, torch_logits_fn
from edgeq.export import ONNX_PARITY_TOLERANCE_QUANTIZED_ACTS
from edgeq.models.adapters import adapter_for, adapter_for_config
from edgeq.models.loading import _builtin_gguf_path, load_config, load_model, load_tokenizer, resolve_model
from edgeq.pipeline import quantize_model

pytestmark = pytest.mark.slow

EVAL_WINDOWS = 6


@pytest.fixture(scope="module")
def smollm2_artifact(tmp_path_factory) -> Path:
    pytest.importorskip("gguf")
    try:
        _builtin_gguf_path("smollm2-135m")
    except Exception as err:  # the package is installed by the README's test command
        pytest.fail(f"SmolLM2 GGUF not available: {err}")
    out = tmp_path_factory.mktemp("smollm2") / "w4a16-rtn"
    status = main([
        "--no-progress", "export", "--model", "smollm2-135m", "--scheme", "w4a16", "--method", "rtn",
        "--group-size", "128", "--calib-samples", "4", "--calib-seq-len", "256",
        "--eval-windows", str(EVAL_WINDOWS), "--latency-runs", "1", "--decode-tokens", "8", "--out", str(out),
    ])  # fmt: skip
    assert status == 0
    return out


def test_onnx_perplexity_matches_pytorch_fake_quant(smollm2_artifact):
    report = json.loads((smollm2_artifact / "report.json").read_text())
    ppl = report["perplexity"]
    onnx_ppl = ppl["quant_onnx"]["CPUExecutionProvider"]["accuracy_level_0"]
    assert abs(onnx_ppl - ppl["quant_torch"]) / ppl["quant_torch"] <= 0.005
    assert report["onnx_parity"]["passed"] and report["onnx_parity"]["top1_agreement"] >= 0.99
    # a real language model: FP perplexity of a 135M model on WikiText-2, and 4-bit RTN costs some
    assert 10 < ppl["fp_torch"] < 60
    assert ppl["fp_torch"] < ppl["quant_torch"] < 2 * ppl["fp_torch"]
    assert report["evaluation"]["windows"] == EVAL_WINDOWS
    validation = report["validation"]
    assert validation["passed"], validation["gates"]
    cpu = validation["providers"]["CPUExecutionProvider"]
    assert cpu["generation_ok"] and cpu["decode_tokens_per_s"]["p50"] > 0
    assert 0 < cpu["kl_fp"] < 1 and 0.5 < cpu["top1_agreement_fp"] < 1
    assert report["onnx"]["quantized_weights"] == 7 * 30 + 1  # and the preset's int8 lm_head
    # int4 blocks + fp32 embedding: far below the fp32 parameters
    assert report["sizes_bytes"]["onnx_model"] < 0.4 * report["sizes_bytes"]["fp32_parameters"]


def test_artifact_holds_config_tokenizer_and_int4_weights(smollm2_artifact):
    import onnx

    config = ExportConfig.from_dict(json.loads((smollm2_artifact / "edgeq_config.json").read_text()))
    assert config.quant.weights.group_size == 128 and config.quant.method == "rtn"
    for name in ("model.onnx", "config.json", "tokenizer.json", "report.json", "report.md", "MODEL_CARD.md"):
        assert (smollm2_artifact / name).exists(), name
    from edgeq.manifest import verify_bundle

    assert verify_bundle(smollm2_artifact) == []
    graph = onnx.load(str(smollm2_artifact / "model.onnx"), load_external_data=False).graph
    dq = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 7 * 30 + 1  # the block linears and lm_head
    assert all({a.name: a.i for a in n.attribute}["block_size"] == 128 for n in dq)
    int4 = [t for t in graph.initializer if t.data_type == onnx.TensorProto.UINT4]
    assert len(int4) == 2 * 7 * 30  # codes and zero points
    int8 = [t for t in graph.initializer if t.data_type == onnx.TensorProto.UINT8]
    assert [tuple(t.dims) for t in int8] == [(576, 49152), (5, 49152)]  # lm_head's codes, zero points


def test_optimum_generate_runs_the_artifact(smollm2_artifact):
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_artifact)
    model = ORTModelForCausalLM.from_pretrained(smollm2_artifact)
    ids = tokenizer("The capital of France is", return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.input_ids.shape[1] + 8
    text = tokenizer.decode(out[0, ids.input_ids.shape[1] :])
    assert text.strip()


def test_kv_cache_decode_matches_a_full_prefill(smollm2_artifact):
    """Feeding tokens one by one through the KV cache gives the prefill's last logits."""
    from edgeq.evaluation import OrtCausalLM

    lm = OrtCausalLM(smollm2_artifact)
    ids = torch.randint(100, 40000, (1, 12), generator=torch.Generator().manual_seed(0))
    full = lm.logits(ids)[0, -1].numpy()
    feeds_past = lm.empty_past(1)
    for t in range(ids.shape[1]):
        step = ids[:, t : t + 1].numpy()
        feeds = {
            "input_ids": step,
            "attention_mask": np.ones((1, t + 1), np.int64),
            "position_ids": np.array([[t]], np.int64),
            **feeds_past,
        }
        outputs = lm.session.run(None, feeds)
        names = [o.name for o in lm.session.get_outputs()]
        result = dict(zip(names, outputs, strict=True))
        feeds_past = {
            name.replace("present", "past_key_values"): value
            for name, value in result.items()
            if name.startswith("present")
        }
    np.testing.assert_allclose(result["logits"][0, -1], full, rtol=1e-3, atol=1e-3)
    assert math.isfinite(float(np.abs(full).max()))


def test_openvino_rejects_the_qdq_artifact_and_runs_its_openvino_form_as_ort_does(smollm2_artifact, tmp_path):
    """The second QDQ consumer on the real model: OpenVINO's ONNX frontend rejects the w4a16 qdq
    artifact (576 inputs are 4.5 blocks of 128); the same graph rewritten into the form it reads
    (``--qdq-form openvino``, here applied to the fixture's graph, no second export) scores the
    stored evaluation windows within 1 % of ONNX Runtime's perplexity on the artifact."""
    import shutil

    import onnx

    from edgeq.errors import EdgeqError
    from edgeq.openvino_runtime import OpenVinoCausalLM
    from edgeq.validate import load_fp_reference
    from exporters.openvino_form import to_openvino_form

    pytest.importorskip("openvino")
    with pytest.raises(EdgeqError, match=r"axis 0 \(576\) cannot be divided by block_size \(128\)"):
        OpenVinoCausalLM(smollm2_artifact)
    graph = onnx.load(str(smollm2_artifact / "model.onnx"))  # with its external data
    # q/k/v/o/gate/up of 30 blocks and lm_head read 576 inputs; down_proj's 1536 are 12 blocks
    assert to_openvino_form(graph) == {"ragged_weights_split": 6 * 30 + 1, "activation_pairs_per_axis": 0}
    shutil.copy2(smollm2_artifact / "config.json", tmp_path / "config.json")
    onnx.save_model(
        graph, str(tmp_path / "model.onnx"), save_as_external_data=True, location="model.onnx_data"
    )
    del graph
    windows = torch.from_numpy(load_fp_reference(smollm2_artifact).ids.astype(np.int64))
    report = json.loads((smollm2_artifact / "report.json").read_text())
    ort_ppl = report["perplexity"]["quant_onnx"]["CPUExecutionProvider"]["accuracy_level_0"]
    # float32 without dynamic quantization (cpu_defaults depends on the CPU: int8 activations with
    # VNNI or AMX, bfloat16 with AMX), like ORT's accuracy level 0 in the report
    ov_ppl = perplexity(OpenVinoCausalLM(tmp_path, "f32_exact").logits, windows, progress=False)
    assert abs(ov_ppl - ort_ppl) / ort_ppl < 0.01, (ov_ppl, ort_ppl)


def test_smollm2_has_no_bos_as_its_gguf_says_through_both_loaders():
    """transformers' GGUF converter builds a tokenizer that adds BOS; SmolLM2's GGUF says it must not
    (tokenizer.ggml.add_bos_token = false), and its evaluation keeps the papers' no-BOS protocol."""
    for spec in ("smollm2-135m", str(_builtin_gguf_path("smollm2-135m"))):
        source = resolve_model(spec)
        tokenizer = load_tokenizer(source)
        assert tokenizer("Hello").input_ids == tokenizer("Hello", add_special_tokens=False).input_ids
        bos = bos_convention(tokenizer, adapter_for_config(load_config(source)))
        assert bos.token_id is None and bos.source == "tokenizer"


def test_a_gguf_file_path_resolves_to_a_llama():
    gguf = _builtin_gguf_path("smollm2-135m")
    source = resolve_model(str(gguf))
    assert source.gguf_file == gguf.name
    assert load_config(source).model_type == "llama"


def test_gptq_and_boa_beat_rtn_at_w3_per_channel():
    """The calibrated methods on the real model (few samples: the orderings between GPTQ and BoA
    need the benchmark's calibration set; see benchmarks/weight_only.py)."""
    source = resolve_model("smollm2-135m")
    data = prepare_text_data(
        load_tokenizer(source), CalibrationConfig(None, 4, 128), EvalConfig(None, 512, 2)
    )
    ppl = {}
    for method in ("rtn", "gptq", "boa"):
        model = load_model(source)
        config = QuantConfig(method=method, weights=WeightQuantConfig(bits=3, group_size=-1))
        quantize_model(model, adapter_for(model), config, data.calibration, progress=False)
        ppl[method] = perplexity(torch_logits_fn(model), data.evaluation, progress=False)
    assert ppl["gptq"] < 0.8 * ppl["rtn"]
    assert ppl["boa"] < 0.8 * ppl["rtn"]


@pytest.fixture(scope="module")
def smollm2_w4a4_artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "w4a4-gptq-ort"
    # GPTQ, not RTN: RTN at W4A4 sits near 10 × FP, where rounding flips between runtimes move
    # perplexity by 5-7 % (ORT's own accuracy levels 0 and 4 differed by 4 % on the same graph);
    # GPTQ's 1.8 × leaves the 2 % statistical parity gate meaningful
    status = main([
        "--no-progress", "export", "--model", "smollm2-135m", "--scheme", "w4a4", "--method", "gptq",
        "--calib-samples", "4", "--calib-seq-len", "256", "--eval-windows", str(EVAL_WINDOWS),
        "--latency-runs", "1", "--decode-tokens", "8", "--format", "ort", "--out", str(out),
        "--max-ppl-ratio", "2.5", "--min-top1", "0.05",
    ])  # fmt: skip
    assert status == 0
    return out


def test_rotation_leaves_smollm2_unchanged():
    from edgeq.config import RotationConfig
    from edgeq.rotation.rotate import rotate_model

    model = load_model(resolve_model("smollm2-135m"))
    ids = torch.randint(100, 40000, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        report = rotate_model(model, adapter_for(model), RotationConfig(enabled=True), kv_quantized=True)
        after = model(ids).logits
    assert set(report.applied) == {"r1", "r2", "r3", "r4"}
    assert report.applied["r1"] == "randomized Hadamard 36 x 16"
    assert report.applied["r4"] == "online Hadamard 12 x 128"
    assert float((after - before).abs().max() / before.abs().max()) < 1e-3


def test_w4a4_ort_format_export_reports_rotations_and_matches_pytorch(smollm2_w4a4_artifact):
    import onnx

    report = json.loads((smollm2_w4a4_artifact / "report.json").read_text())
    ppl = report["perplexity"]
    # quantized activations: rounding flips cascade between runtimes, so parity is statistical
    # (edgeq.export.ONNX_PARITY_TOLERANCE_QUANTIZED_ACTS): perplexity only, top-1 reported. On this
    # fixture's 6 windows the flips alone move perplexity by a few percent: ORT's own accuracy levels
    # 0 and 4 differed by 4.5 % on the same graph when PyTorch's GPTQ ran on one thread (ORT vs
    # PyTorch 3.3 %), by 0.2 % on two (1.35 %); with R5 on in the preset, ORT against PyTorch was
    # 2.96 % (2026-12-07) where benchmarks/w4a4.py's 40 windows put the same graph kind within 0.4 %.
    # So ORT may differ from PyTorch here by twice the export's 2 % gate (set for its default 40
    # windows) or by as much as ORT differs from itself, not more.
    assert report["onnx_parity"]["min_top1_agreement"] is None
    levels = ppl["quant_onnx"]["CPUExecutionProvider"]
    own_spread = abs(levels["accuracy_level_4"] - levels["accuracy_level_0"]) / levels["accuracy_level_0"]
    allowed = max(2 * ONNX_PARITY_TOLERANCE_QUANTIZED_ACTS, own_spread)
    assert report["onnx_parity"]["relative_difference"] <= allowed
    graph = onnx.load(str(smollm2_w4a4_artifact / "model.onnx"), load_external_data=False).graph
    # the fused graph (float KV cache): q/k/v in one MatMulNBits, o, gate, up, down, the int8 lm_head
    assert report["onnx"]["graph"] == "fused"
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 5 * 30 + 1
    # every block linear's input is a per-token int4 QuantizeLinear → DequantizeLinear pair, one per
    # tensor: q/k/v share theirs, as do gate/up (four per block); the preset's asymmetric grid
    # rounds each pair's zero point with one more QuantizeLinear
    dequantized = {n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    quantize = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert sum(n.output[0] in dequantized for n in quantize) == 4 * 30
    assert len(quantize) == 8 * 30
    assert set(report["rotation"]["applied"]) == {"r1", "r2", "r4", "r5"}  # R5: on in the preset
    assert "r3" in report["rotation"]["skipped"]  # the KV cache stays float in the w4a4 preset
    assert abs(ppl["rotated_torch"] - ppl["fp_torch"]) / ppl["fp_torch"] < 1e-3
    assert ppl["quant_torch"] > ppl["fp_torch"]
    config = ExportConfig.from_dict(json.loads((smollm2_w4a4_artifact / "edgeq_config.json").read_text()))
    assert config.quant.activations.bits == 4 and config.quant.rotation.enabled


def test_onnxruntime_genai_runs_the_ort_artifact_token_for_token(smollm2_w4a4_artifact):
    """The w4a4 ort artifact in onnxruntime-genai, from its genai_config.json: the greedy tokens of
    edgeq's own decode loop, the source tokenizer's ids (genai misread the GGUF-converted tokenizer
    until the export declared it byte-level), and the README's lines as written."""
    from genai_checks import assert_readme_lines_run, assert_same_tokenization
    from transformers import AutoTokenizer

    folder = smollm2_w4a4_artifact
    genai = json.loads((folder / "report.json").read_text())["genai"]
    assert genai["config"] == "genai_config.json" and genai["past_present_share_buffer"]
    assert len(genai["tokenizer_changes"]) == 2  # the class and the decoder's SentencePiece steps
    source = load_tokenizer(resolve_model("smollm2-135m"))
    shipped = AutoTokenizer.from_pretrained(folder)
    texts = ["The capital of France is", " = Valkyria Chronicles III = \n\n Senjō no Valkyria 3 : 2011 ,",
             "naïve café — 3.14  two  spaces\tand a tab", "<|im_start|>user\nhello<|im_end|>"]  # fmt: skip
    assert_same_tokenization(folder, texts)
    for text in texts:
        assert shipped(text).input_ids == source(text).input_ids
    every = [[i] for i in range(len(source))]
    assert shipped.batch_decode(every) == source.batch_decode(every)  # every id decodes as before
    # the README's lines print the prompt and its greedy continuation, as edgeq's decode loop computes it
    assert "France" in assert_readme_lines_run(folder)


def test_rotation_is_what_makes_w4a4_work():
    """W4A4 RTN without rotations is far worse than with them (the outliers QuaRot removes)."""
    import dataclasses

    from edgeq.config import scheme_preset
    from edgeq.rotation.rotate import rotate_model

    source = resolve_model("smollm2-135m")
    data = prepare_text_data(
        load_tokenizer(source), CalibrationConfig(None, 2, 128), EvalConfig(None, 512, 3)
    )
    ppl = {}
    for rotate in (False, True):
        model = load_model(source)
        adapter = adapter_for(model)
        config = scheme_preset("w4a4")
        config = dataclasses.replace(
            config, method="rtn", rotation=dataclasses.replace(config.rotation, enabled=rotate)
        )
        rotate_model(model, adapter, config.rotation)
        quantize_model(model, adapter, config, data.calibration, progress=False)
        ppl[rotate] = perplexity(torch_logits_fn(model), data.evaluation, progress=False)
    assert ppl[False] > 5 * ppl[True]


def test_fused_ort_graph_on_smollm2_matches_pytorch(tmp_path):
    """The ort format's fused graph on the real model at group 128: hidden 576 = 4.5 × 128, so every
    q/k/v/gate/up row has five blocks (an odd count: one packed zero-point byte holds half a pair)."""
    from collections import Counter

    import onnx

    from edgeq.evaluation import OrtCausalLM
    from edgeq.scoring import perplexities_and_agreement
    from exporters import export_onnx

    source = resolve_model("smollm2-135m")
    data = prepare_text_data(
        load_tokenizer(source), CalibrationConfig(None, 2, 128), EvalConfig(None, 512, 3)
    )
    model = load_model(source)
    adapter = adapter_for(model)
    config = QuantConfig(method="rtn", weights=WeightQuantConfig(bits=4, group_size=128, symmetric=False))
    result = quantize_model(model, adapter, config, data.calibration, progress=False)
    info = export_onnx(model, adapter, result, tmp_path, "ort")
    assert info.graph == "fused"
    ops = Counter(n.op_type for n in onnx.load(str(info.path), load_external_data=False).graph.node)
    assert ops["GroupQueryAttention"] == 30 and ops["MatMulNBits"] == 5 * 30
    compared = perplexities_and_agreement(
        torch_logits_fn(model), {"ort": OrtCausalLM(tmp_path, accuracy_level=0).logits}, data.evaluation,
        "fused", progress=False,
    )  # fmt: skip
    torch_ppl = compared["reference"]
    assert abs(compared["ort"]["perplexity"] - torch_ppl) / torch_ppl < 0.005
    assert compared["ort"]["top1_agreement"] > 0.99


def test_float16_fused_graph_on_smollm2_matches_pytorch_in_float16(tmp_path):
    """The issue's float16 parity on ORT's CPU provider, on the real model: the fp16 fused graph
    against the PyTorch model run in float16, perplexity within 1 %, greedy top-1 at least 98 %."""
    out = tmp_path / "w4a16-fp16"
    status = main([
        "--no-progress", "export", "--model", "smollm2-135m", "--scheme", "w4a16", "--method", "rtn",
        "--format", "ort", "--dtype", "float16", "--calib-samples", "4", "--calib-seq-len", "256",
        "--eval-windows", "3", "--latency-runs", "1", "--decode-tokens", "8", "--out", str(out),
    ])  # fmt: skip
    assert status == 0
    report = json.loads((out / "report.json").read_text())
    check = report["onnx_parity"]
    assert report["onnx"] == report["onnx"] | {"graph": "fused", "dtype": "float16"}
    assert check["relative_difference"] <= 0.01 and check["top1_agreement"] >= 0.98
    # onnxruntime-genai runs the float16 cache on the CPU, token for token as edgeq's decode loop
    from genai_checks import assert_same_greedy_tokens

    prompt = load_tokenizer(resolve_model("smollm2-135m"))("The capital of France is").input_ids
    assert len(assert_same_greedy_tokens(out, prompt, 16)) == 16
    # and the float16 graph is still the quantized model: close to the float32 reference
    assert report["perplexity"]["quant_torch"] < 1.5 * report["perplexity"]["fp_torch"]

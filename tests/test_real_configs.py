"""Every supported architecture on its real configuration (``real_configs.REAL_CONFIGS``): ``edgeq
export`` end to end at w4a16 and w4a4 in both formats, with the parity check and ``edgeq validate``'s
default gates; the block recorder on a 6-layer Gemma3; the model's BOS convention."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from genai_checks import assert_same_greedy_tokens, assert_same_tokenization
from real_configs import BOS_ID, REAL_CONFIGS, build_fixture
from transformers import AutoModelForCausalLM, AutoTokenizer

from edgeq.cli import main
from edgeq.config import CalibrationConfig, EvalConfig
from edgeq.data import (
    C4_SAMPLE,
    bos_convention,
    default_file,
    prepare_text_data,
    read_documents,
    wikitext2_test_string,
)
from edgeq.models.adapters import adapter_for, adapter_for_config
from edgeq.pipeline import capture_block_inputs
from edgeq.quant.block import block_forward
from edgeq.validate import load_fp_reference

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def real_model(tmp_path_factory):
    """name → the fixture's HF folder, built once per session."""
    texts = read_documents(default_file(C4_SAMPLE))
    root = tmp_path_factory.mktemp("real-configs")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_fixture(REAL_CONFIGS[name], root / name, texts)
        return built[name]

    return get


def test_recorded_block_inputs_replay_a_six_layer_gemma3(real_model):
    """The recorder stands in for every block while it captures the inputs: it must return what a
    block returns (a tuple for Gemma3), or each block loses a dimension and the forward crashes."""
    model = AutoModelForCausalLM.from_pretrained(real_model("gemma3-270m")).eval()
    adapter = adapter_for(model)
    assert model.config.num_hidden_layers == 6 and adapter.block_returns_tuple
    ids = torch.randint(3, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(model, adapter, ids, batch_size=2)
    with torch.no_grad():
        reference = model(ids, output_hidden_states=True, use_cache=False).hidden_states
        hidden = inputs.hidden
        for index, block in enumerate(adapter.blocks(model)):
            torch.testing.assert_close(torch.cat(hidden), reference[index], rtol=1e-4, atol=1e-4)
            kwargs = [batch[index] for batch in inputs.kwargs]
            hidden = [block_forward(adapter, block, h, kw) for h, kw in zip(hidden, kwargs, strict=True)]


@pytest.mark.parametrize("name", ["gemma3-270m", "llama-3.2-1b", "smollm2-360m", "qwen2.5-0.5b"])
def test_calibration_and_evaluation_windows_follow_the_bos_convention(real_model, name):
    folder = real_model(name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    adapter = adapter_for_config(AutoModelForCausalLM.from_pretrained(folder).config)
    data = prepare_text_data(tokenizer, CalibrationConfig(None, 3, 40), EvalConfig(None, 50, 4), adapter)
    expects_bos = REAL_CONFIGS[name].adds_bos
    assert data.bos.token_id == (BOS_ID if expects_bos else None)
    for windows, length in ((data.calibration, 40), (data.evaluation, 50)):
        assert windows.shape[1] == length
        assert bool((windows[:, 0] == BOS_ID).all()) == expects_bos
        assert int((windows[:, 1:] == BOS_ID).sum()) == 0  # BOS only in front, never inside the text
    # with or without BOS, the windows' text tiles the evaluation string without overlap or gap
    text_ids = tokenizer(wikitext2_test_string(), add_special_tokens=False).input_ids
    body = data.evaluation[:, 1:] if expects_bos else data.evaluation
    assert body.flatten().tolist() == text_ids[: body.numel()]
    assert bos_convention(tokenizer).token_id == data.bos.token_id  # the tokenizer agrees here


def test_the_architecture_declares_bos_where_its_tokenizer_does_not(real_model):
    """A Gemma tokenizer converted without its BOS rule still gets BOS: it is the architecture's."""
    tokenizer = AutoTokenizer.from_pretrained(real_model("smollm2-360m"))  # has <bos>, does not add it
    gemma = adapter_for_config(AutoModelForCausalLM.from_pretrained(real_model("gemma3-270m")).config)
    assert bos_convention(tokenizer).token_id is None
    convention = bos_convention(tokenizer, gemma)
    assert convention.token_id == BOS_ID and convention.source == "adapter"


# w4a16 with BoA and w4a4 with GPTQ, so the calibrated methods run on every architecture; the two
# 1B-wide fixtures use RTN (BoA took 130 s per export on Gemma3-1B's 6 layers here), their smaller
# siblings of the same architecture (Gemma3-270M, SmolLM2-360M) run the calibrated methods
METHODS = {"w4a16": "boa", "w4a4": "gptq"}
RTN_ONLY = {"gemma3-1b", "llama-3.2-1b"}
# past TinyMistral's 32-token sliding window from a 16-token prompt
GENAI_NEW_TOKENS = 40


# Every architecture runs its fast path (w4a16, the fused ort graph) and optimum's graph with
# quantized activations and rotations (w4a4 qdq, traced block by block). The other two write the same
# graphs with less in them, so one fixture each covers them: optimum's graph without activation
# quantization (w4a16 qdq) on Qwen2.5 with its q/k/v biases, and the ort packing of optimum's graph
# (w4a4 ort) on Gemma3 with its two kinds of layer. Gemma3-1B skips w4a4 qdq (116 s in CI, the
# slowest export here): Gemma3-270M has its attention geometry (4 heads, 1 KV head, head_dim 256)
# and layer pattern, and runs both W4A4 graphs.
EXPORTS = [
    (name, scheme, fmt)
    for name in sorted(REAL_CONFIGS)
    for scheme, fmt in [("w4a16", "qdq"), ("w4a16", "ort"), ("w4a4", "qdq"), ("w4a4", "ort")]
    if ((scheme, fmt) in {("w4a16", "ort"), ("w4a4", "qdq")} and (name, scheme) != ("gemma3-1b", "w4a4"))
    or (name, scheme, fmt) in {("qwen2.5-0.5b", "w4a16", "qdq"), ("gemma3-270m", "w4a4", "ort")}
]


@pytest.mark.parametrize(("name", "scheme", "fmt"), EXPORTS)
def test_export_passes_parity_and_the_default_gates(real_model, tmp_path, capsys, name, scheme, fmt):
    real = REAL_CONFIGS[name]
    out = tmp_path / "artifact"
    method = "rtn" if name in RTN_ONLY else METHODS[scheme]
    status = main([
        "--no-progress", "export", "--model", str(real_model(name)), "--scheme", scheme,
        "--method", method, "--format", fmt, "--calib-samples", "4", "--calib-seq-len", "64",
        "--eval-seq-len", str(real.eval_seq_len), "--eval-windows", "2", "--providers", "cpu",
        # ORT has no kernel for a W4A4 QDQ graph and dequantizes every weight at every step (1.3 s a
        # step on Gemma3-1B's fixture): the default 6 × 65 timed steps would take minutes per test
        "--latency-runs", "1", "--decode-tokens", "8",
        "--out", str(out),
    ])  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert status == 0, report.get("validation")
    parity = report["onnx_parity"]
    assert parity["passed"], parity
    assert parity["tolerance"] == (0.005 if scheme == "w4a16" else 0.02)
    assert report["validation"]["passed"]
    gates = {g["name"] for g in report["validation"]["gates"]}
    assert gates == {"perplexity_ratio", "top1_agreement", "size_ratio"}  # the defaults
    # the fused graph covers every architecture, W4A4 with its float KV cache included
    fused = fmt == "ort"
    assert (report["onnx"]["graph"] == "fused") == fused, report["onnx"]["not_fused"]
    # the evaluation windows, and the FP reference stored with them, follow the model's BOS convention
    bos = report["evaluation"]["bos"]
    assert bos["bos_token_id"] == (BOS_ID if real.adds_bos else None)
    assert ("BOS (id 2)" in report["evaluation"]["text"]) == real.adds_bos
    for handoff in ("report.md", "MODEL_CARD.md"):  # the person reading the bundle sees it too
        assert bos["description"] in (out / handoff).read_text()
    ids = load_fp_reference(out).ids
    assert ids.shape == (2, real.eval_seq_len)
    assert bool(np.all(ids[:, 0] == BOS_ID)) == real.adds_bos
    # `edgeq eval` on the artifact reads the same convention from the folder: the same perplexity
    capsys.readouterr()
    assert main(["--no-progress", "eval", "--model", str(out), "--eval-seq-len", str(real.eval_seq_len),
                 "--eval-windows", "2"]) == 0  # fmt: skip
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    onnx_ppl = report["perplexity"]["quant_onnx"]["CPUExecutionProvider"]["accuracy_level_0"]
    assert evaluated["bos"]["bos_token_id"] == bos["bos_token_id"]
    assert evaluated["perplexity"] == pytest.approx(onnx_ppl, rel=1e-5)
    if fmt == "ort":  # onnxruntime-genai runs the folder as edgeq's decode loop does, past a sliding window
        genai = report["genai"]
        assert genai["config"] and genai["past_present_share_buffer"] == fused
        texts = [line for line in wikitext2_test_string()[:4000].split("\n") if line.strip()][:3]
        assert_same_tokenization(out, texts)
        prompt = AutoTokenizer.from_pretrained(out)(texts[0]).input_ids[:16]
        assert_same_greedy_tokens(out, prompt, GENAI_NEW_TOKENS)

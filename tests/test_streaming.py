"""The streamed export: weights read block by block from disk, one block resident at a time, the
graph written as it goes, and the same bytes and numbers as the pipeline on a model held in memory."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import byte_tokenizer, tiny_model
from onnx import numpy_helper
from transformers import AutoModelForCausalLM

import edgeq.export as export_module
from edgeq.cli import main
from edgeq.config import SCHEMES, CalibrationConfig, EvalConfig
from edgeq.data import prepare_text_data
from edgeq.models.adapters import adapter_for
from edgeq.models.lazy import empty_model, load_block, load_outer, open_checkpoint, release
from edgeq.pipeline import quantize_model
from exporters.ort_fused import export_fused

SMALL = ["--calib-samples", "4", "--calib-seq-len", "32", "--eval-seq-len", "32", "--eval-windows", "3",
         "--latency-runs", "1", "--decode-tokens", "4", "--max-size-ratio", "1.0"]  # fmt: skip


def _model_dir(tmp_path: Path, model_type: str = "llama", shard: str | None = None) -> Path:
    folder = tmp_path / f"tiny-{model_type}"
    model = tiny_model(model_type, head_dim=16) if model_type != "gemma3_text" else tiny_model(model_type)
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    byte_tokenizer().save_pretrained(folder)
    return folder


def _export(folder: Path, out: Path, *args: str) -> dict:
    assert main(["--no-progress", "export", "--model", str(folder), *SMALL, *args, "--out", str(out)]) == 0
    return json.loads((out / "report.json").read_text())


def _initializers(path: Path) -> dict[str, np.ndarray]:
    graph = onnx.load(str(path))  # reads the external data beside it
    return {init.name: numpy_helper.to_array(init) for init in graph.graph.initializer}


def test_a_sharded_checkpoint_loads_block_by_block_and_frees_it(tmp_path):
    folder = _model_dir(tmp_path, shard="20KB")
    assert (folder / "model.safetensors.index.json").exists()
    full = AutoModelForCausalLM.from_pretrained(folder).eval()
    adapter = adapter_for(full)
    checkpoint = open_checkpoint(folder)
    model = empty_model(full.config)
    assert all(p.is_meta for p in model.parameters())
    load_outer(model, adapter, checkpoint)
    assert torch.equal(adapter.embedding(model).weight, adapter.embedding(full).weight)
    assert torch.equal(adapter.lm_head(model).weight, adapter.lm_head(full).weight)
    tied = adapter.lm_head(model).weight is adapter.embedding(model).weight
    assert tied == full.config.tie_word_embeddings  # as from_pretrained leaves them
    block = load_block(model, adapter, checkpoint, 1)
    expected = dict(adapter.blocks(full)[1].named_parameters())
    for name, param in block.named_parameters():
        assert torch.equal(param, expected[name]), name
    assert all(p.is_meta for p in adapter.blocks(model)[0].parameters())  # only what was asked for
    release(block)
    assert all(p.is_meta for p in block.parameters())
    # RoPE frequencies are buffers: computed, not left on the meta device
    assert not model.model.rotary_emb.inv_freq.is_meta


@pytest.mark.parametrize(
    ("model_type", "scheme", "method", "embedding"),
    [
        ("llama", "w4a16", "gptq", False),
        ("qwen2", "w4a16", "boa", False),
        ("llama", "w4a16", "rtn", True),
        ("qwen2", "w4a16", "boa-oac", False),  # OAC's Hessians from a pre-pass, read back per block
    ],
)
def test_streamed_export_writes_the_in_memory_pipelines_graph(
    tmp_path, text_data_dir, model_type, scheme, method, embedding
):
    """The fused graph of the streamed export equals, initializer by initializer, the one written
    from the same model quantized whole in memory; and its PyTorch perplexity is that model's."""
    folder = _model_dir(tmp_path, model_type)
    extra = ["--quantize-embedding"] if embedding else []
    report = _export(
        folder, tmp_path / "out", "--scheme", scheme, "--method", method, "--format", "ort", *extra
    )
    assert report["onnx"]["graph"] == "fused" and report["sizes_bytes"]["onnx_external_data"]
    assert (tmp_path / "out" / "model.onnx_data").exists()

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    adapter = adapter_for(model)
    data = prepare_text_data(byte_tokenizer(), CalibrationConfig(num_sequences=4, seq_len=32),
                             EvalConfig(seq_len=32, max_windows=3), adapter)  # fmt: skip
    quant = dataclasses.replace(SCHEMES[scheme], method=method, quantize_embedding=embedding)
    result = quantize_model(model, adapter, quant, data.calibration, progress=False)
    export_fused(model, adapter, result.weights, result.tables, tmp_path / "memory")
    streamed = _initializers(tmp_path / "out" / "model.onnx")
    in_memory = _initializers(tmp_path / "memory" / "model.onnx")
    assert streamed.keys() == in_memory.keys()
    for name, value in in_memory.items():
        np.testing.assert_array_equal(streamed[name], value, err_msg=name)
    with torch.no_grad():
        logits = [model(ids[None]).logits[0] for ids in data.evaluation]
    nll = [
        torch.nn.functional.cross_entropy(lg[:-1], ids[1:])
        for lg, ids in zip(logits, data.evaluation, strict=True)
    ]
    expected = float(torch.stack(nll).mean().exp())
    assert report["perplexity"]["quant_torch"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("fmt", "scheme", "graph"),
    [("ort", "w4a16", "fused"), ("qdq", "w4a4", "optimum"), ("ort", "w4a4", "fused")],
)
def test_only_one_block_is_ever_resident(tmp_path, text_data_dir, monkeypatch, fmt, scheme, graph):
    """Both writers, the fused graph and optimum's graph traced block by block, take each block as it
    is done: the next one is loaded after the last was freed."""
    folder = _model_dir(tmp_path)
    resident: list[int] = []
    load = export_module.CheckpointBlocks.load

    def counting_load(self, index, device):
        block = load(self, index, device)
        blocks = self.adapter.blocks(self.model)
        resident.append(sum(not next(b.parameters()).is_meta for b in blocks))
        return block

    monkeypatch.setattr(export_module.CheckpointBlocks, "load", counting_load)
    report = _export(folder, tmp_path / "out", "--scheme", scheme, "--method", "gptq", "--format", fmt)
    assert resident == [1, 1]  # two blocks, each alone when loaded
    assert report["onnx"]["graph"] == graph and report["onnx_parity"]["passed"]


@pytest.mark.parametrize(
    ("fmt", "scheme", "graph_kind"),
    [
        ("ort", "w4a16", "fused"),
        ("qdq", "w4a16", "optimum"),
        ("qdq", "w4a4", "optimum"),
        ("ort", "w4a4", "fused"),
    ],
)
def test_float16_graph_parity_on_the_cpu_provider(tmp_path, text_data_dir, fmt, scheme, graph_kind):
    """A float16 graph in ORT's CPU provider against the PyTorch model run in float16: perplexity
    within 1 %, greedy top-1 agreement at least 98 % (with quantized activations, within 2 %)."""
    folder = _model_dir(tmp_path)
    report = _export(folder, tmp_path / "out", "--scheme", scheme, "--format", fmt, "--dtype", "float16")
    graph = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}
    assert types["past_key_values.0.key"] == onnx.TensorProto.FLOAT16
    assert types["logits"] == onnx.TensorProto.FLOAT
    assert report["onnx"]["graph"] == graph_kind and report["onnx"]["dtype"] == "float16"
    check = report["onnx_parity"]
    if scheme == "w4a16":
        assert check["relative_difference"] <= 0.01 and check["top1_agreement"] >= 0.98
    else:
        assert check["relative_difference"] <= 0.02
    assert check["passed"] and report["validation"]["passed"]


def test_eval_of_a_model_streams_it_and_matches_the_export(tmp_path, text_data_dir, capsys):
    folder = _model_dir(tmp_path)
    report = _export(folder, tmp_path / "out", "--scheme", "w4a16", "--method", "rtn", "--format", "ort")
    capsys.readouterr()
    assert main(["--no-progress", "eval", "--model", str(folder), "--eval-seq-len", "32",
                 "--eval-windows", "3"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["perplexity"] == pytest.approx(report["perplexity"]["fp_torch"], rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU torch can see")
def test_cuda_calibration_matches_the_cpu(tmp_path, text_data_dir):
    folder = _model_dir(tmp_path)
    cpu = _export(folder, tmp_path / "cpu", "--format", "ort", "--method", "gptq", "--device", "cpu")
    cuda = _export(folder, tmp_path / "cuda", "--format", "ort", "--method", "gptq", "--device", "cuda")
    assert cuda["device"]["calibration"].startswith("cuda")
    assert cuda["perplexity"]["quant_torch"] == pytest.approx(cpu["perplexity"]["quant_torch"], rel=0.01)

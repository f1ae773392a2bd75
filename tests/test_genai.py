"""onnxruntime-genai runs the ``ort`` format's artifact folder from its genai_config.json: the same
greedy tokens as edgeq's own ORT decode loop (``OrtCausalLM.generate_greedy``) on the fused graph and
on optimum's graph, the same token ids as transformers from the tokenizer files, and the README's
lines as written. A tiny Llama whose byte-level BPE is saved as transformers' GGUF converter saves
SmolLM2's (a LlamaTokenizerFast with SentencePiece decoding steps), which genai misreads unfixed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import onnxruntime_genai as og
import pytest
from conftest import load_example, tiny_model, write_text_data
from genai_checks import assert_readme_lines_run, assert_same_greedy_tokens, assert_same_tokenization
from real_configs import EOS_ID, REAL_CONFIGS, fixture_tokenizer
from tokenizers import decoders
from transformers import AutoTokenizer, LlamaTokenizerFast

from edgeq.cli import main
from exporters.genai_config import GENAI_CONFIG_FILE, decoder_io, token_ids, tokenizer_fixes

NEW_TOKENS = 24
TEXTS = ["The capital of France is", "Hello, world! 123 éà  two spaces\n\nnew line", " a space\tand tab"]
# the fused graph; optimum's graph, which a quantized KV cache keeps (scheme_blockers)
ARTIFACTS = {"fused": [], "optimum": ["--scheme", "w4a4", "--kv-bits", "4"]}


def gguf_style_tokenizer(texts: list[str]) -> LlamaTokenizerFast:
    """A byte-level BPE (the fixtures' own) as transformers' GGUF converter writes SmolLM2's: a
    LlamaTokenizerFast whose decoder runs ByteFallback, Fuse and a "▁" Replace before ByteLevel."""
    backend = fixture_tokenizer(REAL_CONFIGS["smollm2-360m"], texts, vocab=320).backend_tokenizer
    backend.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("▁", " "), decoders.ByteLevel()]
    )
    return LlamaTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        add_bos_token=False, add_eos_token=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The tiny Llama's HF folder (head size 16: GroupQueryAttention needs a multiple of 8)."""
    folder = tmp_path_factory.mktemp("genai") / "tiny-llama"
    docs = [" ".join(f"word{j} of document {i}, and more text." for j in range(30)) for i in range(20)]
    tokenizer = gguf_style_tokenizer(docs + TEXTS)
    model = tiny_model("llama", hidden_size=64, head_dim=16, vocab_size=len(tokenizer))
    model.generation_config.eos_token_id = EOS_ID
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=sorted(ARTIFACTS))
def artifact(request, source, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp(f"genai-{request.param}")
    out = base / "art"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEQ_DATA_DIR", str(write_text_data(base / "data")))
        status = main([
            "--no-progress", "export", "--model", str(source), "--format", "ort", "--method", "rtn",
            *ARTIFACTS[request.param], "--calib-samples", "4", "--calib-seq-len", "32",
            "--eval-seq-len", "32", "--eval-windows", "2", "--no-validate", "--out", str(out),
        ])  # fmt: skip
    assert status == 0
    return out


def test_genai_config_describes_the_graph_and_is_in_the_report_and_manifest(artifact):
    genai = json.loads((artifact / GENAI_CONFIG_FILE).read_text())
    config = json.loads((artifact / "config.json").read_text())
    report = json.loads((artifact / "report.json").read_text())
    graph = onnx.load(str(artifact / "model.onnx"), load_external_data=False).graph
    fused = report["onnx"]["graph"] == "fused"
    model, decoder = genai["model"], genai["model"]["decoder"]
    assert model["type"] == "llama" and model["eos_token_id"] == EOS_ID
    assert model["context_length"] == genai["search"]["max_length"] == config["max_position_embeddings"]
    heads = (decoder["num_attention_heads"], decoder["num_key_value_heads"], decoder["head_size"])
    assert heads == (4, 2, 16)
    assert decoder["num_hidden_layers"] == config["num_hidden_layers"] and decoder["filename"] == "model.onnx"
    # every input the graph declares is named (the fused graph has no position_ids), nothing else
    layers = config["num_hidden_layers"]
    named = {v for v in decoder["inputs"].values() if "%d" not in v}
    named |= {v % i for v in decoder["inputs"].values() if "%d" in v for i in range(layers)}
    assert named == {i.name for i in graph.input}
    assert ("position_ids" in named) == (not fused)
    # GroupQueryAttention reads the cache as a buffer; optimum's Concat needs separate ones
    assert genai["search"]["past_present_share_buffer"] == fused
    assert report["genai"]["config"] == GENAI_CONFIG_FILE
    assert report["genai"]["past_present_share_buffer"] == fused
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert GENAI_CONFIG_FILE in manifest["files"]  # hashed with the content, not the run
    assert main(["verify", str(artifact)]) == 0


def test_genai_generates_the_greedy_tokens_of_edgeqs_decode_loop(artifact):
    prompt = AutoTokenizer.from_pretrained(artifact)(TEXTS[0]).input_ids
    assert len(assert_same_greedy_tokens(artifact, prompt, NEW_TOKENS)) > 1


def test_genai_tokenizes_as_transformers_once_the_gguf_style_tokenizer_is_declared_byte_level(
    artifact, source, tmp_path
):
    report = json.loads((artifact / "report.json").read_text())
    assert len(report["genai"]["tokenizer_changes"]) == 2  # the decoder steps and the class
    assert_same_tokenization(artifact, TEXTS)
    shipped, original = AutoTokenizer.from_pretrained(artifact), AutoTokenizer.from_pretrained(source)
    for text in TEXTS:
        ids = original(text).input_ids
        assert shipped(text).input_ids == ids and shipped.decode(ids) == original.decode(ids) == text
    # every id decodes as the source tokenizer decodes it
    every = [[i] for i in range(len(original))]
    assert shipped.batch_decode(every) == original.batch_decode(every)
    # the files as transformers saved them: genai maps spaces to "▁", which the vocabulary lacks
    unfixed = tmp_path / "unfixed"
    shutil.copytree(artifact, unfixed)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, unfixed / name)
    misread = og.Tokenizer(og.Model(str(unfixed))).encode(TEXTS[0])
    assert [int(i) for i in misread] != original(TEXTS[0]).input_ids


def test_the_readme_lines_run_the_folder(artifact):
    assert_readme_lines_run(artifact)


def test_the_generate_example_runs_the_folder_with_genai(artifact):
    text = load_example("generate_from_bundle").generate_genai(str(artifact), "abc", new_tokens=6)
    assert isinstance(text, str) and text.strip()


def test_decoder_io_names_what_the_graph_has_and_refuses_a_graph_without_a_cache():
    inputs = ["input_ids", "attention_mask", "past_key_values.0.key", "past_key_values.0.value"]
    outputs = ["logits", "present.0.key", "present.0.value"]
    names, outs = decoder_io(inputs, outputs, 1)
    assert "position_ids" not in names and outs["present_key_names"] == "present.%d.key"
    assert decoder_io([*inputs, "position_ids"], outputs, 1)[0]["position_ids"] == "position_ids"
    with pytest.raises(ValueError, match="past_key_values.1.key"):
        decoder_io(inputs, outputs, 2)


def test_token_ids_prefer_the_generation_config_and_pad_falls_back_to_the_first_eos():
    assert token_ids({"eos_token_id": 2, "bos_token_id": 1}, {"eos_token_id": [7, 8]}) == {
        "bos_token_id": 1, "eos_token_id": [7, 8], "pad_token_id": 7,
    }  # fmt: skip
    assert token_ids({"eos_token_id": 2, "pad_token_id": 0}, {}) == {"eos_token_id": 2, "pad_token_id": 0}
    assert token_ids({}, {}) == {}


def test_tokenizer_fixes_leave_other_tokenizers_alone():
    sentencepiece = {"pre_tokenizer": {"type": "Metaspace"}, "decoder": {"type": "Sequence", "decoders": [
        {"type": "Replace"}, {"type": "ByteFallback"}, {"type": "Fuse"}]}}  # fmt: skip
    config = {"tokenizer_class": "LlamaTokenizer"}
    assert tokenizer_fixes(sentencepiece, config) == (sentencepiece, config, [])
    byte_level = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "ByteLevel"}]},
                  "decoder": {"type": "ByteLevel"}}  # fmt: skip
    for name in ("Qwen2Tokenizer", "PreTrainedTokenizerFast"):
        assert tokenizer_fixes(byte_level, {"tokenizer_class": name})[2] == []

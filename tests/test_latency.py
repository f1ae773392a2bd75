"""Greedy decoding with the KV cache in ORT, and the decode-speed measurement built on it."""

from __future__ import annotations

import numpy as np
import torch
from conftest import tiny_model

from edgeq.evaluation import OrtCausalLM
from edgeq.latency import measure_decode
from exporters.onnx_qdq import export_qdq


def test_cached_greedy_decode_matches_pytorch_generate(tmp_path):
    model = tiny_model("llama")
    export_qdq(model, {}, tmp_path)
    lm = OrtCausalLM(tmp_path)
    prompt = np.array([[5, 17, 33, 2, 40, 41]])
    with torch.no_grad():
        expected = model.generate(torch.from_numpy(prompt), max_new_tokens=8, do_sample=False)
    np.testing.assert_array_equal(lm.generate_greedy(prompt, 8), expected[0, prompt.shape[1] :].numpy())


def test_measure_decode_reports_percentiles(tmp_path):
    export_qdq(tiny_model("qwen2"), {}, tmp_path)
    result = measure_decode(OrtCausalLM(tmp_path, threads=1), prompt_len=16, new_tokens=4, repeats=3)
    assert 0 < result["prefill_ms"]["p50"] <= result["prefill_ms"]["p90"]  # p90: the slow tail
    assert 0 < result["decode_tokens_per_s"]["p90"] <= result["decode_tokens_per_s"]["p50"]
    assert (result["prompt_tokens"], result["new_tokens"], result["repeats"]) == (16, 4, 3)

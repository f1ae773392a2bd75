"""OrtCausalLM on graphs whose KV cache is float16 (the fp16 ``ort`` graph's layout: float16 past and
present, logits float16 or float32), on a tiny hand-made decoder: logits are a fixed table looked up
at the input ids (token t → a one-hot at t + 1, so greedy decoding counts up), the cache concatenates
a per-token row onto the past."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgeq.evaluation import OrtCausalLM

VOCAB, KV_HEADS, HEAD_DIM = 11, 2, 4
ONNX_TYPES = {np.float16: TensorProto.FLOAT16, np.float32: TensorProto.FLOAT}


def write_tiny_kv_graph(folder: Path, kv_dtype=np.float16, logits_dtype=np.float16) -> Path:
    """A one-layer decoder-with-past in optimum's layout (input_ids, attention_mask,
    past_key_values.0.key/value → logits, present.0.key/value) with a config.json beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    table = np.zeros((VOCAB, VOCAB), kv_dtype)
    table[np.arange(VOCAB), (np.arange(VOCAB) + 1) % VOCAB] = 4.0  # token t → next token t + 1
    rows = np.random.default_rng(0).standard_normal((VOCAB, KV_HEADS * HEAD_DIM)).astype(kv_dtype)
    kv_type, logits_type = ONNX_TYPES[kv_dtype], ONNX_TYPES[logits_dtype]
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["scores"]),  # [b, s, vocab]
        helper.make_node("Gather", ["rows", "input_ids"], ["kv_flat"]),  # [b, s, kv heads * head dim]
        helper.make_node("Reshape", ["kv_flat", "kv_shape"], ["kv_bshd"]),
        helper.make_node("Transpose", ["kv_bshd"], ["kv"], perm=[0, 2, 1, 3]),  # [b, kv heads, s, hd]
    ]
    if logits_dtype == kv_dtype:
        nodes.append(helper.make_node("Identity", ["scores"], ["logits"]))
    else:
        nodes.append(helper.make_node("Cast", ["scores"], ["logits"], to=logits_type))
    for kv in ("key", "value"):
        nodes.append(
            helper.make_node("Concat", [f"past_key_values.0.{kv}", "kv"], [f"present.0.{kv}"], axis=2)
        )
    # the mask is an input as in optimum's graphs; the toy model only reads its shape
    nodes.append(helper.make_node("Shape", ["attention_mask"], ["mask_shape"]))
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
    ] + [
        helper.make_tensor_value_info(
            f"past_key_values.0.{kv}", kv_type, ["batch", KV_HEADS, "past", HEAD_DIM]
        )
        for kv in ("key", "value")
    ]
    outputs = [
        helper.make_tensor_value_info("logits", logits_type, ["batch", "seq", VOCAB]),
        *(
            helper.make_tensor_value_info(f"present.0.{kv}", kv_type, ["batch", KV_HEADS, "total", HEAD_DIM])
            for kv in ("key", "value")
        ),
        helper.make_tensor_value_info("mask_shape", TensorProto.INT64, [2]),
    ]
    initializers = [
        numpy_helper.from_array(table, "table"),
        numpy_helper.from_array(rows, "rows"),
        numpy_helper.from_array(np.array([0, 0, KV_HEADS, HEAD_DIM], np.int64), "kv_shape"),
    ]
    graph = helper.make_graph(nodes, "tiny_kv", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    config = {
        "num_hidden_layers": 1,
        "num_attention_heads": KV_HEADS * 2,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_size": KV_HEADS * 2 * HEAD_DIM,
        "vocab_size": VOCAB,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("kv_dtype", "logits_dtype"),
    [(np.float16, np.float16), (np.float16, np.float32), (np.float32, np.float32)],
    ids=["fp16-cache-fp16-logits", "fp16-cache-fp32-logits", "fp32-graph"],
)
def test_cache_in_the_graphs_dtype_and_float32_logits(tmp_path, kv_dtype, logits_dtype):
    lm = OrtCausalLM(write_tiny_kv_graph(tmp_path / "m", kv_dtype, logits_dtype))
    past = lm.empty_past(2)
    assert sorted(past) == ["past_key_values.0.key", "past_key_values.0.value"]
    assert all(v.dtype == kv_dtype and v.shape == (2, KV_HEADS, 0, HEAD_DIM) for v in past.values())

    ids = torch.tensor([[3, 4, 5], [0, 1, 2]])
    logits = lm.logits(ids)
    assert logits.dtype == torch.float32 and logits.shape == (2, 3, VOCAB)
    np.testing.assert_array_equal(logits.argmax(-1).numpy(), (ids.numpy() + 1) % VOCAB)

    step_logits, present = lm.step(ids.numpy(), past, 0)
    assert step_logits.dtype == np.float32
    assert all(v.dtype == kv_dtype and v.shape == (2, KV_HEADS, 3, HEAD_DIM) for v in present.values())
    more, present = lm.step(np.array([[6], [3]]), present, 3)  # a float16 cache goes back in as it came
    assert more.dtype == np.float32 and present["past_key_values.0.key"].shape[2] == 4


def test_greedy_generation_on_a_float16_cache(tmp_path):
    lm = OrtCausalLM(write_tiny_kv_graph(tmp_path / "m"))
    np.testing.assert_array_equal(lm.generate_greedy(np.array([[7, 8]]), 5), [9, 10, 0, 1, 2])


def test_float32_graphs_keep_their_logits_array(tmp_path):
    """A float32 graph's logits come back as ORT returned them: no cast, no copy."""
    lm = OrtCausalLM(write_tiny_kv_graph(tmp_path / "m", np.float32, np.float32))
    raw = lm.session.run(["logits"], lm.prefill_feeds(torch.tensor([[1, 2]])))[0]
    assert lm._float32(raw) is raw
    assert lm.input_dtypes["past_key_values.0.key"] is np.float32

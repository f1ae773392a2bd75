"""Tests of the integer weight grid (edgeq/quant/grid.py), int4 packing (edgeq/packing.py) and the
bit-exact ONNX DequantizeLinear round trip of a quantized weight (exporters/onnx_qdq.py)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from edgeq.config import PER_CHANNEL, WeightQuantConfig
from edgeq.packing import pack_bits, pack_int4, unpack_bits, unpack_int4
from edgeq.quant.grid import expand_groups, rtn_quantize
from exporters.onnx_qdq import container_bits, dequantize_linear_initializers, raise_opset_for_int2
from exporters.ort_matmulnbits import convert_to_matmulnbits

# ---------------------------------------------------------------- int4 packing


@pytest.mark.parametrize("count", [1, 2, 7, 64, 1001])
def test_pack_unpack_unsigned_round_trip(count: int):
    rng = np.random.default_rng(count)
    values = rng.integers(0, 16, size=count, dtype=np.uint8)
    data = pack_int4(values)
    assert isinstance(data, bytes)
    assert len(data) == math.ceil(count / 2)
    out = unpack_int4(data, count, signed=False)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, values)


@pytest.mark.parametrize("count", [1, 2, 7, 64, 1001])
def test_pack_unpack_signed_round_trip(count: int):
    rng = np.random.default_rng(100 + count)
    values = rng.integers(-8, 8, size=count, dtype=np.int8)
    data = pack_int4(values)
    assert len(data) == math.ceil(count / 2)
    out = unpack_int4(data, count, signed=True)
    assert out.dtype == np.int8
    np.testing.assert_array_equal(out, values)


def test_pack_int4_any_shape_row_major():
    values = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert pack_int4(values) == pack_int4(values.reshape(-1))
    np.testing.assert_array_equal(unpack_int4(pack_int4(values), 12, signed=False), values.reshape(-1))
    # a transposed (non-contiguous) view packs in its own row-major order
    np.testing.assert_array_equal(unpack_int4(pack_int4(values.T), 12, signed=False), values.T.reshape(-1))


def test_pack_int4_low_nibble_first():
    assert pack_int4(np.array([1, 2], np.uint8)) == bytes([0x21])
    assert pack_int4(np.array([0xF, 0x0, 0x3, 0xA], np.uint8)) == bytes([0x0F, 0xA3])
    # odd count: the last high nibble is zero
    assert pack_int4(np.array([1, 2, 5], np.uint8)) == bytes([0x21, 0x05])
    # signed values are stored as two's complement nibbles
    assert pack_int4(np.array([-1, -8], np.int8)) == bytes([0x8F])
    assert pack_int4(np.array([7, -2], np.int8)) == bytes([0xE7])


def test_unpack_int4_layout():
    np.testing.assert_array_equal(unpack_int4(bytes([0x21, 0x05]), 3, signed=False), [1, 2, 5])
    np.testing.assert_array_equal(unpack_int4(bytes([0x8F, 0xE7]), 4, signed=True), [-1, -8, 7, -2])


# ---------------------------------------------------------------- rtn_quantize

GRID_CASES = [
    (bits, symmetric, group_size, in_features)
    for bits in (3, 4)
    for symmetric in (False, True)
    for group_size, in_features in ((16, 64), (16, 72), (32, 72), (32, 96), (PER_CHANNEL, 72))
]


def _weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g)
    w[:, ::5] *= 4  # uneven magnitudes across groups
    w[3] = w[3].abs()  # a row with no negative entries
    w[4] = -w[4].abs()  # a row with no positive entries
    return w


def _quantize(w: torch.Tensor, bits: int, symmetric: bool, group_size: int):
    return rtn_quantize(w, WeightQuantConfig(bits=bits, group_size=group_size, symmetric=symmetric))


@pytest.mark.parametrize(("bits", "symmetric", "group_size", "in_features"), GRID_CASES)
def test_rtn_shapes_and_code_range(bits, symmetric, group_size, in_features):
    out_features = 24
    q = _quantize(_weight(out_features, in_features), bits, symmetric, group_size)
    g = in_features if group_size == PER_CHANNEL else group_size
    n_groups = math.ceil(in_features / g)
    assert q.group_size == g
    assert q.bits == bits and q.symmetric == symmetric
    assert q.shape == (out_features, in_features)
    assert q.codes.dtype == torch.uint8
    assert q.scale.dtype == torch.float32
    assert q.zero.dtype == torch.uint8
    assert tuple(q.scale.shape) == (out_features, n_groups)
    assert tuple(q.zero.shape) == (out_features, n_groups)
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= 2**bits - 1
    assert int(q.zero.max()) <= 2**bits - 1
    assert bool((q.scale > 0).all())
    if symmetric:
        assert bool((q.zero == 2 ** (bits - 1)).all())


def test_rtn_ragged_last_group():
    # 72 columns with group 32: three groups, the last one holding 8 columns
    w = _weight(40, 72)
    q = _quantize(w, 4, False, 32)
    assert tuple(q.scale.shape) == (40, 3)
    # the last group's grid depends only on its own 8 columns
    alone = _quantize(w[:, 64:], 4, False, 32)
    torch.testing.assert_close(q.scale[:, 2], alone.scale[:, 0], rtol=0, atol=0)
    assert torch.equal(q.zero[:, 2], alone.zero[:, 0])
    assert torch.equal(q.codes[:, 64:], alone.codes)


@pytest.mark.parametrize(("bits", "symmetric", "group_size", "in_features"), GRID_CASES)
def test_rtn_dequantize_error_within_half_step(bits, symmetric, group_size, in_features):
    w = _weight(24, in_features, seed=1)
    q = _quantize(w, bits, symmetric, group_size)
    deq = q.dequantize()
    assert deq.dtype == torch.float32 and deq.shape == w.shape
    scale = expand_groups(q.scale, q.group_size, in_features)
    zero = expand_groups(q.zero, q.group_size, in_features).to(torch.float32)
    low = (0 - zero) * scale
    high = (2**bits - 1 - zero) * scale
    inside = (w >= low) & (w <= high)
    assert inside.float().mean() > 0.9
    err = (deq - w).abs()
    tol = scale * 1e-5 + 1e-7
    assert bool((err[inside] <= scale[inside] / 2 + tol[inside]).all())
    # the min-max grid keeps even clamped entries within half a step of the grid's edge
    assert bool((err <= scale / 2 + tol).all())


@pytest.mark.parametrize(("bits", "symmetric", "group_size", "in_features"), GRID_CASES)
def test_rtn_exact_zeros_and_zero_rows(bits, symmetric, group_size, in_features):
    w = _weight(16, in_features, seed=2)
    w[:, 1::3] = 0.0
    w[5] = 0.0  # an all-zero row
    w[6, : min(16, in_features)] = 0.0  # an all-zero first group (the whole row's start)
    q = _quantize(w, bits, symmetric, group_size)
    deq = q.dequantize()
    assert not bool(torch.isnan(deq).any()) and bool(torch.isfinite(q.scale).all())
    zeros = w == 0
    assert bool((deq[zeros] == 0).all())
    assert torch.equal(deq[5], torch.zeros(in_features))


def test_rtn_all_zero_weight():
    w = torch.zeros(4, 48)
    for symmetric in (False, True):
        q = _quantize(w, 4, symmetric, 16)
        assert bool(torch.isfinite(q.scale).all())
        deq = q.dequantize()
        assert not bool(torch.isnan(deq).any())
        assert torch.equal(deq, torch.zeros(4, 48))


@pytest.mark.parametrize("bits", [3, 4])
def test_rtn_symmetric_zero_point(bits: int):
    q = _quantize(_weight(8, 72), bits, True, 32)
    assert bool((q.zero == 2 ** (bits - 1)).all())
    # codes - zero is a signed value in [-2^(bits-1), 2^(bits-1) - 1]
    signed = q.codes.to(torch.int32) - 2 ** (bits - 1)
    assert int(signed.min()) >= -(2 ** (bits - 1)) and int(signed.max()) <= 2 ** (bits - 1) - 1


def test_rtn_grid_points_are_exact():
    # a weight already on the grid is reproduced exactly
    scale = 0.125
    codes = torch.tensor([[0, 3, 7, 15, 8, 1, 2, 9]], dtype=torch.float32)
    w = (codes - 4) * scale  # min -0.5, max 1.375 -> asymmetric 4-bit grid with step 0.125, zero 4
    q = _quantize(w, 4, False, PER_CHANNEL)
    assert torch.equal(q.dequantize(), w)
    assert int(q.zero[0, 0]) == 4


# ---------------------------------------------------------------- ONNX DequantizeLinear round trip

ONNX_CASES = {
    "asym-g16": (False, 16),
    "sym-g32": (True, 32),
    "asym-per-channel": (False, PER_CHANNEL),
    "sym-per-channel": (True, PER_CHANNEL),
}


def _dq_model(qweight) -> onnx.ModelProto:
    in_features = qweight.shape[1]
    out_features = qweight.shape[0]
    tensors, node = dequantize_linear_initializers("W", qweight)
    assert list(node.output) == ["W"]
    assert node.op_type == "DequantizeLinear"
    graph = helper.make_graph(
        [node],
        "dq",
        inputs=[],
        outputs=[helper.make_tensor_value_info("W", TensorProto.FLOAT, [in_features, out_features])],
        initializer=tensors,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


@pytest.fixture(params=list(ONNX_CASES), scope="module")
def onnx_case(request):
    symmetric, group_size = ONNX_CASES[request.param]
    w = _weight(40, 72, seed=7)
    w[2, 10:20] = 0.0
    w[9] = 0.0
    qweight = _quantize(w, 4, symmetric, group_size)
    return qweight, _dq_model(qweight)


def test_onnx_dq_initializers_layout(onnx_case):
    qweight, model = onnx_case
    by_name = {t.name: t for t in model.graph.initializer}
    q4 = by_name["W_q4"]
    assert list(q4.dims) == [72, 40]
    assert q4.data_type == (TensorProto.INT4 if qweight.symmetric else TensorProto.UINT4)
    assert ("W_zero_point" in by_name) == (not qweight.symmetric)
    (node,) = model.graph.node
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if qweight.group_size >= 72:
        assert attrs == {"axis": 1}
        assert list(by_name["W_scale"].dims) == [40]
    else:
        assert attrs == {"axis": 0, "block_size": qweight.group_size}
        assert list(by_name["W_scale"].dims) == [math.ceil(72 / qweight.group_size), 40]


def test_onnx_dq_checker(onnx_case):
    _, model = onnx_case
    onnx.checker.check_model(model, full_check=True)


def test_onnx_dq_onnxruntime_bit_exact(onnx_case):
    ort = pytest.importorskip("onnxruntime")
    qweight, model = onnx_case
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {})
    expected = qweight.dequantize().numpy().T
    assert out.dtype == np.float32 and out.shape == (72, 40)
    assert np.array_equal(out, expected)


def test_onnx_dq_reference_evaluator(onnx_case):
    from onnx.reference import ReferenceEvaluator

    qweight, model = onnx_case
    try:
        (out,) = ReferenceEvaluator(model).run(None, {})
    except (NotImplementedError, RuntimeError, TypeError, ValueError) as exc:  # pragma: no cover
        pytest.skip(f"onnx.reference cannot run this DequantizeLinear: {exc!r}")
    expected = qweight.dequantize().numpy().T
    assert out.shape == (72, 40)
    assert np.array_equal(np.asarray(out, dtype=np.float32), expected)


# ---------------------------------------------------------------- 2- and 8-bit weights (mixed precision)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("count", [1, 3, 4, 5, 1001])
def test_pack_unpack_2_bit_round_trip(count: int, signed: bool):
    rng = np.random.default_rng(count)
    values = rng.integers(-2, 2, size=count).astype(np.int8) if signed else rng.integers(0, 4, size=count)
    data = pack_bits(values.astype(np.int8 if signed else np.uint8), 2)
    assert len(data) == math.ceil(count / 4)
    np.testing.assert_array_equal(unpack_bits(data, count, 2, signed), values)
    assert pack_bits(np.array([1, 2, 3, 0], np.uint8), 2) == bytes([0b00111001])  # first in the lowest bits


def _dq_matmul_model(qweight) -> onnx.ModelProto:
    """x [1, in] @ DequantizeLinear(W)ᵀ, at the opset the codes' container needs."""
    in_features, out_features = qweight.shape[1], qweight.shape[0]
    tensors, node = dequantize_linear_initializers("W", qweight)
    graph = helper.make_graph(
        [node, helper.make_node("MatMul", ["x", "W"], ["y"])],
        "dq_matmul",
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, in_features])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_features])],
        initializer=tensors,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    raise_opset_for_int2(model)
    return model


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [PER_CHANNEL, 16, 32])
@pytest.mark.parametrize("bits", [2, 3, 8])
def test_every_width_dequantizes_exactly_in_both_formats(bits, symmetric, group_size):
    """The qdq graph's DequantizeLinear (INT2/UINT2 at opset 25 for 2 bits) and the ort format's
    MatMulNBits give exactly what the PyTorch grid gives, in onnx.reference and ONNX Runtime."""
    from onnx.reference import ReferenceEvaluator

    ort = pytest.importorskip("onnxruntime")
    qweight = _quantize(_weight(24, 72, seed=bits), bits, symmetric, group_size)
    model = _dq_matmul_model(qweight)
    codes = {t.name: t.data_type for t in model.graph.initializer}["W_q" + str(container_bits(bits))]
    narrow = {2: (TensorProto.INT2, TensorProto.UINT2), 3: (TensorProto.INT4, TensorProto.UINT4),
              8: (TensorProto.INT8, TensorProto.UINT8)}[bits]  # fmt: skip
    assert codes == narrow[0 if symmetric else 1]
    assert model.opset_import[0].version == (25 if bits == 2 else 21)
    onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(0).standard_normal((1, 72)).astype(np.float32)
    expected = x @ qweight.dequantize().numpy().T
    (reference,) = ReferenceEvaluator(model).run(None, {"x": x})
    np.testing.assert_allclose(reference, expected, rtol=1e-5, atol=1e-5)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # float inputs
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)
    assert convert_to_matmulnbits(model, accuracy_level=0) == 1
    (fused,) = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert {a.name: a.i for a in fused.attribute}["bits"] == (4 if bits == 3 else bits)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)

"""Per-token activation fake quantization against a plain reference, row by row."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeq.activations import QuantInputLinear, fake_quant_per_token
from edgeq.config import ActQuantConfig


def reference_per_token(x: np.ndarray, bits: int, symmetric: bool, clip: float) -> np.ndarray:
    """One token at a time, in float64, spelled out."""
    out = np.zeros_like(x, dtype=np.float64)
    for i, row in enumerate(x.astype(np.float64)):
        if symmetric:
            qmax = 2 ** (bits - 1) - 1
            scale = clip * np.max(np.abs(row)) / qmax
            if scale == 0:
                continue
            codes = np.clip(np.round(row / scale), -qmax - 1, qmax)
            out[i] = codes * scale
        else:
            qmax = 2**bits - 1
            lo, hi = clip * min(row.min(), 0.0), clip * max(row.max(), 0.0)
            scale = (hi - lo) / qmax
            if scale == 0:
                continue
            zero = np.round(-lo / scale)
            codes = np.clip(np.round(row / scale) + zero, 0, qmax)
            out[i] = (codes - zero) * scale
    return out


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("clip", [1.0, 0.9])
def test_matches_the_reference_including_zero_rows(symmetric, bits, clip):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(64, 96, generator=gen, dtype=torch.float64) * torch.rand(64, 1, generator=gen) * 5
    x[3] = 0.0  # an all-zero token
    x[7] = x[7].abs()  # all positive: the asymmetric range still holds 0
    x[9, 5] = 40.0  # an outlier
    got = fake_quant_per_token(x, bits, symmetric, clip).numpy()
    np.testing.assert_allclose(got, reference_per_token(x.numpy(), bits, symmetric, clip), atol=1e-12)
    assert np.all(got[3] == 0)
    levels = 2**bits
    assert all(len(np.unique(row)) <= levels for row in got)


def test_float32_input_keeps_its_dtype_and_shape():
    x = torch.randn(2, 5, 32)
    y = fake_quant_per_token(x, 4, True, 0.9)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert not torch.equal(x, y)


def test_wrapper_quantizes_only_when_switched_on():
    linear = torch.nn.Linear(32, 8)
    wrapper = QuantInputLinear(linear)
    x = torch.randn(4, 32)
    torch.testing.assert_close(wrapper(x), linear(x))
    wrapper.set_quantization(ActQuantConfig(bits=4), bits=4)
    torch.testing.assert_close(wrapper(x), linear(fake_quant_per_token(x, 4, True, 0.9)))
    wrapper.set_quantization(ActQuantConfig(bits=4), bits=16)
    torch.testing.assert_close(wrapper(x), linear(x))

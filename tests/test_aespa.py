"""aespa's learned rounding (``edgeq.quant.aespa``) against BoA and GPTQ on the same Kronecker loss."""

from __future__ import annotations

import pytest
import torch

from edgeq.config import AespaOptions, BoAOptions, WeightQuantConfig
from edgeq.quant.aespa import kronecker_gradient, learned_rounding
from edgeq.quant.boa import kronecker_loss, kronecker_quantize
from edgeq.quant.gptq import dampen, gptq_quantize

HEADS, HEAD_DIM, D_IN = 4, 8, 64
EXACT_BOA = BoAOptions(row_block=1)  # row by row: BoA's full Kronecker compensation


def _spd(n: int, decay: float, generator: torch.Generator) -> torch.Tensor:
    """A random symmetric positive definite matrix with eigenvalues from 1 down to 10^-decay."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator))
    return q @ torch.diag(torch.logspace(0, -decay, n)) @ q.T + 1e-3 * torch.eye(n)


def _layer(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w [heads·hd, d_in], h_row [heads, hd, hd], h_col [d_in, d_in]): correlated inputs with an
    offset, as a projection's input has after a norm."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, D_IN, generator=g) @ torch.randn(D_IN, D_IN, generator=g) * 0.5
    x = x + 0.3 * torch.randn(D_IN, generator=g)
    h_col = 2 * x.T @ x / x.shape[0]
    h_row = torch.stack([_spd(HEAD_DIM, 2.0, g) for _ in range(HEADS)])
    w = 0.1 * torch.randn(HEADS * HEAD_DIM, D_IN, generator=g)
    return w, h_row, h_col


def _loss(q, w, h_row, h_col) -> float:
    """The Kronecker loss on the dampened factors, which every method here minimizes."""
    h_row = torch.stack([dampen(h, 0.01)[0] for h in h_row])
    return kronecker_loss(q.dequantize() - w, h_row, dampen(h_col, 0.01)[0])


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("group_size", [-1, 32])
def test_learned_rounding_ends_below_boa_and_gptq_with_the_same_kronecker_factors(seed, group_size):
    w, h_row, h_col = _layer(seed)
    config = WeightQuantConfig(bits=3, group_size=group_size)
    aespa = _loss(learned_rounding(w, h_row, h_col, config), w, h_row, h_col)
    boa = _loss(kronecker_quantize(w, h_row, h_col, config, EXACT_BOA), w, h_row, h_col)
    gptq = _loss(gptq_quantize(w, h_col, config), w, h_row, h_col)
    assert aespa < boa < gptq


def test_at_4_bits_learned_rounding_ends_near_boa_and_far_below_gptq():
    w, h_row, h_col = _layer(0)
    config = WeightQuantConfig(bits=4, group_size=-1)
    aespa = _loss(learned_rounding(w, h_row, h_col, config), w, h_row, h_col)
    boa = _loss(kronecker_quantize(w, h_row, h_col, config, EXACT_BOA), w, h_row, h_col)
    gptq = _loss(gptq_quantize(w, h_col, config), w, h_row, h_col)
    assert aespa < 1.1 * boa and aespa < 0.7 * gptq


def test_each_weight_rounds_down_or_up_and_adarounds_own_weighting_ends_higher():
    """The codes stay in AdaRound's windows, ⌊W/s⌋ + z or one above. AdaRound's own λ = 0.01 after a
    warm-up ends above the defaults' loss: why the defaults differ (see ``AespaOptions``)."""
    w, h_row, h_col = _layer(0)
    config = WeightQuantConfig(bits=3, group_size=-1)
    q = learned_rounding(w, h_row, h_col, config)
    u = w / q.scale + q.zero.float()  # per channel: one scale per row
    step = q.codes.float() - torch.floor(u)
    assert (((step == 0) | (step == 1)) | (q.codes == 0) | (q.codes == 7)).all()
    adaround = learned_rounding(w, h_row, h_col, config, AespaOptions(reg=0.01, warmup=0.2, lr=0.05))
    assert _loss(adaround, w, h_row, h_col) > 1.2 * _loss(q, w, h_row, h_col)


def test_the_closed_form_gradient_is_the_autograd_gradient():
    w, h_row, h_col = _layer(2)
    delta = (0.01 * torch.randn_like(w)).requires_grad_(True)
    heads, hd, _ = h_row.shape
    d3 = delta.view(heads, hd, -1)
    torch.einsum("hab,hbi,ij,haj->", h_row, d3, h_col, d3).backward()
    assert torch.allclose(kronecker_gradient(delta.detach(), h_row, h_col), delta.grad, rtol=1e-4, atol=1e-6)
    per_head = h_col.expand(heads, -1, -1)  # per-head column factors (W_V's) give the same gradient
    assert torch.allclose(
        kronecker_gradient(delta.detach(), h_row, per_head), delta.grad, rtol=1e-4, atol=1e-6
    )


def test_codes_stay_on_the_grid_and_dead_columns_are_zero():
    w, h_row, h_col = _layer(3)
    h_col[5, :] = 0
    h_col[:, 5] = 0  # input 5 is always 0
    config = WeightQuantConfig(bits=2, group_size=32, symmetric=True)
    q = learned_rounding(w, h_row, h_col, config, AespaOptions(iterations=50))
    assert q.codes.max() <= 3 and q.bits == 2
    assert torch.all(q.dequantize()[:, 5] == 0)

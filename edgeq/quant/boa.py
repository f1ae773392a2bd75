"""BoA (Kim et al., arXiv 2406.13474): attention-aware integer weights without backpropagation.

The error of W_Q, W_K and W_V is weighed by how it moves the attention output, not the projection
output alone. Per head, the loss is approximated by a Kronecker-factored quadratic

    L(ΔW) = tr(H_row · ΔW · H_col · ΔWᵀ),   ΔW [head_dim, d_in]

  W_Q, head h:  H_col = 2E[x xᵀ] (the shared q/k/v input), H_row = mean_l R_lᵀ Σ_K R_l
                with Σ_K the covariance of the post-RoPE keys of h's key head and R_l the RoPE
                rotation at query position l (a score error q_lᵀ k_m is linear in R_l ΔW_Q x_l);
  W_K, head g:  the same with the post-RoPE query covariance, averaged over the query heads of g;
  W_V, head g:  H_col = 2E[X A_hᵀ A_h Xᵀ] summed over g's query heads (A_h their causal attention
                probabilities: an error of v_m reaches output l through A_h[l, m]), and
                H_row = mean_h W_O,hᵀ W_O,h over the same heads (W_O,h [d, hd] the columns of o_proj
                that read head h: the error then reaches the block's residual through o_proj).
                ``relaxed_v`` uses the plain H_col instead, which needs no per-head d_in² matrices;
                without ``v_out_proj`` (the default), H_row = I (the attention output before o_proj).

With U_row, U_col the upper Cholesky factors of H_row⁻¹ and H_col⁻¹, the inverse Hessian of the
row-major vec(ΔW) has the upper factor U_row ⊗ U_col, so GPTQ over vec(W) splits into (1) a GPTQ
sweep over the columns of each row with U_col, and (2) an OBS compensation of the rows not yet
quantized through U_row:  W[rest] −= U_row[B, rest]ᵀ · U_row[B, B]⁻ᵀ · (W[B] − Q[B]).
TurboBoA's speed-up quantizes ``row_block`` rows B of every head jointly in one sweep; each row block's
grid is fitted on its compensated weights when the sweep reaches it.

o_proj and the MLP linears use plain GPTQ.
"""

from __future__ import annotations

import torch

from edgeq.config import BoAOptions, GPTQOptions, WeightQuantConfig
from edgeq.quant.gptq import column_factor, factor_dampened, gptq_sweep
from edgeq.quant.grid import QuantizedWeight, concat_rows

# ---------------------------------------------------------------------------------------------
# RoPE and the row Hessians


def rotate_half_matrix(head_dim: int) -> torch.Tensor:
    """P [d, d] with P x = rotate_half(x) = [−x₂, x₁] (x = [x₁, x₂], halves of the head)."""
    half = head_dim // 2
    p = torch.zeros(head_dim, head_dim)
    p[torch.arange(half), torch.arange(half) + half] = -1.0
    p[torch.arange(half) + half, torch.arange(half)] = 1.0
    return p


def rope_matrices(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """R [L, d, d] with RoPE(x)_l = R_l x = cos_l ⊙ x + sin_l ⊙ rotate_half(x). cos, sin [L, d]."""
    p = rotate_half_matrix(cos.shape[-1])
    return torch.diag_embed(cos) + torch.diag_embed(sin) @ p


def apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """t [b, heads, L, d], cos/sin [b, L, d] → RoPE(t)."""
    half = t.shape[-1] // 2
    rotated = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
    return t * cos[:, None] + rotated * sin[:, None]


def position_averaged_covariance(sigma: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """mean_l R_lᵀ Σ R_l. sigma [..., d, d], rope [L, d, d] → [..., d, d]."""
    return torch.einsum("lai,...ab,lbj->...ij", rope, sigma, rope) / rope.shape[0]


def value_row_hessians(w_o: torch.Tensor, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """W_V's row Hessians [Hkv, hd, hd] = mean over the query heads h of each key/value head of
    W_O,hᵀ W_O,h. w_o [d, H·hd] (o_proj's weight)."""
    per_head = w_o.detach().float().view(w_o.shape[0], -1, head_dim)  # [d, H, hd]
    gram = torch.einsum("dha,dhb->hab", per_head, per_head)  # [H, hd, hd]
    return gram.view(num_kv_heads, -1, head_dim, head_dim).mean(1)


# ---------------------------------------------------------------------------------------------
# Statistics of one attention layer


class AttentionStatistics:
    """Accumulates, over calibration batches, what BoA's Q/K/V Hessians need.

    add(x, q, k, probs, cos, sin): x [b, L, d_in] the q/k/v input; q [b, H, L, hd] and
    k [b, Hkv, L, hd] post-RoPE; probs [b, H, L, L] attention probabilities (None in relaxed mode);
    cos, sin [b, L, hd] the RoPE of the batch. (The input Hessian H_col of W_Q/W_K is accumulated
    by the caller with the other linears'.)
    """

    def __init__(self, d_in: int, num_heads: int, num_kv_heads: int, head_dim: int, relaxed_v: bool):
        self.group = num_heads // num_kv_heads
        self.num_kv_heads = num_kv_heads
        self.q_sum = torch.zeros(num_heads, head_dim, head_dim)
        self.k_sum = torch.zeros(num_kv_heads, head_dim, head_dim)
        self.v_col = None if relaxed_v else torch.zeros(num_kv_heads, d_in, d_in)
        self.tokens = 0
        self.cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None

    def add(self, x, q, k, probs, cos, sin) -> None:
        b, _, length, _ = q.shape
        self.q_sum += torch.einsum("bhla,bhlc->hac", q, q)
        self.k_sum += torch.einsum("bhla,bhlc->hac", k, k)
        self.tokens += b * length
        if self.cos_sin is None or self.cos_sin[0].shape[0] < length:
            self.cos_sin = (cos[0], sin[0])
        if self.v_col is not None:
            per_kv = probs.view(b, self.num_kv_heads, self.group, length, length)
            gram = torch.einsum("bgqlm,bgqln->bgmn", per_kv, per_kv)  # Σ_h A_hᵀ A_h  [b, Hkv, L, L]
            self.v_col += torch.einsum("bma,bgmn,bnc->gac", x, gram, x)

    def row_hessians(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(H_row for each query head [H, hd, hd], for each key head [Hkv, hd, hd])."""
        rope = rope_matrices(*self.cos_sin)
        sigma_q = self.q_sum / self.tokens
        sigma_k = self.k_sum / self.tokens
        h_row_q = position_averaged_covariance(sigma_k.repeat_interleave(self.group, dim=0), rope)
        sigma_q_per_kv = sigma_q.view(self.num_kv_heads, self.group, *sigma_q.shape[1:]).mean(1)
        h_row_k = position_averaged_covariance(sigma_q_per_kv, rope)
        return h_row_q, h_row_k

    def v_col_hessians(self) -> torch.Tensor | None:
        """[Hkv, d_in, d_in] = 2/N Σ X A_hᵀ A_h Xᵀ, or None in relaxed mode."""
        return None if self.v_col is None else 2.0 / self.tokens * self.v_col


# ---------------------------------------------------------------------------------------------
# The Kronecker-factored sweep


def kronecker_quantize(
    w: torch.Tensor,
    h_row: torch.Tensor,
    h_col: torch.Tensor,
    config: WeightQuantConfig,
    options: BoAOptions = BoAOptions(),
    gptq: GPTQOptions = GPTQOptions(),
) -> QuantizedWeight:
    """Minimize Σ_h tr(H_row[h] ΔW_h H_col[h] ΔW_hᵀ) over integer weights.

    w [heads·hd, d_in]; h_row [heads, hd, hd]; h_col [d_in, d_in] shared by all heads, or
    [heads, d_in, d_in]. Returns the QuantizedWeight of w in its original row order.
    """
    heads, hd, _ = h_row.shape
    d_in = w.shape[1]
    w3 = w.detach().clone().float().view(heads, hd, d_in)
    shared = h_col.dim() == 2
    factors = [column_factor(h, gptq) for h in (h_col[None] if shared else h_col)]
    for g in range(heads):
        w3[g][:, factors[0 if shared else g].dead] = 0
    u_row = torch.stack([factor_dampened(h, options.row_percdamp)[0] for h in h_row])

    per_head: list[list[QuantizedWeight]] = [[] for _ in range(heads)]
    for r0 in range(0, hd, options.row_block):
        r1 = min(r0 + options.row_block, hd)
        n = r1 - r0
        if shared:  # every head's row block in one sweep
            f = factors[0]
            q = gptq_sweep(w3[:, r0:r1].reshape(-1, d_in), f.u, config, f.h_diag, gptq, f.perm)
            parts = [q.rows(h * n, (h + 1) * n) for h in range(heads)]
        else:
            parts = [
                gptq_sweep(w3[g, r0:r1], f.u, config, f.h_diag, gptq, f.perm) for g, f in enumerate(factors)
            ]
        for h in range(heads):
            per_head[h].append(parts[h])
        if r1 < hd:  # OBS: compensate the rows not yet quantized
            delta = w3[:, r0:r1] - torch.stack([p.dequantize() for p in parts])  # [heads, n, d_in]
            lower = u_row[:, r0:r1, r0:r1].transpose(1, 2)
            scaled = torch.linalg.solve_triangular(lower, delta, upper=False)
            w3[:, r1:] -= u_row[:, r0:r1, r1:].transpose(1, 2) @ scaled
    return concat_rows([part for rows in per_head for part in rows])


def kronecker_loss(delta: torch.Tensor, h_row: torch.Tensor, h_col: torch.Tensor) -> float:
    """Σ_h tr(H_row[h] ΔW_h H_col ΔW_hᵀ). delta [heads·hd, d_in], h_row [heads, hd, hd],
    h_col [d_in, d_in] or [heads, d_in, d_in]."""
    heads, hd, _ = h_row.shape
    d3 = delta.view(heads, hd, -1)
    hc = h_col if h_col.dim() == 3 else h_col.expand(heads, *h_col.shape)
    return float(torch.einsum("hab,hbi,hij,haj->", h_row, d3, hc, d3))


__all__ = [
    "AttentionStatistics",
    "BoAOptions",
    "apply_rope",
    "kronecker_loss",
    "kronecker_quantize",
    "rope_matrices",
    "value_row_hessians",
]

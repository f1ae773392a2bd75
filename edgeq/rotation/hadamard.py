"""Hadamard matrices and the factored (fast) orthogonal transform built from them.

A width n is written n = k · 2^a with a known Hadamard matrix of order k (k = 1, or a Paley
construction: order q + 1 for a prime q ≡ 3 mod 4, order 2(q + 1) for a prime q ≡ 1 mod 4). The
transform x ↦ x · (H_k ⊗ H_2^a)ᵀ / √n is then applied as a reshape and one small matmul per
Kronecker factor (the power of two split into factors of at most MAX_FACTOR), never as a dense
n × n matrix. Where no such k exists, a seeded random orthogonal matrix is the fallback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

MAX_FACTOR = 64  # largest Sylvester factor applied as one matmul


def sylvester(n: int) -> torch.Tensor:
    """The ±1 Sylvester Hadamard matrix [n, n], n a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester order must be a power of two, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i), χ the Legendre symbol mod the prime q."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)])
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def paley_hadamard(n: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix [n, n] by Paley's constructions I or II with a prime q, or None."""
    q = n - 1
    if n % 4 == 0 and _is_prime(q) and q % 4 == 3:  # Paley I
        jac = _jacobsthal(q)
        s = torch.zeros(n, n)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jac
        return s + torch.eye(n)
    q = n // 2 - 1
    if n % 4 == 0 and _is_prime(q) and q % 4 == 1:  # Paley II
        c = torch.zeros(q + 1, q + 1)  # symmetric conference matrix
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
        minus = torch.tensor([[1.0, -1.0], [-1.0, -1.0]])
        return torch.kron(c, plus) + torch.kron(torch.eye(q + 1), minus)
    return None


def small_hadamard(k: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of order k from the constructions above (k = 1, 2, or Paley), or None."""
    if k in (1, 2):
        return sylvester(k)
    return paley_hadamard(k)


def hadamard_split(n: int) -> tuple[int, int] | None:
    """(k, m) with n = k · m, m the largest power of two for which an order-k Hadamard is known."""
    m = n & -n  # largest power of two dividing n
    while m >= 1:
        if small_hadamard(n // m) is not None:
            return n // m, m
        m //= 2
    return None


def _power_of_two_factors(m: int) -> list[int]:
    factors = []
    while m > 1:
        f = min(m, MAX_FACTOR)
        factors.append(f)
        m //= f
    return factors


@dataclass
class OrthogonalTransform:
    """x ↦ x · Mᵀ over the last dimension, M an orthogonal [n, n] matrix held as Kronecker factors.

    factors: matrices whose Kronecker product, scaled by ``scale``, is M (a single dense factor for
    the random-orthogonal fallback). kind: how M was built, for reports.
    """

    factors: list[torch.Tensor]
    scale: float
    kind: str

    @property
    def size(self) -> int:
        return math.prod(f.shape[0] for f in self.factors)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., n] → x Mᵀ [..., n]."""
        return kronecker_apply(x, self.factors, self.scale)

    def matrix(self) -> torch.Tensor:
        """M as a dense [n, n] matrix (for offline fusion into weights and for tests)."""
        return self.apply(torch.eye(self.size, dtype=torch.float64)).T.contiguous()


def kronecker_apply(x: torch.Tensor, factors: list[torch.Tensor], scale: float) -> torch.Tensor:
    """x [..., n] → x · (F_1 ⊗ … ⊗ F_j)ᵀ · scale, as a reshape and one small matmul per factor."""
    lead = x.shape[:-1]
    y = x.reshape(*lead, *(f.shape[0] for f in factors))
    last = y.dim() - 1  # positive axes only: a traced -1 becomes an invalid ONNX Transpose perm
    for i, f in enumerate(factors):
        axis = len(lead) + i
        y = torch.movedim(torch.movedim(y, axis, last) @ f.to(y.device, y.dtype).T, last, axis)
    return y.reshape(x.shape) * scale


class OnlineRotation(nn.Module):
    """An OrthogonalTransform applied inside the model's forward (its factors are buffers, so they
    follow the model's device and dtype and become small constants in an exported graph)."""

    def __init__(self, transform: OrthogonalTransform):
        super().__init__()
        self.kind = transform.kind
        self.scale = transform.scale
        self.num_factors = len(transform.factors)
        for i, f in enumerate(transform.factors):
            self.register_buffer(f"factor{i}", f.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factors = [getattr(self, f"factor{i}") for i in range(self.num_factors)]
        return kronecker_apply(x, factors, self.scale)


def hadamard_transform(n: int, seed: int | None = None) -> OrthogonalTransform:
    """The normalized Hadamard transform of width n, factored; a seeded random orthogonal matrix where
    no Hadamard order is known (``seed`` then matters; default 0)."""
    split = hadamard_split(n)
    if split is None:
        gen = torch.Generator().manual_seed(0 if seed is None else seed)
        q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r))[None, :]
        return OrthogonalTransform([q], 1.0, f"random orthogonal {n} (no Hadamard of order {n} known)")
    k, m = split
    factors = ([small_hadamard(k)] if k > 1 else []) + [sylvester(f) for f in _power_of_two_factors(m)]
    if not factors:
        factors = [torch.ones(1, 1)]
    kind = f"Hadamard {k} x {m}" if k > 1 else f"Hadamard {m}"
    return OrthogonalTransform([f.double() for f in factors], 1.0 / math.sqrt(n), kind)


def random_hadamard_matrix(n: int, seed: int) -> tuple[torch.Tensor, str]:
    """A seeded randomized Hadamard matrix H · diag(s) / √n [n, n] (float64; s random ±1), or a seeded
    random orthogonal matrix where no Hadamard order is known; and how it was built."""
    transform = hadamard_transform(n, seed)
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
    if len(transform.factors) == 1 and transform.scale == 1.0:  # the random orthogonal fallback
        return transform.matrix(), transform.kind
    return transform.matrix() * signs[None, :], "randomized " + transform.kind

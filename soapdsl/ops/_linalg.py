"""Shared batched linear-algebra kernels (ops import these, never each other).

Every function takes tensors with a leading batch dimension: ``[B, m, n]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


def newton_schulz(
    g: torch.Tensor,
    steps: int,
    coeffs: Sequence[float],
    cleanup: int = 0,
    eps: float = 1e-7,
    eps_mode: str = "add",
    dtype: str = "fp32",
) -> torch.Tensor:
    """Approximate the orthogonal polar factor U V^T of each matrix in ``g`` ([B, m, n]).

    Quintic steps ``X <- a X + (b A + c A^2) X`` with ``A = X X^T``, then ``cleanup`` cubic
    steps ``X <- 1.5 X - 0.5 (X X^T) X``, on the wide orientation (transposed when m > n),
    after dividing each matrix by its Frobenius norm (``+ eps`` or ``clamp(min=eps)``).
    Returns ``g``'s dtype.
    """
    x = g.to(_DTYPES[dtype])
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
    x = x / (norm + eps) if eps_mode == "add" else x / norm.clamp(min=eps)
    a, b, c = coeffs
    for _ in range(steps):
        gram = x @ x.mT
        update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, update, x, beta=a)
    for _ in range(cleanup):
        x = torch.baddbmm(x, x @ x.mT, x, beta=1.5, alpha=-0.5)
    if tall:
        x = x.mT
    return x.to(g.dtype)


def as_matrices(t: torch.Tensor) -> torch.Tensor:
    """View a stacked bucket [B, d0, d1, ...] as matrices [B, d0, d1*...]."""
    return t if t.dim() == 3 else t.reshape(t.size(0), t.size(1), -1)

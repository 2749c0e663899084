"""Shared batched linear-algebra kernels (ops import these, never each other).

Every function takes tensors with a leading batch dimension: ``[B, m, n]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64, "auto": None}


def newton_schulz(
    g: torch.Tensor,
    steps: int,
    coeffs: Sequence[float],
    cleanup: int = 0,
    eps: float = 1e-7,
    eps_mode: str = "add",
    dtype: str = "auto",
    norm_kind: str = "fro",
    power_iters: int = 10,
) -> torch.Tensor:
    """Approximate the orthogonal polar factor U V^T of each matrix in ``g`` ([B, m, n]).

    Quintic steps ``X <- a X + (b A + c A^2) X`` with ``A = X X^T``, then ``cleanup`` cubic
    steps ``X <- 1.5 X - 0.5 (X X^T) X``, on the wide orientation (transposed when m > n),
    after dividing each matrix by its Frobenius norm, or with ``norm_kind="spectral"`` by its
    top singular value from ``power_iters`` power-iteration steps (``+ eps`` or
    ``clamp(min=eps)``). Returns ``g``'s dtype.
    """
    x = g.to(_DTYPES[dtype] or g.dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    if norm_kind == "spectral":
        norm = top_singular_value(x, power_iters).to(x.dtype)
    else:
        norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
    # the iteration runs in two contiguous [B, r, c] buffers and two [B, r, r] ones, written
    # with out= (the first one in the wide orientation, so no step reads a transposed view)
    denom = norm + eps if eps_mode == "add" else norm.clamp(min=eps)
    x = torch.div(x, denom, out=x.new_empty(x.shape))  # new_empty is contiguous, unlike x.mT
    spare = torch.empty_like(x)
    gram = x.new_empty((*x.shape[:-1], x.size(-2)))
    update = torch.empty_like(gram)
    a, b, c = coeffs
    for _ in range(steps):
        torch.bmm(x, x.mT, out=gram)
        torch.baddbmm(gram, gram, gram, beta=b, alpha=c, out=update)
        torch.baddbmm(x, update, x, beta=a, out=spare)
        x, spare = spare, x
    for _ in range(cleanup):
        torch.bmm(x, x.mT, out=gram)
        torch.baddbmm(x, gram, x, beta=1.5, alpha=-0.5, out=spare)
        x, spare = spare, x
    if tall:
        x = x.mT
    return x.to(g.dtype)


def top_singular_value(x: torch.Tensor, iters: int) -> torch.Tensor:
    """Largest singular value of each matrix of a wide batch [B, m, n] (m <= n), as [B, 1, 1].

    Power iteration on ``X X^T`` (the small side) from a fixed start vector, in at least fp32;
    no host synchronisation.
    """
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    gram = work @ work.mT
    v = torch.ones(gram.shape[:-1], dtype=gram.dtype, device=gram.device).unsqueeze(-1)
    for _ in range(iters):
        v = gram @ v
        v = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True).clamp(min=torch.finfo(v.dtype).tiny)
    return (v.mT @ gram @ v).clamp(min=0).sqrt()


def as_matrices(t: torch.Tensor) -> torch.Tensor:
    """View a stacked bucket [B, d0, d1, ...] as matrices [B, d0, d1*...]."""
    return t if t.dim() == 3 else t.reshape(t.size(0), t.size(1), -1)


# -- Kronecker-factored bases (rotate, shampoo) ---------------------------------------------


def mode_mul(x: torch.Tensor, m: torch.Tensor, dim: int) -> torch.Tensor:
    """Mode-``dim`` product of a batch: ``y[b, .., j, ..] = sum_i m[b, j, i] x[b, .., i, ..]``.

    ``x`` is [B, d0, d1, ...] and ``dim`` indexes the per-parameter dims (0 = d0).
    Matrices take a single batched matmul; higher orders move the dim last and back.
    """
    if x.dim() == 3:
        return m @ x if dim == 0 else x @ m.mT
    moved = x.movedim(dim + 1, -1)
    y = (moved.reshape(x.size(0), -1, moved.size(-1)) @ m.mT).reshape(moved.shape)
    return y.movedim(-1, dim + 1)


def rotate(x: torch.Tensor, qs: dict[int, torch.Tensor]) -> torch.Tensor:
    """``x x_k Q_k^T`` over the factored dims: coordinates in the eigenbasis (Q^T X Q for matrices)."""
    for dim in sorted(qs):
        x = mode_mul(x, qs[dim].mT, dim)
    return x


def unrotate(x: torch.Tensor, qs: dict[int, torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`rotate` (Q X Q^T for matrices)."""
    for dim in sorted(qs):
        x = mode_mul(x, qs[dim], dim)
    return x


def factor_stats(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``G_(k) G_(k)^T``: contract a batch [B, d0, ...] with itself over every dim but ``dim``."""
    if x.dim() == 2:  # a batch of vectors: outer products
        return x.unsqueeze(-1) * x.unsqueeze(-2)
    if x.dim() == 3:
        return x @ x.mT if dim == 0 else x.mT @ x
    moved = x.movedim(dim + 1, 1).reshape(x.size(0), x.size(dim + 1), -1)
    return moved @ moved.mT


def _eye_like(m: torch.Tensor) -> torch.Tensor:
    return torch.eye(m.size(-1), dtype=m.dtype, device=m.device)


def eigh_desc(m: torch.Tensor, jitter: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors (as columns) of symmetric [B, d, d], in descending order.

    Runs in at least fp32; if the decomposition fails it is retried in float64 and cast back.
    """
    work = m if m.dtype in (torch.float32, torch.float64) else m.float()
    if jitter:
        work = work + jitter * _eye_like(work)
    try:
        vals, vecs = torch.linalg.eigh(work)
    except RuntimeError:  # torch.linalg.LinAlgError: ill-conditioned input; retry in float64
        vals, vecs = torch.linalg.eigh(work.double())
    return vals.flip(-1).to(m.dtype), vecs.flip(-1).to(m.dtype)


def refresh_basis(gg: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SOAP's basis refresh: sort the old basis by estimated eigenvalue, then one power step + QR.

    Returns the new basis and the per-matrix order ``idx`` ([B, d]) applied to its columns.

    One matmul: ``P = GG Q`` gives both the estimates ``diag(Q^T GG Q)`` (as the column sums
    of ``Q * P``) and the power step of the sorted basis (``GG Q[:, idx] = P[:, idx]``), where
    the reference spends three.
    """
    power = gg @ q
    est = (q * power).sum(dim=-2)
    idx = torch.argsort(est, dim=-1, descending=True)
    power = power.gather(-1, idx.unsqueeze(-2).expand_as(power))
    try:
        q_new = torch.linalg.qr(power).Q
    except RuntimeError:
        q_new = torch.linalg.qr(power.double()).Q.to(q.dtype)
    return q_new, idx


def permute_dim(x: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """Reorder per-parameter dim ``dim`` of a batch [B, d0, ...] by a per-matrix order [B, d]."""
    shape = [1] * x.dim()
    shape[0] = idx.size(0)
    shape[dim + 1] = idx.size(1)
    return x.gather(dim + 1, idx.view(shape).expand_as(x))


def inverse_root(m: torch.Tensor, exponent: float, eps: float) -> torch.Tensor:
    """``(M + eps I)^(-exponent)`` of symmetric PSD [B, d, d] through ``eigh`` (fp64 on failure)."""
    vals, vecs = eigh_desc(m)
    # rounding can leave tiny negative eigenvalues: shift the spectrum up to 0 first
    # (DistributedShampoo does the same), then add eps
    shift = (-vals.amin(dim=-1, keepdim=True)).clamp(min=0)
    vals = (vals + shift + eps).clamp(min=torch.finfo(vals.dtype).tiny).pow(-exponent)
    return (vecs * vals.unsqueeze(-2)) @ vecs.mT


def merge_shape(shape: tuple[int, ...], max_dim: int) -> tuple[int, ...]:
    """SOAP's merge_dims: merge consecutive dims while their product stays <= ``max_dim``."""
    out: list[int] = []
    acc = 1
    for s in shape:
        if acc * s > max_dim:
            if acc > 1:
                out.append(acc)
                acc = s
            else:
                out.append(s)
        else:
            acc *= s
    if acc > 1 or not out:
        out.append(acc)
    return tuple(out)

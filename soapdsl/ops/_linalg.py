"""Shared batched linear-algebra kernels (ops import these, never each other).

Every function takes tensors with a leading batch dimension: ``[B, m, n]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from soapdsl.errors import SoapArgumentError

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
    form: str = "standard",
    restart: int = 3,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """Approximate the orthogonal polar factor U V^T of each matrix in ``g`` ([B, m, n]).

    Quintic steps ``X <- a X + (b A + c A^2) X`` with ``A = X X^T``, then ``cleanup`` cubic
    steps ``X <- 1.5 X - 0.5 (X X^T) X``, on the wide orientation (when m > n, on the
    transpose: ``A = X^T X``, ``X <- a X + X (b A + c A^2)``, without moving X), after dividing
    each matrix by its Frobenius norm, or with ``norm_kind="spectral"`` by its top singular
    value from ``power_iters`` power-iteration steps (``+ eps`` or ``clamp(min=eps)``).
    Returns ``g``'s dtype.

    ``scratch``: a tensor the caller no longer needs (``g`` itself, when it is a temporary); if
    it is contiguous and has ``g``'s shape and the working dtype, the iteration uses its memory
    for one of its two buffers instead of allocating, and the result may live there.

    ``form="gram"`` runs the same polynomial on the r x r Gram matrix where that counts fewer
    flops (see :func:`gram_pays`), restarting from the rectangular matrix every ``restart``
    iterations; equal to the standard form in exact arithmetic.

    The standard form computes the symmetric products ``X X^T`` and ``A^2`` by halves where
    :func:`halves_pay` (fp32/fp64 on a CPU, r even and at least ``HALVES_MIN_ROWS``): 3/4 of
    their flops, the same iteration up to rounding. Where :func:`spectral_pays` (fp32 on a CPU,
    many steps on a rectangular matrix: SOAP-Muon's 12) it evaluates the same polynomial from a
    float64 eigendecomposition of ``X X^T`` instead (:func:`_spectral_newton_schulz`).
    """
    work = _DTYPES[dtype] or g.dtype
    if form == "gram" and work not in (torch.float32, torch.float64):
        work = torch.float32  # the Gram form in bf16 can turn to NaN
    x = g.to(work)
    tall = g.size(-2) > g.size(-1)
    wide = x.mT if tall else x
    if norm_kind == "spectral":
        norm = top_singular_value(wide, power_iters).to(x.dtype)
    else:
        norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
    denom = norm + eps if eps_mode == "add" else norm.clamp(min=eps)
    if eps == 0:  # nothing guards 0 / 0: a zero matrix stays zero, as in renorm and graft
        denom = denom.clamp(min=torch.finfo(denom.dtype).tiny)
    a, b, c = coeffs
    polys = [(a, b, c)] * steps + [(1.5, -0.5, 0.0)] * cleanup
    spare = None
    if scratch is not None and scratch.shape == x.shape and scratch.dtype == x.dtype and scratch.is_contiguous():
        spare = scratch
    if form == "gram" and gram_pays(wide.size(-2), wide.size(-1), steps, cleanup, restart):
        return _gram_newton_schulz(_normalised(x, denom), polys, restart, tall, spare).to(g.dtype)
    if form == "standard" and spectral_pays(wide, steps, cleanup):
        out = _spectral_newton_schulz(x, denom, polys, tall, spare)
        if out is not None:
            return out.to(g.dtype)
    if halves_pay(wide):
        return _halved_newton_schulz(x, denom, polys, tall, spare).to(g.dtype)
    return _standard_newton_schulz(_normalised(x, denom), polys, tall, spare).to(g.dtype)


def _normalised(x: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """``x / denom`` in a new contiguous buffer (new_empty is contiguous, unlike ``x.mT``)."""
    return torch.div(x, denom, out=x.new_empty(x.shape))


# Both forms iterate a tall batch in its own orientation: ``X^T`` of the wide iteration,
# A = X^T X and X <- a X + X M^T, so neither the input nor the result is ever read or written
# transposed (a strided pass costs 5-8x a contiguous one on a CPU, and the update's later
# elementwise stages and the parameter update would all pay it).


def _gram_of(u: torch.Tensor, v: torch.Tensor, tall: bool, out: torch.Tensor) -> None:
    """``U V^T`` of wide blocks, ``U^T V`` of tall ones."""
    if tall:
        torch.bmm(u.mT, v, out=out)
    else:
        torch.bmm(u, v.mT, out=out)


def _apply(
    base: torch.Tensor,
    m: torch.Tensor,
    u: torch.Tensor,
    tall: bool,
    out: torch.Tensor,
    beta: float = 1.0,
    alpha: float = 1.0,
) -> None:
    """``out = beta base + alpha M U`` (wide), or its transpose ``beta base + alpha U M^T`` (tall)."""
    if tall:
        torch.baddbmm(base, u, m.mT, beta=beta, alpha=alpha, out=out)
    else:
        torch.baddbmm(base, m, u, beta=beta, alpha=alpha, out=out)


def _standard_newton_schulz(
    x: torch.Tensor, polys: Sequence[tuple[float, float, float]], tall: bool, spare: torch.Tensor | None = None
) -> torch.Tensor:
    """``X <- a X + (b A + c A^2) X`` with ``A = X X^T`` per ``(a, b, c)`` in ``polys``, on a
    normalised contiguous batch ``x`` (wide [B, r, c], or tall [B, c, r] iterated as its
    transpose), in two buffers of x's shape and two [B, r, r] ones written with out=."""
    r = x.size(-1) if tall else x.size(-2)
    spare = torch.empty_like(x) if spare is None else spare
    gram = x.new_empty((x.size(0), r, r))
    update = torch.empty_like(gram)
    for a, b, c in polys:
        _gram_of(x, x, tall, gram)
        if c:
            torch.baddbmm(gram, gram, gram, beta=b, alpha=c, out=update)
            _apply(x, update, x, tall, spare, beta=a)
        else:
            _apply(x, gram, x, tall, spare, beta=a, alpha=b)
        x, spare = spare, x
    return x


HALVES_MIN_ROWS = 256
"""The shortest side from which :func:`halves_pay` splits the iteration. Measured on a 2-core
CPU (fp32, 5 steps, c = r to 4r): on batches of 4 with r = 256 to 512 the halved form takes
0.85-0.96x the time of the plain one, on a single 256-row matrix 0.98-1.03x; at r = 128 it is
1.03-1.5x slower."""


def halves_pay(x: torch.Tensor) -> bool:
    """Whether :func:`newton_schulz` runs the halved form on the wide batch ``x`` ([B, r, c]).

    CPU only: not measured on a GPU, where the benchmark's Muon step is bound by kernel launches
    (measured on an H100) and this form launches four times as many. fp32 and fp64 only: in
    bf16 each half-product sum would add a rounding the plain form does not have. Eager only:
    compiled by torch.compile the halved form ran 1.12-1.21x slower than the compiled plain
    one on the benchmark's Muon step (the plain one compiles to the eager speed)."""
    r = x.size(-2)
    return (
        x.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and x.dtype in (torch.float32, torch.float64)
        and r % 2 == 0
        and r >= HALVES_MIN_ROWS
    )


SPECTRAL_MIN_ROWS = 128
"""The shortest side from which :func:`spectral_pays` considers the spectral form (below it
LAPACK's per-call overhead dominates: 1.2-1.9x the iteration's time at r = 64, measured)."""


def spectral_flops(r: int) -> int:
    """The eigendecomposition's share of :func:`spectral_cost`, in fp32 matmul flops of equal
    time: float64 ``eigh`` of an r x r matrix measured at 40-67 r^3 from r = 256 (batches of 1
    and 4, r up to 512, 2 CPU cores) and 83-94 r^3 at r = 128; the larger ends are taken. At
    r = 1024 it was about 31 r^3, so the rule is cautious there: a square 1024 matrix under
    SOAP-Muon's steps keeps iterating (356 ms) where the spectral form took 267 ms."""
    return (64 if r >= 256 else 96) * r**3


def spectral_cost(r: int, c: int) -> int:
    """The spectral form's cost on a wide r x c matrix in fp32 matmul flops of equal time: the
    float64 products ``X X^T``, ``V diag(h) V^T`` and ``M X`` count twice (float64 matmul ran
    at 0.42-0.5x the fp32 rate), plus :func:`spectral_flops`."""
    return 2 * (4 * r * r * c + 2 * r**3) + spectral_flops(r)


def spectral_pays(x: torch.Tensor, steps: int, cleanup: int) -> bool:
    """Whether :func:`newton_schulz`'s standard form evaluates its polynomial spectrally on the
    wide batch ``x`` ([B, r, c]): where :func:`spectral_cost` is below the iteration's flops
    (by halves where :func:`halves_pay`). Unlike the iteration, the spectral form costs the same
    for any number of steps: for SOAP-Muon's 10 + 2 on 256 x 1024 it took 0.48-0.56x the halved
    iteration's time, for Muon's 5 it would take 1.1-1.3x, so Muon keeps iterating.

    CPU only (a GPU's ``eigh`` is slow and synchronises with the host), eager only (the
    estimates are eager timings), and fp32 only: the form works in float64 to stay as accurate
    as the fp32 iteration, and a float64 iteration would need more than float64 to match."""
    r, c = x.size(-2), x.size(-1)
    if not (
        x.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and x.dtype == torch.float32
        and r >= SPECTRAL_MIN_ROWS
    ):
        return False
    iterate = newton_schulz_flops(r, c, steps, cleanup, "halved" if halves_pay(x) else "standard")
    return spectral_cost(r, c) < iterate


def _spectral_newton_schulz(
    x: torch.Tensor,
    denom: torch.Tensor,
    polys: Sequence[tuple[float, float, float]],
    tall: bool,
    spare: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The standard iteration's result on ``x / denom`` ([B, r, c] wide, or [B, c, r] tall),
    evaluated on the eigenvalues of its Gram matrix; None where that cannot be done (a
    non-finite entry, or LAPACK not converging), for the caller to iterate instead.

    Each step maps X to ``P(A) X`` with ``A = X X^T`` and P a polynomial, and every later A is
    a polynomial of the first one, so the whole run is ``H(A_0) X_0`` for one polynomial H: with
    ``A_0 = V diag(s) V^T``, each eigenvalue (a squared singular value) follows the scalar
    recursion ``p = a + s (b + c s)``, ``h <- h p``, ``s <- s p^2`` and the result is
    ``V diag(h) V^T X_0``. Equal to the iteration in exact arithmetic. The Gram matrix squares
    the spread of the singular values, so fp32 would lose the small ones (measured: relative
    errors of 1e-3 to 7 against a float64 run where the iteration has 1e-6 to 3e-4); in
    float64 the error is the iteration's or below. The cost does not grow with the number of
    steps: one r x r ``eigh`` and three float64 products. x goes to float64 in parts of
    ``SPECTRAL_PART`` elements along its long side, for the Gram matrix and again for the result.
    """
    r = x.size(-1) if tall else x.size(-2)
    gram = x.new_zeros((x.size(0), r, r), dtype=torch.float64)
    for part in _long_parts(x, tall):
        x64 = part.to(torch.float64)
        if tall:
            gram.baddbmm_(x64.mT, x64)
        else:
            gram.baddbmm_(x64, x64.mT)
    if not bool(torch.isfinite(gram).all()):
        return None
    try:
        s, vec = torch.linalg.eigh(gram)
    except torch.linalg.LinAlgError:
        return None
    d = denom.to(torch.float64).flatten(-2)  # [B, 1]
    s = (s / (d * d)).clamp_(min=0.0)  # eigenvalues of (X / d)(X / d)^T; rounding can dip below 0
    h = torch.ones_like(s)
    for a, b, c in polys:
        p = (s * c + b).mul_(s).add_(a)
        h.mul_(p)
        s.mul_(p).mul_(p)
    h.div_(d)
    m = (vec * h.unsqueeze(-2)) @ vec.mT  # symmetric, so a tall X^T's result is X M
    out = spare if spare is not None else torch.empty_like(x)
    # each part of the result reads only its own part of x, so out may be x itself
    for part, dest in zip(_long_parts(x, tall), _long_parts(out, tall), strict=True):
        x64 = part.to(torch.float64)
        dest.copy_(x64 @ m if tall else m @ x64)
    return out


SPECTRAL_PART = 1 << 22
"""Elements of x that the spectral form holds in float64 at a time (32 MiB): it converts x in
parts along the long side, so a large batch does not need a float64 copy of itself twice over."""


def _long_parts(x: torch.Tensor, tall: bool) -> list[torch.Tensor]:
    """Views of a wide [B, r, c] (tall: [B, c, r]) batch, split along its long side c into parts
    of about ``SPECTRAL_PART`` elements (one part where the batch is smaller)."""
    per_long = x.size(0) * (x.size(-1) if tall else x.size(-2))
    step = max(1, SPECTRAL_PART // max(per_long, 1))
    return list(x.split(step, dim=-2 if tall else -1))


def _halved_newton_schulz(
    x: torch.Tensor,
    denom: torch.Tensor,
    polys: Sequence[tuple[float, float, float]],
    tall: bool,
    spare: torch.Tensor | None = None,
) -> torch.Tensor:
    """The standard iteration on the halves of ``x / denom`` along its short side: the rows of
    a wide [B, r, c] batch, the columns of a tall [B, c, r] one (r even).

    ``A = X X^T`` and ``A^2`` are symmetric, so only their upper blocks are computed:
    ``A11 = X1 X1^T``, ``A12 = X1 X2^T``, ``A22 = X2 X2^T`` (3/4 of the flops of ``X X^T``) and
    ``(A^2)11 = A11 A11 + A12 A12^T``, ``(A^2)12 = A11 A12 + A12 A22``,
    ``(A^2)22 = A12^T A12 + A22 A22`` (3/4 of ``A A``); then with ``M = b A + c A^2``,
    ``X1 <- a X1 + M11 X1 + M12 X2`` and ``X2 <- a X2 + M12^T X1 + M22 X2`` (the full flops;
    a tall batch computes the transposes). The halves live stacked in [2, B, ...] buffers
    (``spare``, when given, is the second) so that every product reads and writes whole
    contiguous batches (bmm falls back to a per-matrix loop when its output is a strided view
    such as ``x[:, :h]``).
    """
    n, rows, cols = x.shape
    h = (cols if tall else rows) // 2
    split = x.unflatten(-1, (2, h)).movedim(-2, 0) if tall else x.unflatten(1, (2, h)).transpose(0, 1)
    xs = x.new_empty(split.shape)
    torch.div(split, denom, out=xs)  # x is read here for the last time, so spare may be x
    ys = torch.empty_like(xs) if spare is None else spare.view(split.shape)
    a11, a12, a22, m11, m12, m22 = x.new_empty((6, n, h, h)).unbind(0)
    for a, b, c in polys:
        x1, x2 = xs.unbind(0)
        y1, y2 = ys.unbind(0)
        _gram_of(x1, x1, tall, a11)
        _gram_of(x1, x2, tall, a12)
        _gram_of(x2, x2, tall, a22)
        if c:
            # the second product of each block accumulates with out= its own input, not with
            # baddbmm_, which torch.utils.flop_counter does not count
            torch.baddbmm(a11, a11, a11, beta=b, alpha=c, out=m11)
            torch.baddbmm(m11, a12, a12.mT, alpha=c, out=m11)
            torch.baddbmm(a12, a11, a12, beta=b, alpha=c, out=m12)
            torch.baddbmm(m12, a12, a22, alpha=c, out=m12)
            torch.baddbmm(a22, a22, a22, beta=b, alpha=c, out=m22)
            torch.baddbmm(m22, a12.mT, a12, alpha=c, out=m22)
            p11, p12, p22, scale = m11, m12, m22, 1.0
        else:  # a cubic step: M = b A
            p11, p12, p22, scale = a11, a12, a22, b
        _apply(x1, p11, x1, tall, y1, beta=a, alpha=scale)
        _apply(y1, p12, x2, tall, y1, alpha=scale)
        _apply(x2, p22, x2, tall, y2, beta=a, alpha=scale)
        _apply(y2, p12.mT, x1, tall, y2, alpha=scale)
        xs, ys = ys, xs
    # back to x's layout, into the spare buffer (no allocation)
    out = ys.view(n, rows, cols)
    if tall:
        out.unflatten(-1, (2, h)).copy_(xs.movedim(0, -2))
    else:
        out.unflatten(1, (2, h)).copy_(xs.transpose(0, 1))
    return out


def _gram_phases(iters: int, restart: int) -> list[int]:
    """Lengths of the runs of iterations between restarts (``restart >= 1``)."""
    return [min(restart, iters - s) for s in range(0, iters, restart)]


def newton_schulz_flops(r: int, c: int, steps: int, cleanup: int, form: str = "standard", restart: int = 3) -> int:
    """Matmul flops of one Newton-Schulz call on a wide r x c matrix (r <= c); ``form="halved"``:
    the standard form by halves (r even), 3/4 of ``X X^T`` and of ``A A``."""
    if form == "standard":
        return steps * (4 * r * r * c + 2 * r**3) + cleanup * 4 * r * r * c
    if form == "halved":
        return steps * (3 * r * r * c // 2 + 3 * r**3 // 2 + 2 * r * r * c) + cleanup * (
            3 * r * r * c // 2 + 2 * r * r * c
        )
    flops = 0
    quintic = steps
    for length in _gram_phases(steps + cleanup, restart):
        flops += 4 * r * r * c  # R = X X^T at the start, X <- Q X at the end
        for k in range(length):
            flops += 2 * r**3 if quintic > 0 else 0  # R R
            flops += 2 * r**3 if k > 0 else 0  # Q <- P Q (the first P is Q)
            flops += 4 * r**3 if k < length - 1 else 0  # R <- P R P
            quintic -= 1
    return flops


def gram_pays(r: int, c: int, steps: int, cleanup: int, restart: int) -> bool:
    """Whether the Gram form counts fewer matmul flops than the standard one for a wide r x c
    matrix (about when c > 1.5 r for Muon's five steps; never for square matrices)."""
    return newton_schulz_flops(r, c, steps, cleanup, "gram", restart) < newton_schulz_flops(r, c, steps, cleanup)


def _gram_newton_schulz(
    x: torch.Tensor,
    polys: Sequence[tuple[float, float, float]],
    restart: int,
    tall: bool,
    spare: torch.Tensor | None = None,
) -> torch.Tensor:
    """Newton-Schulz on the Gram matrix of a normalised contiguous batch ``x`` (wide [B, r, c],
    or tall [B, c, r] iterated as its transpose: ``R = X^T X``, ``X <- X Q^T``).

    Every iteration of the standard form multiplies X by a polynomial of its Gram matrix,
    ``X <- P X`` with ``P = a I + b R + c R^2`` and ``R = X X^T``. So within a run of iterations
    X stays ``Q X0`` with ``Q`` the product of the P's, and R follows ``R <- P R P``: r x r
    matmuls only, and X is touched once at each end of the run. In floating point R drifts
    from ``X X^T`` as the singular values converge (without restarts the fp32 error on
    ill-conditioned inputs was 5-90x the standard form's, and NaN after 12 iterations);
    rebuilding X and R every ``restart`` iterations keeps it at the standard form's level.
    """
    spare = torch.empty_like(x) if spare is None else spare
    side = x.size(-1) if tall else x.size(-2)
    r = x.new_empty((x.size(0), side, side))
    p, q, t = torch.empty_like(r), torch.empty_like(r), torch.empty_like(r)
    k = 0
    for length in _gram_phases(len(polys), restart):
        _gram_of(x, x, tall, r)
        for i in range(length):
            a, b, c = polys[k + i]
            if c:
                torch.baddbmm(r, r, r, beta=b, alpha=c, out=p)
            else:
                torch.mul(r, b, out=p)
            p.diagonal(dim1=-2, dim2=-1).add_(a)
            if i == 0:
                q, p = p, q  # Q = P
                step = q
            else:
                torch.bmm(p, q, out=t)
                q, t = t, q
                step = p
            if i < length - 1:
                torch.bmm(step, r, out=t)
                torch.bmm(t, step, out=r)
        if tall:  # X <- Q X, or its transpose
            torch.bmm(x, q.mT, out=spare)
        else:
            torch.bmm(q, x, out=spare)
        x, spare = spare, x
        k += length
    return x


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
    A second failure raises ``torch.linalg.LinAlgError``, which the ops turn into a SoapError
    naming the parameters (see :func:`decomposition_error`).
    """
    work = m if m.dtype in (torch.float32, torch.float64) else m.float()
    if jitter:
        work = work + jitter * _eye_like(work)
    try:
        vals, vecs = torch.linalg.eigh(work)
    except RuntimeError:  # torch.linalg.LinAlgError: ill-conditioned input; retry in float64
        vals, vecs = torch.linalg.eigh(work.double())
    return vals.flip(-1).to(m.dtype), vecs.flip(-1).to(m.dtype)


def nonfinite(m: torch.Tensor) -> list[int]:
    """Indices of the matrices of a batch [B, d, d] that hold a NaN or an infinity.

    Reads the values on the host (a device synchronisation): for error paths only.
    """
    return torch.nonzero(~torch.isfinite(m).flatten(1).all(dim=1)).flatten().tolist()


def finite_on_cpu(m: torch.Tensor) -> bool:
    """False when ``m`` is on the CPU and holds a NaN or an infinity; True otherwise.

    Reads the values only where that costs no device synchronisation: a tensor on another
    device (or one being traced by torch.compile) is not read, and counts as finite.
    """
    if m.device.type != "cpu" or torch.compiler.is_compiling():
        return True
    return bool(torch.isfinite(m).all())


def decomposition_error(op: str, what: str, names: Sequence[str], finite: bool, loc: Any) -> SoapArgumentError:
    """The error for a failed ``eigh`` of the preconditioner factor of parameters ``names``.

    ``what`` is what the decomposition was for ("the eigenbasis"); ``finite`` says whether the
    factor held only finite values (then the solver itself failed).
    """
    one = len(names) == 1
    params = ("parameter " if one else "parameters ") + ", ".join(f"'{n}'" for n in names)
    factor = "its preconditioner factor" if one else "their preconditioner factors"
    if finite:
        return SoapArgumentError(
            f"'{op}' cannot compute {what} of {params}: torch.linalg.eigh did not converge on {factor},"
            " even in float64",
            loc,
        )
    return SoapArgumentError(
        f"'{op}' cannot compute {what} of {params}: {factor} {'holds' if one else 'hold'} non-finite"
        " values (NaN or inf) because the gradients were not finite (or so large that their squares"
        " overflow)",
        loc,
        notes=[
            "skip the steps whose gradients are not finite (torch.amp.GradScaler does this) and clip"
            " gradients (torch.nn.utils.clip_grad_norm_)",
            "the preconditioner factors are optimizer state: load the state from a checkpoint (or"
            " build a new optimizer) before stepping again",
        ],
    )


def refresh_basis(gg: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SOAP's basis refresh: sort the old basis by estimated eigenvalue, then one power step + QR.

    Returns the new basis and the per-matrix order ``idx`` ([B, d]) applied to its columns.

    One matmul: ``P = GG Q`` gives both the estimates ``diag(Q^T GG Q)`` (as the column sums
    of ``Q * P``) and the power step of the sorted basis (``GG Q[:, idx] = P[:, idx]``), where
    the reference spends three.

    On a CPU a factor holding NaN or inf raises ``torch.linalg.LinAlgError`` (the ops turn it
    into a located error) where QR would pass the NaN on into every later basis: reading the
    values there costs no device synchronisation. On a GPU nothing is read (see docs/recipes.md).
    """
    if not finite_on_cpu(gg):
        raise torch.linalg.LinAlgError("the preconditioner factor holds non-finite values")
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
    """SOAP's merge_dims (ALGORITHMS.md 2.3): merge consecutive dims while their product stays <= ``max_dim``."""
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


def merge_small_dims(shape: tuple[int, ...], max_dim: int) -> tuple[int, ...]:
    """DistributedShampoo's use_merge_dims: from the first dim on, the next dim joins the last
    merged one when either is 1 or their product is <= ``max_dim``. Unlike :func:`merge_shape`,
    a dim of size 1 always merges (``[700, 1, 30]`` is ``[700, 30]``)."""
    if len(shape) < 2:
        return shape
    out = [shape[0]]
    for d in shape[1:]:
        if out[-1] == 1 or d == 1 or out[-1] * d <= max_dim:
            out[-1] *= d
        else:
            out.append(d)
    return tuple(out)

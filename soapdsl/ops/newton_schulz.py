"""newton_schulz: orthogonalize the update (Muon's zeroth-power iteration)."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator

from soapdsl.ops._linalg import as_matrices, gram_pays, newton_schulz
from soapdsl.registry import Float, Int, Op, OpArgs, register
from soapdsl.runtime.context import Ctx, Val


class NewtonSchulzArgs(OpArgs):
    steps: Int = Field(5, ge=0, lt=100)
    coeffs: tuple[Float, Float, Float] = (3.4445, -4.7750, 2.0315)
    cleanup: Int = Field(0, ge=0, lt=100)
    eps: Float = Field(1e-7, ge=0.0)
    eps_mode: Literal["add", "clamp"] = "add"
    norm: Literal["fro", "spectral"] = "fro"
    power_iters: Int = Field(10, ge=1, le=1000)
    dtype: Literal["auto", "fp32", "bf16", "fp64"] = "auto"
    form: Literal["standard", "gram"] = "standard"
    restart: Int = Field(3, ge=1, lt=100)

    @field_validator("form")
    @classmethod
    def _gram_precision(cls, v: Any, info: ValidationInfo) -> Any:
        if v == "gram" and info.data.get("dtype") == "bf16":
            raise ValueError(
                "the Gram form needs dtype fp32, fp64 or auto: in bf16 its Gram matrix loses the small"
                " eigenvalues and the iteration can turn to NaN"
            )
        return v


@register
class NewtonSchulz(Op):
    """Newton-Schulz orthogonalization: map each matrix towards U V^T of its SVD.

    Works on the last two dimensions; a parameter of more dimensions (a conv kernel
    [out, in, kh, kw]) is flattened to [out, in*kh*kw] and back, as Muon does. All
    parameters of one shape in the route run as one batched iteration.

    Math:
        X = x / (||x||_F + eps)                (eps_mode=clamp: x / max(||x||_F, eps);
                                                norm=spectral: the top singular value instead)
        transpose when rows > cols
        steps times:   A = X X^T;  X <- a X + (b A + c A A) X      (a, b, c) = coeffs
        cleanup times: X <- 1.5 X - 0.5 (X X^T) X                  (pulls singular values to 1)
        out = X (transposed back)

        form=gram: the same polynomials on the r x r Gram matrix (r = the short side):
            R = X X^T,  Q = I;  per iteration  P = a I + b R + c R R,  Q <- P Q,  R <- P R P;
            every `restart` iterations and at the end:  X <- Q X,  R = X X^T,  Q = I
        Equal to the standard form in exact arithmetic (about 1e-15 apart in fp64). Used per
        shape only where it counts fewer matmul flops: for 5 steps, where the long side is over
        1.5x the short one; never on square matrices.

        On a CPU (fp32/fp64, eager, r even and >= 256) the standard form computes the symmetric
        X X^T and A A from the row halves X1, X2 of X: their blocks 11, 12 and 22 only (3/4 of
        the flops), then X1 <- a X1 + M11 X1 + M12 X2, X2 <- a X2 + M12^T X1 + M22 X2. The same
        iteration, rounded in another order: 0.86-0.93x the plain form's time on 2 CPU cores
        (benchmarks/RESULTS.md, bench_newton_schulz).

        On a CPU (fp32, eager, r >= 128), where it costs less than iterating (many steps on a
        rectangular matrix: SOAP-Muon's 10 + 2 on 256 x 512 and wider, not Muon's 5), the
        standard form evaluates the same polynomial on the eigenvalues of A0 = X X^T, in float64:
            A0 = V diag(s) V^T;  h = 1;  per (a, b, c):  p = a + b s + c s^2,  h <- h p,  s <- s p^2
            out = V diag(h) V^T X
        Equal to the iteration in exact arithmetic, its cost does not grow with the steps (one
        r x r eigh and three float64 products: 0.48-0.56x the halved iteration's time on
        256 x 1024), and against a float64 iteration its error is 0.16-0.72x the fp32
        iteration's. A batch with a non-finite entry iterates.

    Args:
        steps: quintic steps (Muon: 5; SOAP-Muon: 10), below 100.
        coeffs: the quintic coefficients (a, b, c).
        cleanup: cubic steps after the quintic ones (SOAP-Muon: 2).
        eps: guards the normalisation; with 0 a zero matrix still gives zero.
        eps_mode: "add" (Keller Jordan's Muon, SOAP-Muon) or "clamp" (torch.optim.Muon).
        norm: "fro" divides by the Frobenius norm; "spectral" by the top singular value from
            power iteration, so "fewer steps" means the same thing at every shape (the SOAP-Muon
            report's footnote 6); the largest singular value then starts at 1.
        power_iters: power-iteration steps for norm=spectral.
        dtype: the iteration's dtype: "auto" (the update's own: fp32, or fp64 for float64
            parameters), "fp32", "bf16" (what the references use on GPU; on CPU bf16 matmul is
            about 60x slower than fp32) or "fp64".
        form: "standard" (the polynomial Muon and SOAP-Muon run, iterated, by halves or
            spectrally as above, whichever the CPU does fastest) or "gram" (Gram Newton-Schulz: fewer
            flops on rectangular matrices, rounding of its own; it iterates in at least fp32,
            because in bf16 the Gram matrix can turn to NaN).
        restart: form=gram: rebuild X and its Gram matrix every `restart` iterations (>= 1).
            Without restarts the fp32 error on low-rank and ill-conditioned inputs was 5-90x
            the standard form's after 5 iterations, and NaN after 12; at 3 it stays at the
            standard form's level (0.6-1.6x).

    Example:
        momentum(0.95, nesterov=true) |> newton_schulz(5, dtype=bf16) |> lr

    References:
        Jordan et al., "Muon" (2024); Vyas et al., "Improving SOAP using iterative whitening
        and Muon" (2025), section 3.5; Gram Newton-Schulz with restarts: "Gram Newton-Schulz: A Fast,
        Hardware-Aware Newton-Schulz Algorithm for Muon" (Tri Dao's blog, 2026).
    """

    name = "newton_schulz"
    Args = NewtonSchulzArgs
    kind = "matrix"
    scale_invariant = False

    def notes(self, shape: tuple[int, ...]) -> list[str]:
        a: NewtonSchulzArgs = self.args  # type: ignore[assignment]
        if a.form != "gram" or len(shape) < 2:
            return []
        r, c = sorted((shape[0], math.prod(shape[1:])))
        if gram_pays(r, c, a.steps, a.cleanup, a.restart):
            return [f"newton_schulz: Gram form on {r} x {c}"]
        return [f"newton_schulz: standard form (the Gram form counts more flops on {r} x {c})"]

    def apply(self, ctx: Ctx, x: Val) -> Val:
        a: NewtonSchulzArgs = self.args  # type: ignore[assignment]
        args = (a.steps, a.coeffs, a.cleanup, a.eps, a.eps_mode, a.dtype, a.norm, a.power_iters, a.form, a.restart)
        items = []
        graphs = ctx.graphs
        for i, t in enumerate(x.ts):
            mats = as_matrices(t)
            rows, cols = mats.shape[1:]  # not sorted(): torch.compile cannot sort a route's symbolic sizes
            r, c = min(rows, cols), max(rows, cols)
            like = [(tuple(mats.shape[1:]), mats.dtype)]

            def part(m: torch.Tensor, mats: torch.Tensor = mats, i: int = i) -> tuple[torch.Tensor]:
                # split across ranks, each rank gets copies of its matrices; otherwise (one
                # process, or a lone matrix every rank computes) the batch itself, whose memory
                # is reused only if it is a temporary of ours, not the state or gradient handed on
                spare = m if x.owned or m is not mats else None

                def eager() -> torch.Tensor:
                    return newton_schulz(m, *args, scratch=spare)

                if graphs is None:
                    return (eager(),)
                # a CUDA graph's input is its own copy of m, free to overwrite
                return (graphs.run((self.path, i), lambda inp: newton_schulz(inp, *args, scratch=inp), m, eager),)

            items.append((part, [mats], like, float(r * r * c)))
        out = [res.view(t.shape) for (res,), t in zip(ctx.per_matrix_many(items), x.ts, strict=True)]
        return Val(out, owned=True)

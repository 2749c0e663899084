"""shampoo: Shampoo's inverse-root Kronecker preconditioner."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from soapdsl.ops import _linalg as la
from soapdsl.registry import Float, Hyper, Int, Op, OpArgs, StateSpec, register
from soapdsl.runtime.context import Ctx, Val


class ShampooArgs(OpArgs):
    beta: Hyper = Field(0.95, ge=0.0, le=1.0)
    eps: Hyper = Field(1e-12, ge=0.0)
    freq: Int = Field(10, ge=1)
    exponent: Literal["classic", "power_half"] | Float = "classic"
    max_dim: Int = Field(8192, ge=0)
    start: Int = Field(-1, ge=-1)
    bias_correction: bool = True
    merge_dims: bool = False

    @field_validator("exponent")
    @classmethod
    def _power(cls, v: Any) -> Any:
        if isinstance(v, float) and not 0.0 < v <= 1.0:
            root = f"; an inverse {v:g}th root is exponent={1 / v:.4g}" if v > 1 else ""
            raise ValueError(f"must be in (0, 1]: it is the power of each factor's inverse itself{root}")
        return v


@register
class Shampoo(Op):
    """Shampoo: multiply the update by inverse roots of the gradient's Kronecker factors.

    The factors take the current raw gradient before they are used (unlike SOAP's basis).
    Before step `start` the stage passes the update through and tells a following `graft` to
    use its reference direction as it is (DistributedShampoo runs the grafted optimizer alone
    until then). The first inverse root is computed at step `start` itself, then at every
    multiple of `freq` after it, DistributedShampoo's schedule: with freq=3, start=4 the roots
    are computed at steps 4, 6, 9, 12, ...; with the default start (= freq) at freq, 2 freq, ...

    Math:
        per factored dim k:  F_k <- beta F_k + (1 - beta) G_(k) G_(k)^T   (beta = 1: F_k += G_(k) G_(k)^T)
        at t == start, and at t % freq == 0 for t > start (t counts this parameter's steps from 1):
            P_k = (F_k / (1 - beta^t) + eps I)^(-e)      via eigh, fp64 retry on failure
                  (bias_correction=false, or beta = 1: F_k itself)
        out = x x_1 P_1 x_2 P_2 ...       (P_L X P_R for a matrix)
        e: "classic" 1/(2 * ndim) (1/4 per side of a matrix; ndim after merge_dims), "power_half" 1/2,
           or a number.

    Args:
        beta: factor EMA decay; 1 accumulates (AdaGrad-style sums).
        eps: added to the factors' eigenvalues before the root.
        freq: steps between inverse-root computations.
        exponent: "classic", "power_half", or the per-factor exponent e itself, in (0, 1]
            (0.25 is an inverse 4th root, which DistributedShampoo's override writes as 4).
        max_dim: a dim larger than this gets no factor (identity; DistributedShampoo would
            block the dim instead).
        start: first step with a preconditioner; -1 means `freq` (0 acts as `freq` too: steps
            count from 1).
        bias_correction: divide the factors by 1 - beta^t before the root, as DistributedShampoo
            does with use_bias_correction=True (its default). Only eps sees it: a following
            graft(norm) rescales the result anyway.
        merge_dims: first merge the parameter's dims as DistributedShampoo's use_merge_dims
            (its default) does: a dim joins the one before it while their product is <= max_dim,
            and a dim of size 1 always joins its neighbour (a 64 x 64 matrix is one dim of 4096,
            with one 4096 x 4096 factor and the exponent of a vector).

    State:
        F{k}: the factor of dim k; P{k}: its inverse root; ready (host): a root exists.

    Example:
        momentum(0.9) |> bias_correct(0.9) |> shampoo(0.95, 1e-12) |> graft(norm, from={ rms_normalize(0.95) })

    References:
        Gupta, Koren & Singer, "Shampoo: Preconditioned Stochastic Tensor Optimization" (2018);
        Vyas et al., "SOAP" (2024), section 5; Shi et al., DistributedShampoo (2023).
    """

    name = "shampoo"
    Args = ShampooArgs
    kind = "batched"
    linear = True

    def merged(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape the factors are taken of: ``shape``, or with merge_dims its dims merged."""
        a: ShampooArgs = self.args  # type: ignore[assignment]
        return la.merge_small_dims(shape, a.max_dim) if a.merge_dims else shape

    def factored(self, shape: tuple[int, ...]) -> list[int]:
        """Dims of :meth:`merged` that get a factor."""
        return [k for k, d in enumerate(self.merged(shape)) if d <= self.args.max_dim]  # type: ignore[attr-defined]

    def state(self, shape: tuple[int, ...]) -> dict[str, StateSpec]:
        out = {}
        merged = self.merged(shape)
        for k in self.factored(shape):
            out[f"F{k}"] = StateSpec((merged[k], merged[k]), basis="none")
            out[f"P{k}"] = StateSpec((merged[k], merged[k]), basis="none")
        return out

    def notes(self, shape: tuple[int, ...]) -> list[str]:
        merged = self.merged(shape)
        return [f"dims merged to {list(merged)}"] if merged != shape else []

    def host_state(self, shape: tuple[int, ...]) -> dict[str, Any]:
        return {"ready": False}

    def exponent(self, shape: tuple[int, ...]) -> float:
        e = self.args.exponent  # type: ignore[attr-defined]
        if e == "classic":
            return 1.0 / (2 * max(1, len(self.merged(shape))))
        if e == "power_half":
            return 0.5
        return float(e)

    def apply(self, ctx: Ctx, x: Val) -> Val:
        a: ShampooArgs = self.args  # type: ignore[assignment]
        beta = self.hp("beta", ctx.group)
        eps = self.hp("eps", ctx.group)
        start = a.freq if a.start < 0 else a.start
        st = ctx.state(self)
        # DistributedShampoo: (t % f == 0 and t > start) or t == start; "before start: P = A"
        refresh = ctx.t == start or (ctx.t % a.freq == 0 and ctx.t > start)
        # DistributedShampoo's bias correction of the factors (none for sums: beta = 1)
        unbias = 1.0 - beta**ctx.t if a.bias_correction and beta != 1.0 else 1.0
        for j, (b, g) in enumerate(zip(ctx.buckets, ctx.g, strict=True)):
            g = g.reshape(g.size(0), *self.merged(b.shape))
            for k in self.factored(b.shape):
                f = st[f"F{k}"][j]
                stats = la.factor_stats(g.to(f.dtype), k)
                if beta == 1.0:
                    f.add_(stats)
                else:
                    f.lerp_(stats, 1.0 - beta)
                if refresh:
                    try:
                        e, d = self.exponent(b.shape), f.size(-1)
                        src = f if unbias == 1.0 else f / unbias
                        (root,) = ctx.per_matrix(
                            lambda m, e=e: (la.inverse_root(m, e, eps),), [src], [((d, d), f.dtype)], float(d) ** 3
                        )
                    except torch.linalg.LinAlgError:
                        # only now, after a failure, are the factors read on the host
                        bad = la.nonfinite(f)
                        names = [n for i, n in enumerate(b.names) if not bad or i in bad]
                        loc = getattr(self, "loc", None)
                        raise la.decomposition_error(self.name, "the inverse root", names, not bad, loc) from None
                    st[f"P{k}"][j].copy_(root)
        if refresh:
            ctx.set_host(self, "ready", True)
        if not ctx.get_host(self, "ready"):
            ctx.scratch["unready"] = True
            return x
        out = []
        for j, (b, t) in enumerate(zip(ctx.buckets, x.ts, strict=True)):
            qs = {k: st[f"P{k}"][j] for k in self.factored(b.shape)}
            merged = t.reshape(t.size(0), *self.merged(b.shape))
            out.append(la.unrotate(merged, qs).reshape(t.shape) if qs else t.clone())  # P symmetric: x_k P_k
        return Val(out, owned=True)

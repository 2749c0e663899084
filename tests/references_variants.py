"""Independent reference optimizers for the SOAP variants, written only from ALGORITHMS.md (sections 2, 3 and 6)
and the precise definitions given with them (repeated in each class docstring). No code is shared with ``soapdsl``.

Like tests/references.py these are plain per-parameter loops, dtype-generic (float32 / float64): the Kronecker factors
``GG``, the bases ``Q`` and the refresh run in ``at_least_fp32(param.dtype)``. They reuse that file's helpers
(``rotate``, ``unrotate``, ``_SoapBase`` bookkeeping, ``_qr_refresh``, ...), which were written independently too.

"SOAP conventions" (ALGORITHMS 2.4): the first step of each param only initialises the factors and the basis (no
update, no moment update, the step counter stays 0); eps is added to the raw sqrt(v); the bias correction is folded
into the step size; weight decay runs after the update with the raw lr and only when > 0; the basis refresh runs at
t % f == 0 after the update, permuting exp_avg_sq, with Q <- qr(GG Q_sorted).Q.

Classes:
- AdEMAMixRef            AdEMAMix (section 6), with the alpha and beta3 warmup schedulers.
- SoapAdEMAMixRef        AdEMAMix inside the SOAP eigenbasis, both EMAs rotated (section 6, "SOAP + AdEMAMix").
- PSoapRef               pSOAP, soap_p.py (3.11): Mr / d^p rescaled to ||Mr / d||_F.
- SoapSoapRef            SOAP-SOAP, iterative whitening (3.7, soapsoap.py).
- SharedSoapMuonRef      SOAP-Muon with one factor / basis shared by a group of equal-shape params (3.12).
- SoapScheduleRef        SOAP v1 with a piecewise-constant refresh-frequency schedule.
- CautiousAdamRef        torch-AdamW-style Adam with the "cautious" mask (Liang et al. 2025).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from tests.references import (
    SoapMuonRef,
    SoapV1Ref,
    _eigh_desc_plain,
    _newton_schulz_soap_muon,
    _SoapBase,
    at_least_fp32,
    frob,
    rotate,
    unrotate,
)

# --------------------------------------------------------------------------------------------------------------
# AdEMAMix schedulers (section 6)
# --------------------------------------------------------------------------------------------------------------


def ademamix_alpha(t: int, alpha: float, warmup: int) -> float:
    """alpha(t) = min(t * alpha / T_alpha, alpha) when T_alpha > 0, else alpha."""
    if warmup and warmup > 0:
        return min(t * alpha / warmup, alpha)
    return alpha


def ademamix_beta3(t: int, b1: float, b3: float, warmup: int) -> float:
    """b3(t) = min(exp(ln b1 ln b3 / ((1 - t/T) ln b3 + (t/T) ln b1)), b3) when T > 0, else b3.

    It starts at b1 (t = 0) and reaches b3 at t = T (the half-life ln 0.5 / ln b is interpolated linearly)."""
    if not (warmup and warmup > 0):
        return b3
    lb1, lb3 = math.log(b1), math.log(b3)
    s = t / warmup
    return min(math.exp(lb1 * lb3 / ((1 - s) * lb3 + s * lb1)), b3)


# --------------------------------------------------------------------------------------------------------------
# 1. AdEMAMix
# --------------------------------------------------------------------------------------------------------------


class AdEMAMixRef(torch.optim.Optimizer):
    """AdEMAMix (section 6). Per param, t = 1, 2, ... (no first-step skip):

    m1 = b1 m1 + (1-b1) g;  m2 = b3(t) m2 + (1-b3(t)) g (not bias-corrected);  nu = b2 nu + (1-b2) g^2;
    update = (m1 / (1-b1^t) + alpha(t) m2) / (sqrt(nu / (1-b2^t)) + eps);
    p -= lr (update + wd p), with the p from before the step (AdamW's decoupled decay, scaled by lr).
    alpha_warmup / beta3_warmup = 0 (or None) switch the schedulers off.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        alpha: float = 5.0,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        alpha_warmup: int = 0,
        beta3_warmup: int = 0,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            alpha=alpha,
            eps=eps,
            weight_decay=weight_decay,
            alpha_warmup=alpha_warmup,
            beta3_warmup=beta3_warmup,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2, b3 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(g)
                    state["exp_avg_slow"] = torch.zeros_like(g)
                    state["exp_avg_sq"] = torch.zeros_like(g)
                state["step"] += 1
                t = state["step"]
                alpha_t = ademamix_alpha(t, group["alpha"], group["alpha_warmup"])
                b3_t = ademamix_beta3(t, b1, b3, group["beta3_warmup"])
                m1, m2, nu = state["exp_avg"], state["exp_avg_slow"], state["exp_avg_sq"]
                m1.mul_(b1).add_(g, alpha=1 - b1)
                m2.mul_(b3_t).add_(g, alpha=1 - b3_t)
                nu.mul_(b2).add_(g.square(), alpha=1 - b2)
                num = m1 / (1 - b1**t) + alpha_t * m2
                denom = (nu / (1 - b2**t)).sqrt().add(group["eps"])
                update = num / denom
                p.add_(update + group["weight_decay"] * p, alpha=-group["lr"])
        return loss


# --------------------------------------------------------------------------------------------------------------
# 2. SOAP + AdEMAMix
# --------------------------------------------------------------------------------------------------------------


class SoapAdEMAMixRef(_SoapBase):
    """AdEMAMix in the SOAP eigenbasis, both EMAs kept rotated (like SOAP v2's exp_avg), SOAP conventions.

    Factors: one per dim of size <= max_precond_dim (so two-sided for matrices); 1-D (and 0-d) params get no factor
    (identity, i.e. AdEMAMix with SOAP conventions). shampoo_beta = betas[1] (= b2). Per param after the first-step
    skip, with t = 1, 2, ...:
      Gr = rotate(G, Q); m1 = b1 m1 + (1-b1) Gr; m2 = b3(t) m2 + (1-b3(t)) Gr; v = b2 v + (1-b2) Gr^2;
      U = unrotate((m1 / (1-b1^t) + alpha(t) m2) / (sqrt(v) + eps), Q);
      p -= lr sqrt(1-b2^t) U;  p -= lr wd p (if wd > 0);
      GG update with the raw G; if t % f == 0: m1, m2 unrotated with Q_old, refresh (permutes v), m1, m2 rotated
      with Q_new.

    Interpretation choices:
    - The re-rotation of m1 / m2 runs only when the basis is refreshed (between refreshes Q is unchanged, so the
      unrotate / rotate pair that SOAP v2 runs every step is the identity up to rounding).
    - nD params (ndim > 2) get one factor per dim (SOAP without merge_dims); there is no merge_dims option.
    """

    def __init__(
        self,
        params,
        lr: float = 3e-3,
        betas: tuple[float, float, float] = (0.95, 0.95, 0.999),
        alpha: float = 5.0,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        alpha_warmup: int = 0,
        beta3_warmup: int = 0,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            alpha=alpha,
            eps=eps,
            weight_decay=weight_decay,
            precondition_frequency=precondition_frequency,
            max_precond_dim=max_precond_dim,
            alpha_warmup=alpha_warmup,
            beta3_warmup=beta3_warmup,
            # fixed _SoapBase settings (betas[1] is b2, so shampoo_beta -1 resolves to b2)
            shampoo_beta=-1,
            merge_dims=False,
            precondition_1d=False,
            normalize_grads=False,
            correct_bias=True,
        )
        torch.optim.Optimizer.__init__(self, params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2, b3 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                first = self._first_seen(p, group)
                state = self.state[p]
                if "exp_avg_slow" not in state:
                    state["exp_avg_slow"] = torch.zeros_like(p.grad)
                if first:
                    continue
                g = p.grad
                gr = self._rot(g, state)
                state["step"] += 1
                t = state["step"]
                alpha_t = ademamix_alpha(t, group["alpha"], group["alpha_warmup"])
                b3_t = ademamix_beta3(t, b1, b3, group["beta3_warmup"])
                m1, m2, v = state["exp_avg"], state["exp_avg_slow"], state["exp_avg_sq"]
                m1.mul_(b1).add_(gr, alpha=1 - b1)
                m2.mul_(b3_t).add_(gr, alpha=1 - b3_t)
                v.mul_(b2).add_(gr.square(), alpha=1 - b2)
                num = m1 / (1 - b1**t) + alpha_t * m2
                denom = v.sqrt().add(group["eps"])
                u = self._unrot(num / denom, state)
                ss = group["lr"] * math.sqrt(1 - b2**t)
                self._apply(p, u, ss, group)
                # maintenance, after the update
                self._update_gg(g, state)
                if t % state["precondition_frequency"] == 0:
                    m1_orig = self._unrot(state["exp_avg"], state)  # Q_old
                    m2_orig = self._unrot(state["exp_avg_slow"], state)
                    self._refresh(state)  # permutes exp_avg_sq, replaces Q
                    state["exp_avg"] = self._rot(m1_orig, state)  # Q_new
                    state["exp_avg_slow"] = self._rot(m2_orig, state)
        return loss


# --------------------------------------------------------------------------------------------------------------
# 3. pSOAP (soap_p.py)
# --------------------------------------------------------------------------------------------------------------


class PSoapRef(SoapV1Ref):
    """pSOAP (3.11, soap_p.py): SOAP v1 where, for params with ndim > 1 and max(shape) < max_precond_dim, the rotated
    direction Mr / d (d = sqrt(v) + eps) is replaced by N = Mr / d^power rescaled to ||Mr / d||_F:
    N = N ||Mr/d||_F / ||N||_F (for power == 1 the rescale is skipped, so this is exactly SOAP v1). Other params:
    plain SOAP v1. Then unrotate, optional normalize_grads, SOAP step size and weight decay.

    Interpretation choice: the size guard uses the param's own shape (not the merged view) and max_precond_dim in
    place of soap_p.py's literal 10000 (equal at the default), with the spec's strict bound: ALGORITHMS.md 3.11,
    "for ndim > 1 and max(shape) < 10000". So a param with a dim equal to max_precond_dim gets plain SOAP v1,
    although that dim still gets a factor (whose bound is ``<=``, 2.3).
    """

    def __init__(
        self,
        params,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float = -1,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        normalize_grads: bool = False,
        correct_bias: bool = True,
        power: float = 1.0,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            shampoo_beta=shampoo_beta,
            eps=eps,
            weight_decay=weight_decay,
            precondition_frequency=precondition_frequency,
            max_precond_dim=max_precond_dim,
            merge_dims=merge_dims,
            precondition_1d=precondition_1d,
            normalize_grads=normalize_grads,
            correct_bias=correct_bias,
            power=power,
        )
        torch.optim.Optimizer.__init__(self, params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            power = group["power"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if self._first_seen(p, group):
                    continue
                state = self.state[p]
                g = p.grad
                gr = self._rot(g, state)
                state["step"] += 1
                t = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(b1).add_(g, alpha=1 - b1)
                exp_avg_sq.mul_(b2).add_(gr.square(), alpha=1 - b2)
                denom = exp_avg_sq.sqrt().add(group["eps"])
                mr = self._rot(exp_avg, state)
                ss = self._step_size(group, t)
                direction = mr / denom
                # ALGORITHMS.md 3.11: the power applies "for ndim > 1 and max(shape) < 10000" (strict)
                if p.ndim > 1 and max(p.shape) < group["max_precond_dim"] and power != 1:
                    n = mr / denom.pow(power)
                    direction = n * frob(direction) / frob(n)
                u = self._unrot(direction, state)
                self._apply(p, u, ss, group)
                self._update_gg(g, state)
                if t % state["precondition_frequency"] == 0:
                    self._refresh(state)
        return loss


# --------------------------------------------------------------------------------------------------------------
# 4. SOAP-SOAP (iterative whitening, soapsoap.py)
# --------------------------------------------------------------------------------------------------------------


class SoapSoapRef(torch.optim.Optimizer):
    """SOAP-SOAP, iterative whitening: soapsoap.py (class SOAPSOAP2) as the report's runs used it, with
    projection_type "std" (configs/sweeps/soapsoap.yaml). ALGORITHMS.md 3.7 gives the idea; the facts below were
    read off that file.

    Sides, per param G of shape m x n (resolved at every step, always the same):
      1-D -> "identity";  m > n -> "right" first;  m < n -> "left" first;  m == n -> "right" first.
      Then, for 2-D: m > max_precond_dim -> "only_right"; n > max_precond_dim -> "only_left"; both -> "identity".
      Basis 1 is the first side (R: n x n, EMA of G^T G; L: m x m, EMA of G G^T); for "left"/"right" basis 2 is the
      other side, fed with G1 (below) instead of G; "only_*" have basis 1 only, "identity" none.
    project1(X) = Q_L^T X (left first) or X Q_R (right first); project2 the other side (identity for only_* and
    identity); back(X) = Q_L X Q_R^T with the missing sides the identity. (The file stores Q_R as rows, B = Q_R^T.)

    First call of a param: every factor the param has is started from the RAW gradient (basis 2 too:
    GG2 = lerp(0, G^T G or G G^T, 1-beta)), each basis = eigh of its factor in float64, columns flipped to
    descending, cast back (no jitter); no update, no moment update, t stays 0.
    Later calls:
      Gp1 = project1(G); t += 1; m = b1 m + (1-b1) G (original space);
      v1 = b2 v1 + (1-b2) Gp1^2;  d1 = sqrt(v1) + eps;  G1 = Gp1 / d1;  X1 = project1(m) / d1;
      G2 = project2(G1);  v2 = b2 v2 + (1-b2) G2^2;  d2 = sqrt(v2) + eps;  U = back(project2(X1) / d2);
      (only_* and identity divide twice: U = back(X1 / d2), v2 the EMA of G1^2.)
      p -= lr sqrt(1-b2^t)/(1-b1^t) U;  if wd > 0: p -= lr wd p.
      maintenance: basis-1 factor updated with G; if t % f == 0, basis 1 refreshed: est = diag(Q^T GG Q),
      idx = argsort(est, descending), Q = qr(GG Q[:, idx]).Q, and v2 -- not v1 -- permuted by idx along
      basis 1's dim (the file permutes exp_avg_sq[num] with num=1, and v1 is exp_avg_sq[0]).
      Then (left/right only) basis-2 factor updated with G1; if t % f == f // 2, basis 2 refreshed the same way,
      permuting exp_avg_sq[2], a buffer nothing reads: v2 keeps its order.
    beta = shampoo_beta, or betas[1] when shampoo_beta < 0. Exact ties of est are broken by index (stable sort).

    ``permute_all=True`` (not the file's): every second moment a refresh reorders is permuted, v1 and v2 along
    basis 1's dim by basis 1's refresh, v2 along basis 2's dim by basis 2's.
    """

    def __init__(
        self,
        params,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float = -1,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        permute_all: bool = False,
    ) -> None:
        self.permute_all = permute_all
        defaults = dict(
            lr=lr,
            betas=betas,
            shampoo_beta=shampoo_beta,
            eps=eps,
            weight_decay=weight_decay,
            precondition_frequency=precondition_frequency,
            max_precond_dim=max_precond_dim,
        )
        super().__init__(params, defaults)

    @staticmethod
    def sides(shape: tuple[int, ...], max_dim: int) -> tuple[str | None, str | None]:
        """(first side, second side), each "L", "R" or None."""
        if len(shape) != 2:
            return None, None
        m, n = shape
        first, second = ("L", "R") if m < n else ("R", "L")
        size = {"L": m, "R": n}
        if size[first] > max_dim:
            return None, None
        if size[second] > max_dim:
            return first, None
        return first, second

    @staticmethod
    def _stats(x: torch.Tensor, side: str) -> torch.Tensor:
        return x @ x.T if side == "L" else x.T @ x

    @staticmethod
    def _project(x: torch.Tensor, q: torch.Tensor | None, side: str | None) -> torch.Tensor:
        if side is None or q is None:
            return x
        return q.T @ x if side == "L" else x @ q

    @staticmethod
    def _back(x: torch.Tensor, q: torch.Tensor | None, side: str | None) -> torch.Tensor:
        if side is None or q is None:
            return x
        return q @ x if side == "L" else x @ q.T

    @staticmethod
    def _eigh(gg: torch.Tensor) -> torch.Tensor:
        _, q = torch.linalg.eigh(gg.to(torch.float64))
        return torch.flip(q, [1]).to(gg.dtype)

    def _step_param(self, p: torch.Tensor, group: dict) -> None:
        b1, b2 = group["betas"]
        g = p.grad
        state = self.state[p]
        fdtype = at_least_fp32(p.dtype)
        first, second = self.sides(tuple(p.shape), group["max_precond_dim"])
        if len(state) == 0:
            sb = group["shampoo_beta"]
            state.update(step=0, exp_avg=torch.zeros_like(g), v1=torch.zeros_like(g), v2=torch.zeros_like(g))
            state["beta"] = sb if sb >= 0 else b2
            for which, side in (("1", first), ("2", second)):
                if side is not None:
                    d = p.shape[0] if side == "L" else p.shape[1]
                    state["GG" + which] = torch.zeros(d, d, dtype=fdtype, device=p.device)
                    state["Q" + which] = None
        beta = state["beta"]
        f = group["precondition_frequency"]
        if "started" not in state:
            gf = g.to(fdtype)
            for which, side in (("1", first), ("2", second)):
                if side is not None:
                    state["GG" + which].lerp_(self._stats(gf, side), 1 - beta)
                    state["Q" + which] = self._eigh(state["GG" + which])
            state["started"] = True
            return  # first call: no update

        q1, q2 = state.get("Q1"), state.get("Q2")
        gp1 = self._project(g, q1, first)
        state["step"] += 1
        t = state["step"]
        m, v1, v2 = state["exp_avg"], state["v1"], state["v2"]
        m.mul_(b1).add_(g, alpha=1 - b1)
        v1.mul_(b2).add_(gp1.square(), alpha=1 - b2)
        d1 = v1.sqrt().add(group["eps"])
        g1 = gp1 / d1
        x1 = self._project(m, q1, first) / d1
        g2 = self._project(g1, q2, second)
        v2.mul_(b2).add_(g2.square(), alpha=1 - b2)
        d2 = v2.sqrt().add(group["eps"])
        u = self._back(self._back(self._project(x1, q2, second) / d2, q2, second), q1, first)
        ss = group["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t)
        p.add_(u, alpha=-ss)
        if group["weight_decay"] > 0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])

        # maintenance, after the update: basis 1 from G, then basis 2 from G1
        for which, side, src, due in (("1", first, g, t % f == 0), ("2", second, g1, t % f == f // 2)):
            if side is None:
                continue
            gg, q = state["GG" + which], state["Q" + which]
            gg.lerp_(self._stats(src.to(fdtype), side), 1 - beta)
            if not due:
                continue
            est = torch.diag(q.T @ gg @ q)
            idx = torch.argsort(est, descending=True, stable=True)
            dim = 0 if side == "L" else 1
            if which == "1" or self.permute_all:
                state["v2"] = state["v2"].index_select(dim, idx)
            if which == "1" and self.permute_all:
                state["v1"] = state["v1"].index_select(dim, idx)
            state["Q" + which], _ = torch.linalg.qr(gg @ q[:, idx])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._step_param(p, group)
        return loss


# --------------------------------------------------------------------------------------------------------------
# 5. SOAP-Muon with shared bases (3.12)
# --------------------------------------------------------------------------------------------------------------


class SharedSoapMuonRef(SoapMuonRef):
    """SOAP-Muon (projection "std", see SoapMuonRef) where each group of equal-shape params shares ONE factor GG and
    ONE basis Q (3.12, "shared bases"); each member keeps its own exp_avg and exp_avg_sq and otherwise gets the full
    SOAP-Muon update.

    ``groups`` is a list of lists of params; params not listed form their own (singleton) group.
      GG_group = b GG_group + (1-b) SUM_members (G G^T on the left, or G^T G on the right; the smaller side);
      first step (all members together): GG_group from the summed first-step statistics, Q = eigh_desc(GG_group)
      (plain eigh, as SoapMuonRef), no update;
      later steps: every member gets SoapMuonRef's update with the shared Q; then GG_group is updated with the sum
      of the raw-G statistics of all members, and at t % f == 0 the shared basis is refreshed: est = diag(Q^T GG Q),
      idx = argsort(est, descending, stable), EVERY member's exp_avg_sq is permuted by idx (rows for left, columns
      for right), Q = qr(GG Q[:, idx]).Q.

    Interpretation choices:
    - All members of a group must get a grad on the same steps (ValueError otherwise); the group's step counter t is
      shared.
    - The shared statistics use the hyperparameters (shampoo_beta / betas[1], precondition_frequency) of the torch
      param group of the group's first member; each member's own update uses its own param group.
    - The sum over members is accumulated in member order, starting from the first member's product (so a singleton
      group is bitwise SoapMuonRef).
    - 0-d / 1-D params (identity side, no factor) may only form singleton groups.
    """

    def __init__(
        self,
        params,
        groups: Sequence[Sequence[torch.nn.Parameter]] = (),
        lr: float = 2e-2,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float = -1,
        eps: float = 1e-15,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        precondition_frequency: int = 40,
        max_precond_dim: int = 10000,
        newton_schulz_steps: int = 10,
        nestrov: bool = True,
        cleanup_steps: int = 2,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            shampoo_beta=shampoo_beta,
            eps=eps,
            weight_decay=weight_decay,
            correct_bias=correct_bias,
            precondition_frequency=precondition_frequency,
            max_precond_dim=max_precond_dim,
            newton_schulz_steps=newton_schulz_steps,
            nestrov=nestrov,
            cleanup_steps=cleanup_steps,
        )
        all_params = [p for group in self.param_groups for p in group["params"]]
        known = {id(p) for p in all_params}
        group_of: dict[int, int] = {}
        share_groups: list[list[torch.Tensor]] = []
        for listed in groups:
            members = list(listed)
            if not members:
                continue
            for p in members:
                if id(p) not in known:
                    raise ValueError("a shared group lists a param that is not in the optimizer")
                if id(p) in group_of:
                    raise ValueError("a param is listed in two shared groups")
                group_of[id(p)] = len(share_groups)
            shapes = {tuple(p.shape) for p in members}
            if len(shapes) != 1:
                raise ValueError(f"members of a shared group must have equal shapes, got {sorted(shapes)}")
            if len(members) > 1 and members[0].ndim != 2:
                raise ValueError("only 2-D params can share a basis")
            share_groups.append(members)
        # processing order: each share group when its first param (in param_groups order) is met
        ordered: list[list[torch.Tensor]] = []
        seen: set[int] = set()
        for p in all_params:
            if id(p) in group_of:
                k = group_of[id(p)]
                if k not in seen:
                    seen.add(k)
                    ordered.append(share_groups[k])
            else:
                ordered.append([p])
        self._share_groups = ordered

    def _group_of_param(self) -> dict[int, dict]:
        return {id(p): group for group in self.param_groups for p in group["params"]}

    @staticmethod
    def _outer(g: torch.Tensor, side: str, dtype: torch.dtype) -> torch.Tensor:
        gf = g.to(dtype)
        return gf @ gf.T if side == "left" else gf.T @ gf

    def _summed_outer(self, members: list[torch.Tensor], shared: dict) -> torch.Tensor:
        total = None
        for p in members:
            o = self._outer(p.grad, shared["side"], shared["GG"].dtype)
            total = o if total is None else total + o
        return total

    def _member_update(self, p: torch.Tensor, group: dict, shared: dict) -> None:
        """SoapMuonRef's update for one member, with the shared basis (no maintenance here)."""
        b1, b2 = group["betas"]
        g = p.grad
        state = self.state[p]
        side = shared["side"]
        q = shared["Q"]
        qs = [q, None] if side == "left" else ([None, q] if side == "right" else [])
        gr = rotate(g, qs)
        state["step"] += 1
        t = state["step"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(b1).add_(g, alpha=1 - b1)
        exp_avg_sq.mul_(b2).add_(gr.square(), alpha=1 - b2)
        d = exp_avg_sq.sqrt().add(group["eps"])
        mr = rotate(exp_avg, qs)
        if group["correct_bias"]:
            ss = group["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t)
        else:
            ss = group["lr"]
        small = p.ndim == 2 and max(p.shape) < group["max_precond_dim"]
        if group["nestrov"] and small:
            u = (mr + (1 - b1) * gr) / d
        else:
            u = mr / d
        if p.ndim == 2:
            m, n = p.shape
            u = _newton_schulz_soap_muon(u, group["newton_schulz_steps"], group["cleanup_steps"])
            u = torch.sign(u) * torch.sqrt(torch.abs(u))
            u = u / frob(u)
            if small:
                u = u * math.sqrt(min(m, n))
                u = u * math.sqrt(max(1.0, m / n))
            else:
                u = u * math.sqrt(m * n)
            u = u.to(p.dtype)
        u = unrotate(u, qs)
        p.add_(u, alpha=-ss)
        if group["weight_decay"] > 0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group_of = self._group_of_param()
        for members in self._share_groups:
            with_grad = [p.grad is not None for p in members]
            if not any(with_grad):
                continue
            if not all(with_grad):
                raise ValueError("all members of a shared group must have a grad on the same steps")
            lead = group_of[id(members[0])]
            first_state = self.state[members[0]]
            if "shared" not in first_state:  # first step of the group: statistics and basis only
                side = self._side(members[0])
                sb = lead["shampoo_beta"]
                shared = {
                    "side": side,
                    "shampoo_beta": sb if sb >= 0 else lead["betas"][1],
                    "precondition_frequency": lead["precondition_frequency"],
                    "step": 0,
                }
                if side == "left":
                    d = members[0].shape[0]
                elif side == "right":
                    d = members[0].shape[1]
                else:
                    d = None
                fdtype = at_least_fp32(members[0].dtype)
                shared["GG"] = None if d is None else torch.zeros(d, d, dtype=fdtype, device=members[0].device)
                if shared["GG"] is not None:
                    shared["GG"].lerp_(self._summed_outer(members, shared), 1 - shared["shampoo_beta"])
                    shared["Q"] = _eigh_desc_plain(shared["GG"])
                else:
                    shared["Q"] = None
                for p in members:
                    state = self.state[p]
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p.grad)
                    state["exp_avg_sq"] = torch.zeros_like(p.grad)
                    state["shared"] = shared
                continue  # no parameter update on the first step

            shared = first_state["shared"]
            for p in members:
                self._member_update(p, group_of[id(p)], self.state[p]["shared"])
            shared["step"] += 1
            t = shared["step"]
            if shared["GG"] is None:
                continue
            # maintenance with the raw G of every member, after all the updates
            shared["GG"].lerp_(self._summed_outer(members, shared), 1 - shared["shampoo_beta"])
            if t % shared["precondition_frequency"] == 0:
                gg, q = shared["GG"], shared["Q"]
                est = torch.diag(q.T @ gg @ q)
                idx = torch.argsort(est, descending=True, stable=True)
                dim = 0 if shared["side"] == "left" else 1
                for p in members:
                    state = self.state[p]
                    state["exp_avg_sq"] = state["exp_avg_sq"].index_select(dim, idx.to(p.device))
                q = q[:, idx]
                shared["Q"], _ = torch.linalg.qr(gg @ q)
        return loss


# --------------------------------------------------------------------------------------------------------------
# 6. SOAP with a refresh-frequency schedule
# --------------------------------------------------------------------------------------------------------------


def schedule_every(t: int, schedule: Sequence) -> int:
    """The refresh period at step t for a schedule [(until_1, every_1), (until_2, every_2), ..., every_final]:
    the first pair with t <= until gives every; past all pairs, the final every."""
    for item in schedule[:-1]:
        until, every = item
        if t <= until:
            return int(every)
    return int(schedule[-1])


class SoapScheduleRef(SoapV1Ref):
    """SOAP v1 (SoapV1Ref) whose refresh condition is t % every(t) == 0, with every(t) from ``freq_schedule``
    (see schedule_every), e.g. [(100, 1), 10]: refresh every step for t <= 100, then at t % 10 == 0.

    Interpretation choices: ``freq_schedule=None`` means [precondition_frequency] (plain SOAP v1); the schedule is
    cached in the param's state when it is first seen (as SOAP caches precondition_frequency); the until-steps must
    increase and every period must be >= 1 (ValueError otherwise).
    """

    def __init__(
        self,
        params,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float = -1,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        normalize_grads: bool = False,
        correct_bias: bool = True,
        freq_schedule: Sequence | None = None,
    ) -> None:
        if freq_schedule is None:
            freq_schedule = [precondition_frequency]
        freq_schedule = list(freq_schedule)
        if not freq_schedule:
            raise ValueError("freq_schedule needs at least the final period")
        last_until = -math.inf
        for item in freq_schedule[:-1]:
            until, every = item
            if until <= last_until or every < 1:
                raise ValueError(f"bad freq_schedule {freq_schedule!r}")
            last_until = until
        if int(freq_schedule[-1]) < 1:
            raise ValueError(f"bad freq_schedule {freq_schedule!r}")
        defaults = dict(
            lr=lr,
            betas=betas,
            shampoo_beta=shampoo_beta,
            eps=eps,
            weight_decay=weight_decay,
            precondition_frequency=precondition_frequency,
            max_precond_dim=max_precond_dim,
            merge_dims=merge_dims,
            precondition_1d=precondition_1d,
            normalize_grads=normalize_grads,
            correct_bias=correct_bias,
            freq_schedule=freq_schedule,
        )
        torch.optim.Optimizer.__init__(self, params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if self._first_seen(p, group):
                    self.state[p]["freq_schedule"] = list(group["freq_schedule"])
                    continue
                state = self.state[p]
                g = p.grad
                gr = self._rot(g, state)
                state["step"] += 1
                t = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(b1).add_(g, alpha=1 - b1)
                exp_avg_sq.mul_(b2).add_(gr.square(), alpha=1 - b2)
                denom = exp_avg_sq.sqrt().add(group["eps"])
                mr = self._rot(exp_avg, state)
                ss = self._step_size(group, t)
                u = self._unrot(mr / denom, state)
                self._apply(p, u, ss, group)
                self._update_gg(g, state)
                if t % schedule_every(t, state["freq_schedule"]) == 0:
                    self._refresh(state)
        return loss


# --------------------------------------------------------------------------------------------------------------
# 7. Cautious Adam
# --------------------------------------------------------------------------------------------------------------


class CautiousAdamRef(torch.optim.Optimizer):
    """Cautious AdamW (Liang et al. 2025), torch-AdamW style, per param with t = 1, 2, ... (no first-step skip):

    m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; u = (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps);
    mask = (u * g > 0) as float; mask = mask / mask.mean().clamp(min=1e-3); u = u * mask;
    p *= 1 - lr wd (before the update); p -= lr u.
    Defaults are torch.optim.AdamW's.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(g)
                    state["exp_avg_sq"] = torch.zeros_like(g)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).add_(g.square(), alpha=1 - b2)
                u = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + group["eps"])
                mask = (u * g > 0).to(u.dtype)
                mask = mask / mask.mean().clamp(min=1e-3)
                u = u * mask
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(u, alpha=-group["lr"])
        return loss

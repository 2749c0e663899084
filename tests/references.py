"""Independent reference optimizers, written only from ALGORITHMS.md (the shared specification, shared/ALGORITHMS.md).

These are deliberately plain: one parameter at a time, no batching, no foreach, no code shared with
``soapdsl``. They exist so the DSL recipes can be checked against something written separately from them.

Dtype policy: linear algebra runs in the parameter's dtype, except where the specification says "fp32"
(SOAP's Kronecker factors ``GG``, their eigenbases ``Q``, the basis refresh, and the SOAP-Muon Newton-Schulz).
There we use "at least fp32", ``torch.promote_types(param.dtype, torch.float32)``, so float32 parameters get
exactly the specified fp32 arithmetic and float64 parameters stay float64 end to end.

Sections referenced below (2.x SOAP, 3.x SOAP-Muon, 4.x Muon, 5.x Shampoo) are those of ALGORITHMS.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

# --------------------------------------------------------------------------------------------------------------
# Small shared helpers (notation of section 1)
# --------------------------------------------------------------------------------------------------------------

Bases = list  # list[torch.Tensor | None], one entry per dimension; None means the identity on that dimension


def at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """The dtype used where the specification says fp32: fp32 for fp32 (or narrower) params, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


def rotate(x: torch.Tensor, qs: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """rotate(X, Q) = X x_1 Q_1^T x_2 Q_2^T ... (mode-k products; a None entry is the identity).

    For each dim k: out[..., j, ...] = sum_i X[..., i, ...] Q_k[i, j], i.e. Q_k^T applied along dim k.
    For a matrix this is Q_L^T X Q_R.
    """
    out = x
    for k, q in enumerate(qs):
        if q is None:
            continue
        out = torch.movedim(torch.tensordot(out, q.to(out.dtype), dims=([k], [0])), -1, k)
    return out


def unrotate(x: torch.Tensor, qs: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """unrotate(X, Q) = X x_1 Q_1 x_2 Q_2 ...; for a matrix Q_L X Q_R^T."""
    out = x
    for k, q in enumerate(qs):
        if q is None:
            continue
        out = torch.movedim(torch.tensordot(out, q.to(out.dtype), dims=([k], [1])), -1, k)
    return out


def contract_all_but(g: torch.Tensor, k: int) -> torch.Tensor:
    """G_(k) G_(k)^T: contract G with itself over every dim except k (a 1-D tensor gives the outer product)."""
    other = [i for i in range(g.ndim) if i != k]
    return torch.tensordot(g, g, dims=(other, other))


def merge_dims(shape: Sequence[int], max_dim: int) -> list[int]:
    """Section 2.3's merge rule (including the quirk that 50 x 100 becomes a single dim of 5000)."""
    out: list[int] = []
    c = 1
    for s in shape:
        if c * s > max_dim:
            if c > 1:
                out.append(c)
                c = s
            else:
                out.append(s)
                # c stays 1
        else:
            c = c * s
    if c > 1 or len(out) == 0:
        out.append(c)
    return out


def frob(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).sum().sqrt()


def _eigh_desc_soap(gg: torch.Tensor) -> torch.Tensor:
    """SOAP's initial basis: eigh(GG + 1e-30 I), float64 retry if eigh raises, columns flipped to descending."""
    eye = torch.eye(gg.shape[0], dtype=gg.dtype, device=gg.device)
    try:
        _, q = torch.linalg.eigh(gg + 1e-30 * eye)
    except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
        _, q = torch.linalg.eigh(gg.to(torch.float64) + 1e-30 * eye.to(torch.float64))
        q = q.to(gg.dtype)
    return torch.flip(q, [1])


def _eigh_desc_plain(gg: torch.Tensor) -> torch.Tensor:
    """SOAP-Muon's initial basis (3.4): plain eigh, no jitter, no fallback, flipped to descending."""
    _, q = torch.linalg.eigh(gg)
    return torch.flip(q, [1])


def _qr_refresh(gg: torch.Tensor, q: torch.Tensor, v: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One basis refresh for one dim (2.3 steps 1-5). Returns (new Q, v permuted along ``dim``).

    ``gg`` and ``q`` are in the "at least fp32" dtype. The argsort is made stable so exact ties are broken
    by index (the specification does not say how ties are broken).
    """
    est = torch.diag(q.T @ gg @ q)
    idx = torch.argsort(est, descending=True, stable=True)
    v = v.index_select(dim, idx.to(v.device))
    q = q[:, idx]
    q, _ = torch.linalg.qr(gg @ q)
    return q, v


def _newton_schulz_soap_muon(u: torch.Tensor, steps: int, cleanup_steps: int) -> torch.Tensor:
    """Section 3.5: fp32-or-wider clone, Frobenius normalisation (+1e-7), quintic steps then cubic cleanup steps."""
    x = u.to(at_least_fp32(u.dtype)).clone()
    x = x / (frob(x) + 1e-7)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    for _ in range(steps):
        a = x @ x.T
        b = a @ x
        x = 3.4445 * x - 4.7750 * b + 2.0315 * (a @ b)
    for _ in range(cleanup_steps):
        x = 1.5 * x - 0.5 * ((x @ x.T) @ x)
    if transposed:
        x = x.T
    return x


# --------------------------------------------------------------------------------------------------------------
# SOAP (section 2)
# --------------------------------------------------------------------------------------------------------------


class _SoapBase(torch.optim.Optimizer):
    """Shared constructor and preconditioner bookkeeping of SoapV1Ref / SoapV2Ref.

    Interpretation choices (where ALGORITHMS.md leaves room):
    - ``GG`` and ``Q`` are kept in ``at_least_fp32(param.dtype)`` (the spec says fp32; float64 params stay float64).
      Rotations cast ``Q`` to the tensor's dtype (a no-op for fp32/fp64 params).
    - ``shampoo_beta`` and ``precondition_frequency`` are resolved and cached in the state when the param is first
      seen (2.2), so later changes to the group do not affect an already-initialised param.
    - A 0-d param has no dims, so it gets no factors and is plain Adam (with the first-step skip). With
      ``merge_dims`` the merge rule turns shape () into [1], which then gets a 1 x 1 factor (the rule read literally;
      a 1 x 1 orthogonal basis is +-1, so this is still Adam up to rounding).
    - ``merge_dims`` is applied to every param whose ndim != 1 (the 1-D rule of 2.3 comes first); ``data_format``
      (channels_last) is not supported: tensors are taken as channels_first.
    - The refresh argsort is stable (exact ties broken by index).
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
        )
        super().__init__(params, defaults)

    # -- preconditioner pieces (2.3) ---------------------------------------------------------------------------

    @staticmethod
    def _init_preconditioner(p: torch.Tensor, state: dict, group: dict) -> None:
        max_dim = group["max_precond_dim"]
        if p.ndim != 1 and group["merge_dims"]:
            work_shape = merge_dims(p.shape, max_dim)
        else:
            work_shape = list(p.shape)
        fdtype = at_least_fp32(p.dtype)
        gg: list[torch.Tensor | None] = []
        if p.ndim == 1:
            d = p.shape[0]
            if group["precondition_1d"] and d <= max_dim:
                gg.append(torch.zeros(d, d, dtype=fdtype, device=p.device))
            else:
                gg.append(None)
        else:
            for d in work_shape:
                gg.append(torch.zeros(d, d, dtype=fdtype, device=p.device) if d <= max_dim else None)
        state["work_shape"] = work_shape
        state["GG"] = gg
        state["Q"] = None
        state["precondition_frequency"] = group["precondition_frequency"]
        sb = group["shampoo_beta"]
        state["shampoo_beta"] = sb if sb >= 0 else group["betas"][1]

    @staticmethod
    def _update_gg(g: torch.Tensor, state: dict) -> None:
        gw = g.reshape(state["work_shape"])
        for k, gg in enumerate(state["GG"]):
            if gg is None:
                continue
            outer = contract_all_but(gw.to(gg.dtype), k)
            gg.lerp_(outer, 1 - state["shampoo_beta"])

    @staticmethod
    def _initial_basis(state: dict) -> Bases:
        return [None if gg is None else _eigh_desc_soap(gg) for gg in state["GG"]]

    @staticmethod
    def _refresh(state: dict) -> None:
        """get_orthogonal_matrix_QR: permutes exp_avg_sq (on the merged view) and replaces Q."""
        shape = state["exp_avg_sq"].shape
        v = state["exp_avg_sq"].reshape(state["work_shape"])
        new_q: Bases = []
        for k, (gg, q) in enumerate(zip(state["GG"], state["Q"])):
            if gg is None:
                new_q.append(None)
                continue
            q, v = _qr_refresh(gg, q, v, k)
            new_q.append(q)
        state["exp_avg_sq"] = v.reshape(shape)
        state["Q"] = new_q

    @staticmethod
    def _rot(x: torch.Tensor, state: dict) -> torch.Tensor:
        return rotate(x.reshape(state["work_shape"]), state["Q"]).reshape(x.shape)

    @staticmethod
    def _unrot(x: torch.Tensor, state: dict) -> torch.Tensor:
        return unrotate(x.reshape(state["work_shape"]), state["Q"]).reshape(x.shape)

    @staticmethod
    def _step_size(group: dict, t: int) -> float:
        b1, b2 = group["betas"]
        if group["correct_bias"]:
            return group["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t)
        return group["lr"]

    def _first_seen(self, p: torch.Tensor, group: dict) -> bool:
        """Handles 'state empty' and the first step (init, GG update, initial basis). True means: skip p now."""
        g = p.grad
        assert g is not None, "called for a param with a grad only"
        state = self.state[p]
        if len(state) == 0:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(g)
            state["exp_avg_sq"] = torch.zeros_like(g)
        if "Q" not in state:
            self._init_preconditioner(p, state, group)
            self._update_gg(g, state)
            state["Q"] = self._initial_basis(state)
            return True
        return False

    @staticmethod
    def _apply(p: torch.Tensor, u: torch.Tensor, ss: float, group: dict) -> None:
        if group["normalize_grads"]:
            u = u / (1e-30 + u.pow(2).mean().sqrt())
        p.add_(u, alpha=-ss)
        if group["weight_decay"] > 0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])


class SoapV1Ref(_SoapBase):
    """SOAP, v1 momentum (2.5): exp_avg lives in the ORIGINAL space and is rotated every step.

    Step per param (after the first-step skip): Gr = rotate(G); t += 1; m = b1 m + (1-b1) G;
    v = b2 v + (1-b2) Gr^2; U = unrotate(rotate(m) / (sqrt(v) + eps)); optional RMS normalisation;
    p -= lr sqrt(1-b2^t)/(1-b1^t) U; p -= lr wd p (if wd > 0); GG update with G; refresh if t % f == 0.
    See _SoapBase for the interpretation choices.
    """

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
                # maintenance after the update (the current G never shapes the basis it was rotated with)
                self._update_gg(g, state)
                if t % state["precondition_frequency"] == 0:
                    self._refresh(state)
        return loss


class SoapV2Ref(_SoapBase):
    """SOAP, HEAD form (2.4): exp_avg is kept rotated; every maintenance call unrotates it with Q_old, updates GG,
    maybe refreshes Q, then re-rotates it with Q_new (even when Q did not change). See _SoapBase for choices."""

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
                    continue
                state = self.state[p]
                g = p.grad
                gr = self._rot(g, state)
                state["step"] += 1
                t = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(b1).add_(gr, alpha=1 - b1)
                exp_avg_sq.mul_(b2).add_(gr.square(), alpha=1 - b2)
                denom = exp_avg_sq.sqrt().add(group["eps"])
                ss = self._step_size(group, t)
                u = self._unrot(exp_avg / denom, state)
                self._apply(p, u, ss, group)
                # maintenance
                exp_avg_orig = self._unrot(state["exp_avg"], state)  # with Q_old
                self._update_gg(g, state)
                if t % state["precondition_frequency"] == 0:
                    self._refresh(state)
                state["exp_avg"] = self._rot(exp_avg_orig, state)  # with Q_new
        return loss


class AdamSoapConventionsRef(torch.optim.Optimizer):
    """Adam with SOAP's conventions, i.e. what SOAP with max_precond_dim=0 must equal.

    The first step of every param is skipped (state is created, the param is not moved, the step counter stays 0);
    then t = 1, 2, ...: m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= lr sqrt(1-b2^t)/(1-b1^t) m/(sqrt(v)+eps)
    (eps on the raw sqrt(v)); then p -= lr wd p (raw lr, after the update, only if wd > 0).
    """

    def __init__(
        self,
        params,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
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
                    continue  # the first step is skipped
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).add_(g.square(), alpha=1 - b2)
                denom = v.sqrt().add(group["eps"])
                ss = group["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t)
                p.add_(m / denom, alpha=-ss)
                if group["weight_decay"] > 0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


# --------------------------------------------------------------------------------------------------------------
# SOAP-Muon (section 3, nanogpt_optimizer.py / soap_muon10.py, projection "std")
# --------------------------------------------------------------------------------------------------------------


class SoapMuonRef(torch.optim.Optimizer):
    """SOAP-Muon with projection "std" (3.3-3.6).

    Side selection per 2-D param (m x n): m > n -> "right" (n x n factor, GG = lerp(GG, G^T G)), m < n -> "left"
    (m x m factor, GG = lerp(GG, G G^T)), m == n -> "right". A right basis is applied as X Q_R and a left one as
    Q_L^T X, so project = rotate and back = unrotate with the other dim the identity.

    Interpretation choices:
    - Q is stored with eigenvectors as COLUMNS for both sides (the GaLore "right stores Q^T" layout is an internal
      storage detail; project/back are the same maps).
    - GG, Q and the refresh are in at_least_fp32(param.dtype) (SOAP's fp32 convention); the initial basis is plain
      eigh (no 1e-30 jitter, no float64 fallback) flipped to descending; the refresh argsort is stable.
    - For "std" the factor-side downgrade of 3.3 does not apply ("full" only): the smaller side always gets a factor.
      ``max_precond_dim`` replaces the literal 10000 in 3.6's guards: max(m, n) < max_precond_dim selects the main
      branch (and allows the nestrov variant); otherwise the soap_muon10 RMS-1 branch (no nestrov term).
    - 1-D (and 0-d) params follow soap_muon10: projection "identity", no factor, U = Mr/d (Adam with SOAP's eps and
      bias-correction conventions), first step skipped too. Params with ndim > 2 raise ValueError.
    - The NS output (fp32-or-wider) is cast back to the param dtype before back() (a no-op for fp32/fp64).
    - ``cleanup_steps`` (default 2) is the number of cubic steps of 3.5.
    """

    def __init__(
        self,
        params,
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
        defaults = dict(
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
        super().__init__(params, defaults)

    @staticmethod
    def _side(p: torch.Tensor) -> str:
        if p.ndim <= 1:
            return "identity"
        if p.ndim != 2:
            raise ValueError(f"SoapMuonRef supports 0-D, 1-D and 2-D params, got shape {tuple(p.shape)}")
        m, n = p.shape
        if m < n:
            return "left"
        return "right"  # m > n, and m == n in the nanogpt file

    @staticmethod
    def _update_gg(g: torch.Tensor, state: dict) -> None:
        gg = state["GG"]
        if gg is None:
            return
        gf = g.to(gg.dtype)
        outer = gf @ gf.T if state["side"] == "left" else gf.T @ gf
        gg.lerp_(outer, 1 - state["shampoo_beta"])

    @staticmethod
    def _bases(state: dict) -> Bases:
        if state["side"] == "left":
            return [state["Q"], None]
        if state["side"] == "right":
            return [None, state["Q"]]
        return []

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
                if "Q" not in state:
                    side = self._side(p)
                    fdtype = at_least_fp32(p.dtype)
                    state["side"] = side
                    sb = group["shampoo_beta"]
                    state["shampoo_beta"] = sb if sb >= 0 else b2
                    if side == "left":
                        state["GG"] = torch.zeros(p.shape[0], p.shape[0], dtype=fdtype, device=p.device)
                    elif side == "right":
                        state["GG"] = torch.zeros(p.shape[1], p.shape[1], dtype=fdtype, device=p.device)
                    else:
                        state["GG"] = None
                    self._update_gg(g, state)
                    state["Q"] = None if state["GG"] is None else _eigh_desc_plain(state["GG"])
                    continue  # no parameter update on the first step

                qs = self._bases(state)
                gr = rotate(g, qs)
                state["step"] += 1
                t = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(b1).add_(g, alpha=1 - b1)  # original space
                exp_avg_sq.mul_(b2).add_(gr.square(), alpha=1 - b2)  # rotated space
                d = exp_avg_sq.sqrt().add(group["eps"])
                mr = rotate(exp_avg, qs)
                if group["correct_bias"]:
                    ss = group["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t)
                else:
                    ss = group["lr"]

                small = p.ndim == 2 and max(p.shape) < group["max_precond_dim"]
                if group["nestrov"] and small:
                    u = (mr + (1 - b1) * gr) / d  # Mr + (1-b1) Gr, not b1 Mr + ...
                else:
                    u = mr / d
                if p.ndim == 2:
                    m, n = p.shape
                    u = _newton_schulz_soap_muon(u, group["newton_schulz_steps"], group["cleanup_steps"])
                    u = torch.sign(u) * torch.sqrt(torch.abs(u))  # the sqrt correction, in the rotated basis
                    u = u / frob(u)
                    if small:
                        u = u * math.sqrt(min(m, n))
                        u = u * math.sqrt(max(1.0, m / n))
                    else:  # soap_muon10: max dim >= max_precond_dim, RMS 1
                        u = u * math.sqrt(m * n)
                    u = u.to(p.dtype)
                u = unrotate(u, qs)
                p.add_(u, alpha=-ss)
                if group["weight_decay"] > 0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])

                # maintenance with the raw G, after the update
                self._update_gg(g, state)
                if state["GG"] is not None and t % group["precondition_frequency"] == 0:
                    dim = 0 if state["side"] == "left" else 1  # rows for left, columns for right
                    state["Q"], state["exp_avg_sq"] = _qr_refresh(state["GG"], state["Q"], state["exp_avg_sq"], dim)
        return loss


# --------------------------------------------------------------------------------------------------------------
# Muon (section 4.3, torch.optim.Muon semantics, NS in a chosen dtype)
# --------------------------------------------------------------------------------------------------------------


class MuonRef(torch.optim.Optimizer):
    """torch.optim.Muon's update (4.3), with the Newton-Schulz iteration run in ``ns_dtype`` (default fp32).

    buf = lerp(buf, g, 1-mu); u = lerp(g, buf, mu) if nesterov else buf; X = u in ns_dtype (a copy);
    transpose if rows > cols; X /= max(||X||_F, eps); ns_steps of A = X X^T, B = b A + c A A, X = a X + B X;
    transpose back; p *= 1 - lr wd (raw lr, always, as torch does); p -= adjusted_lr X.
    adjusted_lr: None/"original" -> lr sqrt(max(1, A/B)); "match_rms_adamw" -> lr 0.2 sqrt(max(A, B)),
    with A, B = shape[:2]. 2-D params only. With ns_dtype=torch.bfloat16 this is torch.optim.Muon up to the
    rounding of its fused addmm (torch rounds b A + c A A and a X + B X once; here each op rounds).
    ``ns_coefficients`` is an extra keyword (torch's default coefficients).
    """

    def __init__(
        self,
        params,
        lr: float = 0.02,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        eps: float = 1e-7,
        adjust_lr_fn: str | None = None,
        ns_dtype: torch.dtype = torch.float32,
        ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315),
    ) -> None:
        if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"unknown adjust_lr_fn {adjust_lr_fn!r}")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            eps=eps,
            adjust_lr_fn=adjust_lr_fn,
            ns_dtype=ns_dtype,
            ns_coefficients=ns_coefficients,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"MuonRef only supports 2-D params, got shape {tuple(p.shape)}")

    @staticmethod
    def _adjusted_lr(lr: float, fn: str | None, shape: torch.Size) -> float:
        a, b = shape[:2]
        if fn is None or fn == "original":
            return lr * math.sqrt(max(1.0, a / b))
        return lr * 0.2 * math.sqrt(max(a, b))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            mu = group["momentum"]
            ca, cb, cc = group["ns_coefficients"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if len(state) == 0:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.lerp_(g, 1 - mu)
                u = g.lerp(buf, mu) if group["nesterov"] else buf
                x = u.to(group["ns_dtype"]).clone()  # never alias the momentum buffer
                transposed = x.shape[0] > x.shape[1]
                if transposed:
                    x = x.T
                x = x / frob(x).clamp(min=group["eps"])
                for _ in range(group["ns_steps"]):
                    a = x @ x.T
                    b = cb * a + cc * (a @ a)
                    x = ca * x + b @ x
                if transposed:
                    x = x.T
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(x.to(p.dtype), alpha=-self._adjusted_lr(group["lr"], group["adjust_lr_fn"], p.shape))
        return loss


# --------------------------------------------------------------------------------------------------------------
# Shampoo (section 5.2, DistributedShampoo style, no blocking)
# --------------------------------------------------------------------------------------------------------------


class ShampooRef(torch.optim.Optimizer):
    """Practical Shampoo with Adam grafting (5.2), one Kronecker factor per dim, no blocking.

    Per param, t = 1, 2, ... counts its steps:
      F_k = b2 F_k + (1-b2) G_(k) G_(k)^T for every dim k with d_k <= max_preconditioner_dim (F_k += ... if b2 == 1),
          updated every step BEFORE it is used, with the current G; larger dims get no factor (identity);
      at t == start, and at t % f == 0 for t > start (start = f when start_preconditioning_step == -1):
          Finv_k = (F_k / (1 - b2^t) + eps I)^(-e)   (use_bias_correction; F_k itself when b2 == 1 or without it);
      M = m / (1 - b1^t) with m = b1 m + (1-b1) G;
      A = M / (sqrt(v / (1 - gb2^t)) + graft_eps) with v = gb2 v + (1-gb2) G^2 (raw G);
      P = A for t < start; from t = start on P = M x_k Finv_k (every factored dim),
          rescaled per param: P = P ||A||_F / (||P||_F + 1e-16);
      p *= 1 - lr wd (decoupled, before the update, only if wd > 0); p -= lr P.

    Interpretation choices:
    - Exponent e: "classic" -> 1/(2 * ndim) (1/4 per side for matrices, 1/2 for vectors); "power_half" -> 1/2;
      a float is used as is. ndim is the param's ndim, also when some dims are unfactored.
    - The inverse root uses eigh of F_k in F_k's dtype (the param's dtype; float64 retry if eigh raises, cast back),
      then, as DistributedShampoo does, eigenvalues are shifted up by -min(lambda_min, 0) before eps is added:
      Finv = V diag((lambda + eps)^(-e)) V^T. For a PSD F_k this is exactly (F_k + eps I)^(-e); the shift only stops
      rounding-negative eigenvalues of rank-deficient factors from turning into NaN.
    - The refresh schedule when start is not a multiple of f: ALGORITHMS.md 5.2 says "before
      start_preconditioning_step (default = f): P = A" and that the root "is refreshed before it is applied", so
      step `start` itself computes a root and is preconditioned, as DistributedShampoo's
      `(step % f == 0 and step > start) or step == start` does; later roots come at the multiples of f. (A start
      below f, which DistributedShampoo rejects, follows the same rule.) A param with no factored dim (0-d, or every
      dim too large) gets P = M rescaled to ||A|| from t = start on.
    - Grafting is per param (one block per param since there is no blocking).
    - use_bias_correction (DistributedShampoo's default: True) corrects the factor matrices too, not only the
      filtered gradient: the root is taken of F_k / (1 - b2^t), so eps meets the corrected factor.
    - use_merge_dims (DistributedShampoo's default: True; False here, as in the shampoo recipe) reshapes G before
      anything else: from the first dim on, the next dim joins the last merged one when either is 1 or their
      product is <= max_preconditioner_dim. Factors, roots and the exponent's order are those of the merged shape.
    """

    def __init__(
        self,
        params,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        epsilon: float = 1e-12,
        weight_decay: float = 0.0,
        precondition_frequency: int = 10,
        start_preconditioning_step: int = -1,
        max_preconditioner_dim: int = 8192,
        exponent: str | float = "classic",
        graft_beta2: float = 0.95,
        graft_eps: float = 1e-8,
        use_bias_correction: bool = True,
        use_merge_dims: bool = False,
    ) -> None:
        if not (exponent in ("classic", "power_half") or isinstance(exponent, (int, float))):
            raise ValueError(f"unknown exponent {exponent!r}")
        defaults = dict(
            lr=lr,
            betas=betas,
            epsilon=epsilon,
            weight_decay=weight_decay,
            precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step,
            max_preconditioner_dim=max_preconditioner_dim,
            exponent=exponent,
            graft_beta2=graft_beta2,
            graft_eps=graft_eps,
            use_bias_correction=use_bias_correction,
            use_merge_dims=use_merge_dims,
        )
        super().__init__(params, defaults)

    @staticmethod
    def _merged(shape: tuple[int, ...], bound: int) -> tuple[int, ...]:
        if len(shape) < 2:
            return tuple(shape)
        dims = [shape[0]]
        for d in shape[1:]:
            if dims[-1] == 1 or d == 1 or dims[-1] * d <= bound:
                dims[-1] = dims[-1] * d
            else:
                dims.append(d)
        return tuple(dims)

    @staticmethod
    def _exponent(exponent: str | float, ndim: int) -> float:
        if exponent == "classic":
            return 1.0 / (2 * max(ndim, 1))
        if exponent == "power_half":
            return 0.5
        return float(exponent)

    @staticmethod
    def _inverse_root(f: torch.Tensor, eps: float, e: float) -> torch.Tensor:
        try:
            lam, v = torch.linalg.eigh(f)
        except RuntimeError:
            lam, v = torch.linalg.eigh(f.to(torch.float64))
            lam, v = lam.to(f.dtype), v.to(f.dtype)
        lam = lam - torch.clamp(lam.min(), max=0.0)
        lam = lam + eps
        return (v * lam.pow(-e).unsqueeze(0)) @ v.T

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            gb2 = group["graft_beta2"]
            freq = group["precondition_frequency"]
            start = group["start_preconditioning_step"]
            if start == -1:
                start = freq
            for p in group["params"]:
                if p.grad is None:
                    continue
                dims = tuple(p.shape)
                if group["use_merge_dims"]:
                    dims = self._merged(dims, group["max_preconditioner_dim"])
                g = p.grad.reshape(dims)
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(g)
                    state["graft_sq"] = torch.zeros_like(g)
                    state["factors"] = [
                        torch.zeros(d, d, dtype=p.dtype, device=p.device)
                        if d <= group["max_preconditioner_dim"]
                        else None
                        for d in dims
                    ]
                    state["inv_roots"] = [None for _ in dims]
                    state["has_root"] = False
                state["step"] += 1
                t = state["step"]

                # factor statistics, updated before use with the current G
                for k, f in enumerate(state["factors"]):
                    if f is None:
                        continue
                    outer = contract_all_but(g, k)
                    if b2 == 1:
                        f.add_(outer)
                    else:
                        f.mul_(b2).add_(outer, alpha=1 - b2)

                m = state["exp_avg"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                mhat = m / (1 - b1**t)

                v = state["graft_sq"]
                v.mul_(gb2).add_(g.square(), alpha=1 - gb2)
                graft = mhat / ((v / (1 - gb2**t)).sqrt() + group["graft_eps"])

                # ALGORITHMS.md 5.2: "before start_preconditioning_step (default = f): P = A", and the root is
                # "refreshed before it is applied": the first root at t == start (DistributedShampoo's rule)
                if t == start or (t % freq == 0 and t > start):
                    e = self._exponent(group["exponent"], len(dims))
                    c2 = 1 - b2**t if group["use_bias_correction"] and b2 != 1 else 1.0
                    state["inv_roots"] = [
                        None if f is None else self._inverse_root(f / c2, group["epsilon"], e) for f in state["factors"]
                    ]
                    state["has_root"] = True

                if state["has_root"]:
                    direction = mhat
                    for k, finv in enumerate(state["inv_roots"]):
                        if finv is None:
                            continue
                        direction = torch.movedim(torch.tensordot(direction, finv, dims=([k], [0])), -1, k)
                    direction = direction * frob(graft) / (frob(direction) + 1e-16)
                else:
                    direction = graft

                if group["weight_decay"] > 0:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(direction.reshape(p.shape), alpha=-group["lr"])
        return loss

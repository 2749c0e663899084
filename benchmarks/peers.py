"""The optimizers soapdsl is measured against, built on a list of named parameters.

* torch.optim.AdamW (foreach and fused) and torch.optim.Muon. torch's Muon runs Newton-Schulz
  in bfloat16, which on a CPU is about 60x slower than fp32 matmul, so the comparison uses
  ``torch_muon_fp32``: the same optimizer with ``torch.optim._muon._zeropower_via_newtonschulz``
  replaced, for the duration of its ``step()`` only, by a faithful fp32 copy (same math; a
  fresh fp32 copy of the update instead of ``.bfloat16()``).
* heavyball's SOAP and Muon (the optional ``bench`` extra). heavyball compiles its kernels with
  torch.compile by default (``heavyball.utils.compile_mode``); ``heavyball_eager()`` turns that
  off for smoke runs. heavyball's Muon rounds its Newton-Schulz input to bfloat16
  (``stochastic_round_``); ``heavyball_muon_fp32`` swaps in an fp32 copy of its
  ``zeropower_via_newtonschulz5`` the same way.
* pytorch_optimizer's SOAP (the ``bench`` extra).
* ``SoapV2Ref``: the per-parameter loop reference of SOAP's HEAD form from the test suite.

Each ``make_*`` returns an object with ``step()`` and ``state`` (a torch optimizer, or a thin
wrapper that applies a patch around ``step()``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

Named = list[tuple[str, torch.nn.Parameter]]

REPO = Path(__file__).resolve().parent.parent

# the settings of the SOAP comparison (group c) and of the SOAP-Muon one (group d)
SOAP_FREQ = 10
SOAP_MAX_DIM = 2048
SOAP_BETAS = (0.95, 0.95)
SOAP_LR = 3e-3
SOAP_WD = 0.01


def available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _params(named: Named) -> list[torch.nn.Parameter]:
    return [p for _, p in named]


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


class Patched:
    """An optimizer whose ``step()`` runs with ``obj.name`` replaced by ``value``."""

    def __init__(self, opt: Any, obj: Any, name: str, value: Any) -> None:
        self.opt, self._patch = opt, (obj, name, value)

    @property
    def state(self) -> Any:
        return self.opt.state

    def step(self) -> Any:
        with patched(*self._patch):
            return self.opt.step()


# -- torch ------------------------------------------------------------------------------------


def make_torch_adamw(named: Named, *, foreach: bool = False, fused: bool = False) -> torch.optim.Optimizer:
    return torch.optim.AdamW(_params(named), lr=1e-3, weight_decay=0.01, foreach=foreach or None, fused=fused or None)


def _zeropower_via_newtonschulz_fp32(
    grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float
) -> torch.Tensor:
    """torch 2.13's ``torch.optim._muon._zeropower_via_newtonschulz``, line for line, in fp32.

    The only change: ``grad.bfloat16()`` (a fresh bf16 copy) becomes a fresh fp32 copy.
    """
    if ns_steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if len(grad.shape) != 2:
        raise ValueError("Input tensor gradient must be a 2D matrix")
    if len(ns_coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")
    a, b, c = ns_coefficients
    ortho_grad = grad.to(torch.float32, copy=True)
    if grad.size(0) > grad.size(1):
        ortho_grad = ortho_grad.T
    # Ensure spectral norm is at most 1
    ortho_grad.div_(ortho_grad.norm().clamp(min=eps))
    # Perform the NS iterations
    for _ in range(ns_steps):
        gram_matrix = ortho_grad @ ortho_grad.T
        gram_update = torch.addmm(gram_matrix, gram_matrix, gram_matrix, beta=b, alpha=c)
        ortho_grad = torch.addmm(ortho_grad, gram_update, ortho_grad, beta=a)

    if grad.size(0) > grad.size(1):
        ortho_grad = ortho_grad.T
    return ortho_grad


def make_torch_muon(named: Named) -> torch.optim.Optimizer:
    """torch.optim.Muon as shipped (bf16 Newton-Schulz); the soapdsl ``muon`` defaults."""
    return torch.optim.Muon(_params(named), lr=0.02, weight_decay=0.0, momentum=0.95, nesterov=True)


def make_torch_muon_fp32(named: Named) -> Patched:
    import torch.optim._muon as tm

    return Patched(make_torch_muon(named), tm, "_zeropower_via_newtonschulz", _zeropower_via_newtonschulz_fp32)


# -- heavyball --------------------------------------------------------------------------------


def heavyball_eager() -> None:
    """Run heavyball without torch.compile (smoke runs: compiling takes minutes on a CPU)."""
    import heavyball.utils

    heavyball.utils.compile_mode = None


def heavyball_set_mode(mode: str) -> None:
    """Compile heavyball's kernels with torch.compile mode ``mode``."""
    import heavyball.utils

    heavyball.utils.compile_mode = mode


def heavyball_mode() -> str:
    import heavyball.utils

    return str(heavyball.utils.compile_mode)


def heavyball_compiled() -> bool:
    import heavyball.utils

    return heavyball.utils.compile_mode is not None


def make_heavyball_soap(named: Named) -> torch.optim.Optimizer:
    import heavyball

    return heavyball.SOAP(
        _params(named),
        lr=SOAP_LR,
        betas=SOAP_BETAS,
        shampoo_beta=SOAP_BETAS[1],
        eps=1e-8,
        weight_decay=SOAP_WD,
        precondition_frequency=SOAP_FREQ,
        max_precond_dim=SOAP_MAX_DIM,
        merge_dims=False,
        precondition_1d=False,
    )


def make_heavyball_muon(named: Named) -> torch.optim.Optimizer:
    """heavyball.Muon as shipped: EMA momentum with Nesterov, bf16 (stochastically rounded) NS."""
    import heavyball

    return heavyball.Muon(_params(named), lr=0.02, betas=(0.95, 0.95), weight_decay=0.0, nesterov=True)


_HB_NS_FP32: Callable[..., torch.Tensor] | None = None


def _heavyball_ns_fp32() -> Callable[..., torch.Tensor]:
    """heavyball 3.2's ``zeropower_via_newtonschulz5`` without the bf16 stochastic rounding,
    wrapped in heavyball's own compile decorator like the original."""
    global _HB_NS_FP32
    if _HB_NS_FP32 is None:
        import heavyball.utils as hu

        def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
            assert G.ndim >= 2
            assert steps == 5
            G = G / G.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
            x = G  # heavyball: `G if G.dtype == torch.float64 else stochastic_round_(G)` (bf16)
            if G.size(-2) > G.size(-1):
                x = x.mT
            for a, b, c in [
                (4.0848, -6.8946, 2.9270),
                (3.9505, -6.3029, 2.6377),
                (3.7418, -5.5913, 2.3037),
                (2.8769, -3.1427, 1.2046),
                (2.8366, -3.0525, 1.2012),
            ]:
                s = x @ x.mT
                y = c * s
                y.diagonal(dim1=-2, dim2=-1).add_(b)
                y = y @ s
                y.diagonal(dim1=-2, dim2=-1).add_(a)
                x = y @ x
            if G.size(-2) > G.size(-1):
                x = x.mT
            return x.to(G.dtype)

        _HB_NS_FP32 = hu.decorator_knowngood(zeropower_via_newtonschulz5)
    return _HB_NS_FP32


def make_heavyball_muon_fp32(named: Named) -> Patched:
    import heavyball.utils as hu

    return Patched(make_heavyball_muon(named), hu, "zeropower_via_newtonschulz5", _heavyball_ns_fp32())


# -- pytorch_optimizer ------------------------------------------------------------------------


def make_pytorch_optimizer_soap(named: Named) -> torch.optim.Optimizer:
    from pytorch_optimizer import SOAP

    return SOAP(
        _params(named),
        lr=SOAP_LR,
        betas=SOAP_BETAS,
        shampoo_beta=SOAP_BETAS[1],
        weight_decay=SOAP_WD,
        precondition_frequency=SOAP_FREQ,
        max_precondition_dim=SOAP_MAX_DIM,
        merge_dims=False,
        precondition_1d=False,
        eps=1e-8,
    )


# -- the loop reference from the test suite ---------------------------------------------------


def make_soap_v2_ref(named: Named) -> torch.optim.Optimizer:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.references import SoapV2Ref

    return SoapV2Ref(
        _params(named),
        lr=SOAP_LR,
        betas=SOAP_BETAS,
        weight_decay=SOAP_WD,
        precondition_frequency=SOAP_FREQ,
        max_precond_dim=SOAP_MAX_DIM,
    )

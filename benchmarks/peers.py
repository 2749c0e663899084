"""The optimizers soapdsl is measured against, built on a list of named parameters.

* torch.optim.AdamW (foreach and fused) and torch.optim.Muon. torch's Muon runs Newton-Schulz
  in bfloat16, which on a CPU is about 60x slower than fp32 matmul, so the comparison uses
  ``torch_muon_fp32``: the same optimizer with ``torch.optim._muon._zeropower_via_newtonschulz``
  replaced, for the duration of its ``step()`` only, by a wrapper that calls torch's own function
  on a view of the update whose ``.bfloat16()`` is an fp32 copy (``torch_ns_in_input_dtype``).
* heavyball's SOAP and Muon (the optional ``bench`` extra). heavyball compiles its kernels with
  torch.compile by default (``heavyball.utils.compile_mode``); ``heavyball_eager()`` turns that
  off for smoke runs. heavyball's Muon rounds its Newton-Schulz input to bfloat16
  (``stochastic_round_``); ``heavyball_muon_fp32`` replaces that rounding, during its step,
  by the identity, so heavyball's own iteration runs in fp32. No peer code is copied here.
* pytorch_optimizer's SOAP (the ``bench`` extra).
* ``SoapV2Ref``: the per-parameter loop reference of SOAP's HEAD form from the test suite.

Each ``make_*`` returns an object with ``step()`` and ``state`` (a torch optimizer, or a thin
wrapper that applies a patch around ``step()``).
"""

from __future__ import annotations

import contextlib
import functools
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


class _NoBf16Cast(torch.Tensor):
    """A tensor whose ``.bfloat16()`` returns a plain copy in its own dtype (see ``torch_ns_in_input_dtype``)."""

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    def bfloat16(self, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        return self.as_subclass(torch.Tensor).clone()


def torch_ns_in_input_dtype(
    grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float
) -> torch.Tensor:
    """torch's own ``torch.optim._muon._zeropower_via_newtonschulz``, run in ``grad``'s dtype.

    torch's function starts with a fresh bf16 copy, ``grad.bfloat16()``; handed a view of ``grad``
    whose ``bfloat16()`` is a fresh copy in grad's dtype, everything after it (the transpose, the
    normalisation, the addmm iteration) is torch's code unchanged, in fp32 (or fp64).
    """
    return _torch_ns()(grad.as_subclass(_NoBf16Cast), ns_coefficients, ns_steps, eps)


# torch.optim.Muon first shipped in torch 2.9; soapdsl itself needs only torch 2.6
HAS_TORCH_MUON = hasattr(torch.optim, "Muon")


def _torch_muon_module() -> Any:
    if not HAS_TORCH_MUON:
        raise RuntimeError(f"torch.optim.Muon needs torch 2.9 or newer; this is torch {torch.__version__}")
    import torch.optim._muon as tm

    return tm


@functools.cache
def _torch_ns() -> Any:
    """torch's Newton-Schulz function itself, kept from before any patch replaces it."""
    return _torch_muon_module()._zeropower_via_newtonschulz


def torch_ns_patch() -> tuple[Any, str, Any]:
    """(module, attribute, replacement) for ``Patched``: torch.optim.Muon with its Newton-Schulz
    in the update's dtype."""
    _torch_ns()
    return (_torch_muon_module(), "_zeropower_via_newtonschulz", torch_ns_in_input_dtype)


def make_torch_muon(named: Named) -> torch.optim.Optimizer:
    """torch.optim.Muon as shipped (bf16 Newton-Schulz); the soapdsl ``muon`` defaults."""
    _torch_muon_module()
    return torch.optim.Muon(_params(named), lr=0.02, weight_decay=0.0, momentum=0.95, nesterov=True)


def make_torch_muon_fp32(named: Named) -> Patched:
    return Patched(make_torch_muon(named), *torch_ns_patch())


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


def _heavyball_keep_fp32(ref: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
    """heavyball's ``stochastic_round_`` without the rounding to bf16 of a lone argument.

    heavyball's ``zeropower_via_newtonschulz5`` calls ``stochastic_round_(G)`` (one argument: round
    to bf16) on its normalised input; with this in its place the iteration runs in G's dtype and
    everything else is heavyball's code. Called with a target (copying into a bf16 parameter), it
    is heavyball's own.
    """
    if source is None:
        return ref
    assert _HB_STOCHASTIC_ROUND is not None
    return _HB_STOCHASTIC_ROUND(ref, source)


_HB_STOCHASTIC_ROUND: Callable[..., torch.Tensor] | None = None  # heavyball's own, kept on first use


def make_heavyball_muon_fp32(named: Named) -> Patched:
    global _HB_STOCHASTIC_ROUND
    import heavyball.utils as hu

    if hu.stochastic_round_ is not _heavyball_keep_fp32:
        _HB_STOCHASTIC_ROUND = hu.stochastic_round_
    return Patched(make_heavyball_muon(named), hu, "stochastic_round_", _heavyball_keep_fp32)


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

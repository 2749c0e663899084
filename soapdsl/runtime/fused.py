"""Lowering of Adam-shaped routes onto torch's fused Adam/AdamW kernels.

A route whose whole pipeline is, stage for stage, what the prelude's ``adam``/``adamw`` macros
and the ``adam`` recipe expand to::

    [decay(wd) | l2(wd)] |> momentum(b1) |> rms_normalize(b2, eps) |> bias_correct(b1) |> lr

computes exactly what ``torch._fused_adamw_`` (with ``decay``) or ``torch._fused_adam_`` (with
``l2``) computes: the decay by ``lr * wd`` or the L2 term added to the gradient, the EMAs,
``eps`` added to the bias-corrected root, the step ``lr / (1 - b1^t)``. So on the CPU and on
CUDA the compiler hands such a route to that kernel: one pass over each parameter instead of one
per foreach stage (about 4x faster than the stage-by-stage path on a 2-core CPU, and
bit-identical to ``torch.optim.AdamW(fused=True)`` / ``torch.optim.Adam(fused=True)`` on the same
device). The CUDA kernel reads the step counts on the device, so the runtime keeps a device copy
of them beside the host-side ``"step"`` tensors.

The match is structural and checked again at every step against the param_group's values:
the bias correction must use the momentum's beta and no second-moment factor, the state dtype
must equal the parameter's, every tensor must be a dense CPU or CUDA tensor, and the gradient
and state must be laid out in memory like the parameter (the kernel pairs elements by memory
position; the moments are allocated in the parameter's layout, as torch.optim's are). Anything
else (a scheduler setting ``beta1`` apart from ``bias_correct``'s, bf16 parameters with fp32
state, so also those of a ``stochastic_round`` route, another device type, a contiguous
gradient set by hand on a channels_last weight, a step size or decay factor past the largest
float16, which the stages check against the parameters' dtypes) runs the stage-by-stage
path, which gives the same numbers up to rounding. A route opts out with ``[fused=false]``; a
``[compile=true]`` route is compiled instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from soapdsl.registry import Op
from soapdsl.runtime.context import DEVICE_OF, DTYPE_OF, FITS_EVERY_DTYPE, GRAD_OF

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_STRIDE = torch.Tensor.stride


@dataclass(frozen=True)
class FusedAdam:
    """The stages of a route that lowers to ``torch._fused_adamw_`` / ``torch._fused_adam_``."""

    decay: Op | None  # decay (decoupled: AdamW) or l2 (coupled: Adam), or None
    momentum: Op
    rms: Op
    bias: Op

    @property
    def kernel(self) -> str:
        """ "adamw" (decoupled decay or none) or "adam" (L2 added to the gradient)."""
        return "adam" if self.decay is not None and self.decay.name == "l2" else "adamw"

    @property
    def state_keys(self) -> tuple[str, str]:
        """Keys of the first and second moment in each parameter's state."""
        return self.momentum.state_key("buf"), self.rms.state_key("v")

    def hyper(self, group: dict[str, Any]) -> dict[str, float] | None:
        """The kernel's arguments for this step, or None when the values leave Adam's shape."""
        beta1 = self.momentum.hp("beta", group)
        if self.bias.hp("beta1", group) != beta1 or self.bias.hp("beta2", group) != 0:
            return None
        hyper = {
            "lr": float(group["lr"]),
            "beta1": float(beta1),
            "beta2": float(self.rms.hp("beta", group)),
            "weight_decay": float(self.decay.hp("weight_decay", group)) if self.decay is not None else 0.0,
            "eps": float(self.rms.hp("eps", group)),
        }
        lr = hyper["lr"]
        # a step size (at most lr / (1 - beta1)) or a decay factor (1 - lr * wd) that a float16
        # may not hold: the stages check it against the parameters' dtypes (ops/lr.py, ops/decay.py),
        # where the kernel would write infinities
        if not lr <= (1.0 - hyper["beta1"]) * FITS_EVERY_DTYPE or (
            self.kernel == "adamw" and not lr * hyper["weight_decay"] <= FITS_EVERY_DTYPE
        ):
            return None
        return hyper


@dataclass
class Tensors:
    """A cohort's tensors as the kernel takes them, aligned with ``params`` (built on first use).

    A cohort's parameters keep their dtype and device while it lives (the layout is built again
    when one changes), and its moments are the optimizer's own tensors, so what the kernel's
    checks read of them is read once, here: the kernel calls, one per device and dtype
    (``calls``), and what each step must find again (``expected``)."""

    params: list[torch.Tensor]
    m: list[torch.Tensor]
    v: list[torch.Tensor]
    host_steps: torch.Tensor  # the cohort's step counters (CPU, 1-D; each state's "step" is a view)
    kernel_steps: list[torch.Tensor]  # what the kernel reads: the states' "step" on CPU, device views on CUDA
    buffers: list[torch.Tensor]  # the device copies' storage, one per CUDA device
    #: per kernel call: the indices of its parameters (None: all of them, in order), and its
    #: parameters, moments and step counters
    calls: list[tuple[list[int] | None, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]]
    #: the dtypes, devices and strides that every gradient and parameter must have at a step for
    #: :meth:`grads` to pass it without :func:`usable`'s loop: the parameters', where they and
    #: their moments pass what that loop asks of them and share their strides; else None
    expected: tuple[list[torch.dtype], list[torch.device], list[tuple[int, ...]]] | None

    @classmethod
    def of(
        cls, params: list[torch.Tensor], states: list[dict[str, Any]], host_steps: torch.Tensor, f: FusedAdam
    ) -> Tensors:
        m_key, v_key = f.state_keys
        buffers, views = device_steps(params)
        kernel = [st["step"] if p.device.type == "cpu" else d for p, st, d in zip(params, states, views, strict=True)]
        m, v = [st[m_key] for st in states], [st[v_key] for st in states]
        by_dtype: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(params):
            by_dtype.setdefault((p.device, p.dtype), []).append(i)
        calls = [
            (
                None if len(by_dtype) == 1 else idx,
                [params[i] for i in idx],
                [m[i] for i in idx],
                [v[i] for i in idx],
                [kernel[i] for i in idx],
            )
            for idx in by_dtype.values()
        ]
        strides = list(map(_STRIDE, params))
        expected = None
        if (
            list(map(_STRIDE, m)) == strides
            and list(map(_STRIDE, v)) == strides
            and all(
                p.dtype in _DTYPES
                and mp.dtype is p.dtype
                and vp.dtype is p.dtype
                and (p.is_cpu or p.is_cuda)
                and mp.device == p.device
                and vp.device == p.device
                for p, mp, vp in zip(params, m, v, strict=True)
            )
        ):
            expected = (list(map(DTYPE_OF, params)), list(map(DEVICE_OF, params)), strides)
        return cls(params, m, v, host_steps, kernel, buffers, calls, expected)

    def grads(self) -> list[torch.Tensor] | None:
        """The parameters' gradients when the kernel can take this step (:func:`usable`), else None.

        This runs at every step of every fused route: where each gradient has its parameter's
        dtype, device and strides and each parameter the strides it had (a ``p.data = ...`` may
        lay it out anew), four passes of C-level ``map`` over the cohort say so, about a third
        of :func:`usable`'s loop; anything else is left to that loop. (A sparse gradient never
        gets here: the step's layout, built again when a gradient's layout changes, refuses it.)"""
        grads = list(map(GRAD_OF, self.params))
        if self.expected is not None:
            dtypes, devices, strides = self.expected
            try:
                if (
                    list(map(DTYPE_OF, grads)) == dtypes
                    and list(map(_STRIDE, grads)) == strides
                    and list(map(_STRIDE, self.params)) == strides
                    and list(map(DEVICE_OF, grads)) == devices
                ):
                    return grads
            except (AttributeError, RuntimeError):  # a gradient set to None, a layout without strides
                pass
        return grads if usable(self.params, self.m, self.v) else None

    def advance(self, t: int) -> None:
        """Count step ``t`` on the host and on every device."""
        self.host_steps.add_(1.0)
        for buf in self.buffers:
            buf.fill_(float(t))


def match(ops: list[Op], options: dict[str, Any]) -> FusedAdam | None:
    """The fused form of a route's top-level stages, if they are exactly Adam's."""
    if options.get("fused") is False or options.get("compile"):
        return None
    stages = list(ops)
    decay = stages.pop(0) if stages and stages[0].name in ("decay", "l2") else None
    if [op.name for op in stages] != ["momentum", "rms_normalize", "bias_correct", "lr"]:
        return None
    momentum, rms, bias, _ = stages
    a = momentum.args
    if decay is not None and decay.name == "decay" and not decay.args.lr_scaled:  # type: ignore[attr-defined]
        return None
    if a.kind != "ema" or a.nesterov:  # type: ignore[attr-defined]
        return None
    r = rms.args
    if (
        r.eps_at != "corrected"  # type: ignore[attr-defined]
        or not r.correct  # type: ignore[attr-defined]
        or r.power != 1.0  # type: ignore[attr-defined]
        or r.whiten_grad  # type: ignore[attr-defined]
    ):
        return None
    if not bias.args.enabled:  # type: ignore[attr-defined]
        return None
    return FusedAdam(decay, momentum, rms, bias)


def usable(params: list[torch.Tensor], m: list[torch.Tensor], v: list[torch.Tensor]) -> bool:
    """Whether the kernel can take this step: dense CPU or CUDA tensors, gradients and state in
    the parameters' dtype, on their device and in their memory layout (checked every step: a
    gradient's dtype may change under autocast, and a gradient set by hand may be laid out
    otherwise than its parameter). A parameter resized in place never gets here: its layout is
    built again, and that refuses it (``SoapOptimizer._check_state_fits``). This runs on every
    step of every fused route, so it reads each attribute once and compares strides as tuples
    first (see ``same_layout`` for the rest)."""
    for p, mp, vp in zip(params, m, v, strict=True):
        g = p.grad
        if g is None or g.is_sparse:
            return False
        dt = p.dtype
        if dt not in _DTYPES or g.dtype is not dt or mp.dtype is not dt or vp.dtype is not dt:
            return False
        if p.is_cpu:
            if not (g.is_cpu and mp.is_cpu and vp.is_cpu):
                return False
        elif p.is_cuda:
            dev = p.get_device()
            if not (g.is_cuda and mp.is_cuda and vp.is_cuda) or not (
                g.get_device() == dev and mp.get_device() == dev and vp.get_device() == dev
            ):
                return False
        else:
            return False
        s = mp.stride()
        if (p.stride() != s or g.stride() != s or vp.stride() != s) and not (
            same_layout(p, mp) and same_layout(g, mp) and same_layout(vp, mp)
        ):
            return False
    return True


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (of one shape) put every element at the same offset of their
    memory. The kernel pairs the tensors of a parameter element by element in memory order,
    not by index: a contiguous gradient on a channels_last weight would be added to the wrong
    entries. Strides of dims of size 1 never move an element, so they are not compared (autograd
    may hand out either). The state tensors are dense (allocated like the parameter, see
    ``SoapOptimizer._new_state``), so a tensor laid out like them is dense too."""
    return all(n == 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride(), strict=True))


def device_steps(params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-device buffers for the kernel's step counts on CUDA, and one 0-d view of them per
    parameter in ``params`` order (a CPU parameter's view is empty: the kernel takes the state's
    own counter there). The runtime fills each buffer with the step number before a step, one
    launch per device, so the copy can never fall behind the host counter."""
    by_device: dict[torch.device, list[int]] = {}
    for i, p in enumerate(params):
        if p.device.type != "cpu":
            by_device.setdefault(p.device, []).append(i)
    buffers, views = [], [torch.empty(0)] * len(params)
    for dev, idx in by_device.items():
        buf = torch.zeros(len(idx), dtype=torch.float32, device=dev)
        buffers.append(buf)
        for j, i in enumerate(idx):
            views[i] = buf[j]
    return buffers, views


def step(f: FusedAdam, ts: Tensors, grads: list[torch.Tensor], hyper: dict[str, float]) -> None:
    """One Adam(W) step of every parameter of ``ts`` with ``grads`` (the step counters already
    advanced), one kernel call per device and dtype."""
    kernel = torch._fused_adamw_ if f.kernel == "adamw" else torch._fused_adam_
    for idx, params, m, v, steps in ts.calls:
        kernel(
            params,
            grads if idx is None else [grads[i] for i in idx],
            m,
            v,
            [],
            steps,
            lr=hyper["lr"],
            beta1=hyper["beta1"],
            beta2=hyper["beta2"],
            weight_decay=hyper["weight_decay"],
            eps=hyper["eps"],
            amsgrad=False,
            maximize=False,
        )

"""Interleaved step timing and state-byte accounting.

A *group* holds comparable optimizers over one parameter subset. Each is built on its own copy
of the same initial parameters, takes ``warmup`` untimed-for-the-results steps (compilation,
the first-step initialisation, the first basis refresh), and then the group runs in *rounds*:
in round r every optimizer takes ``steps_per_round`` steps (one whole refresh period, or a fixed
count for refresh-free optimizers), in an order rotated by r, so slow drift of the machine
(other jobs, thermal state) hits every optimizer alike. Before each step the same pool gradient
is copied into ``.grad`` outside the timed region; only ``opt.step()`` is timed.

On a GPU (``Group.device``), the device is synchronised before and after each timed step, so a
step's time is the host's launch work and the device's kernels, whichever is longer.

Per optimizer: the median step time, and the amortised time = total time of the timed rounds /
their steps (whole refresh periods, so a periodic refresh is counted at its true rate; for a
refresh-free optimizer this is the mean).
"""

from __future__ import annotations

import gc
import resource
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.params import GradPool

Named = list[tuple[str, torch.nn.Parameter]]
Shapes = list[tuple[str, tuple[int, ...]]]


@dataclass
class Entry:
    label: str
    make: Callable[[Named], Any]
    #: closed-form state bytes for the group's shapes (soapdsl recipes), or None
    formula: Callable[[Shapes], int] | None = None
    #: label of the eager entry this compiled one must match numerically
    matches: str | None = None
    note: str = ""


@dataclass
class Group:
    key: str
    title: str
    subset: str  # "all" or "hidden"
    entries: list[Entry]
    steps_per_round: int
    warmup: int
    rounds: int
    #: (soapdsl label, peer label) pairs whose ratio is reported
    ratios: list[tuple[str, str]] = field(default_factory=list)
    device: str = "cpu"
    params: str = "gpt"  # the parameter set (benchmarks/params.py): "gpt" or "many"


@dataclass
class Result:
    label: str
    note: str = ""
    times: list[float] = field(default_factory=list)  # timed steps (s)
    warmup_times: list[float] = field(default_factory=list)
    build_s: float = 0.0
    state_bytes: int | None = None
    plan_bytes: int | None = None
    formula_bytes: int | None = None
    match: str | None = None  # compiled vs eager check
    faults: int = 0  # minor page faults during the timed steps
    error: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")

    @property
    def amortised(self) -> float:
        return sum(self.times) / len(self.times) if self.times else float("nan")

    @property
    def faults_per_step(self) -> float:
        return self.faults / len(self.times) if self.times else float("nan")

    @property
    def warmup_extra(self) -> float:
        """Warm-up time beyond what the same steps cost when warm (compilation, first-step work)."""
        if not self.warmup_times or not self.times:
            return float("nan")
        return sum(self.warmup_times) - len(self.warmup_times) * self.amortised


def tensor_state_bytes(state: Any) -> int:
    """Bytes of every tensor reachable from an optimizer's ``state`` (dicts, lists, tuples),
    excluding 0-d tensors (step counters); a tensor reachable twice counts once."""
    seen: set[tuple[int, tuple[int, ...], tuple[int, ...]]] = set()
    total = 0

    def walk(v: Any) -> None:
        nonlocal total
        if torch.is_tensor(v):
            if v.dim() == 0:
                return
            key = (v.data_ptr(), tuple(v.shape), tuple(v.stride()))
            if key not in seen:
                seen.add(key)
                total += v.numel() * v.element_size()
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list | tuple):
            for x in v:
                walk(x)

    walk(dict(state) if not isinstance(state, dict) else state)
    return total


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one ``fn()``, with the device's queued work drained before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def timed_step(opt: Any, device: torch.device) -> float:
    """Seconds of one ``opt.step()`` (see :func:`timed`)."""
    return timed(opt.step, device)


class Live:
    """One entry's optimizer on a fresh copy of the pool's parameters, stepping through the pool's
    gradients; ``step`` times one ``opt.step()`` and can count its minor page faults."""

    def __init__(self, entry: Entry, pool: GradPool) -> None:
        self.entry = entry
        self.pool = pool
        self.result = Result(entry.label, entry.note)
        self.named: Named = pool.make_params()
        self.k = 0
        t0 = time.perf_counter()
        self.opt = entry.make(self.named)
        self.result.build_s = time.perf_counter() - t0

    def step(self, count_faults: bool = False) -> float:
        self.pool.load(self.named, self.k)
        self.k += 1
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        dt = timed_step(self.opt, self.pool.device)
        if count_faults:
            self.result.faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        return dt


def _compare(a: Named, b: Named, init: dict[str, torch.Tensor]) -> str:
    """Compiled vs eager after the same steps: allclose(rtol=1e-5, atol=1e-7), and how far off
    the worst tensor is, relative to how far that tensor has moved from its initial value."""
    ok = all(torch.allclose(p, q, rtol=1e-5, atol=1e-7) for (_, p), (_, q) in zip(a, b, strict=True))
    worst, name, rel, count = 0.0, "", 0.0, 0
    for (n, p), (_, q) in zip(a, b, strict=True):
        d = (p - q).detach().abs()
        count += int((d > 1e-6).sum())
        m = float(d.max())
        if m > worst:
            moved = float((p - init[n]).detach().abs().max())
            worst, name, rel = m, n, m / moved if moved > 0 else float("inf")
    if ok:
        return f"match (max |diff| {worst:.1e})"
    return (
        f"MISMATCH at rtol 1e-5/atol 1e-7: max |diff| {worst:.1e} in {name} ({rel:.1e} of that tensor's"
        f" largest movement), {count} elements off by more than 1e-6"
    )


def _sensitivity(entry: Entry, pool: GradPool, steps: int) -> str:
    """How far the eager optimizer drifts from itself when each gradient is perturbed by
    relative noise of one fp32 rounding (2^-24): the scale a compiled kernel's different
    rounding is to be judged against."""
    clean, noisy = pool.make_params(), pool.make_params()
    a, b = entry.make(clean), entry.make(noisy)
    g = torch.Generator().manual_seed(0)
    for k in range(steps):
        pool.load(clean, k)
        pool.load(noisy, k)
        for _, p in noisy:
            assert p.grad is not None
            p.grad.mul_(1 + 2.0**-24 * torch.randn(p.grad.shape, generator=g).to(p.grad.device))
        a.step()
        b.step()
    return _compare(clean, noisy, pool.init)


def run_group(group: Group, log: Callable[[str], None] = print) -> list[Result]:
    pool = GradPool(group.subset, device=group.device, params=group.params)
    live: list[Live] = []
    failed: list[Result] = []
    for e in group.entries:
        try:
            live.append(Live(e, pool))
        except Exception as exc:  # a peer that cannot be built here: report it, go on
            failed.append(Result(e.label, e.note, error=f"build: {type(exc).__name__}: {exc}"))
            log(f"  [{group.key}] {e.label}: cannot build: {exc}")

    def guarded(lv: Live, n: int, into: list[float]) -> None:
        try:
            for _ in range(n):
                into.append(lv.step(count_faults=into is lv.result.times))
        except Exception as exc:
            lv.result.error = f"step {lv.k}: {type(exc).__name__}: {exc}"
            log(f"  [{group.key}] {lv.entry.label}: failed: {exc}")
            log(traceback.format_exc(limit=3))

    gc.collect()
    gc.disable()
    try:
        for lv in live:
            t0 = time.perf_counter()
            guarded(lv, group.warmup, lv.result.warmup_times)
            log(f"  [{group.key}] warm-up {lv.entry.label}: {time.perf_counter() - t0:.1f} s")
        by_label = {lv.entry.label: lv for lv in live}
        for lv in live:
            ref = by_label.get(lv.entry.matches or "")
            if ref is not None and lv.result.error is None and ref.result.error is None:
                verdict = _compare(lv.named, ref.named, pool.init)
                lv.result.match = f"after {group.warmup} steps: {verdict}"
                if verdict.startswith("MISMATCH"):
                    own = _sensitivity(ref.entry, pool, group.warmup)
                    lv.result.match += f"; eager against itself with 2^-24 gradient noise: {own}"
        for r in range(group.rounds):
            ok = [lv for lv in live if lv.result.error is None]
            order = ok[r % len(ok) :] + ok[: r % len(ok)] if ok else []
            for lv in order:
                guarded(lv, group.steps_per_round, lv.result.times)
                gc.collect()
            log(f"  [{group.key}] round {r + 1}/{group.rounds} done")
    finally:
        gc.enable()
    shapes = pool.shapes
    for lv in live:
        res = lv.result
        res.state_bytes = tensor_state_bytes(lv.opt.state)
        plan = getattr(lv.opt, "plan", None)
        if plan is not None:
            res.plan_bytes = plan.state_bytes()
        if lv.entry.formula is not None:
            res.formula_bytes = lv.entry.formula(shapes)
    return [lv.result for lv in live] + failed

"""Where a step's time goes: torch.profiler over whole refresh periods of one optimizer.

Reports per step: wall time, time inside aten ops (the sum of their self times), the rest
(Python and dispatch overhead plus the profiler's own), the number of aten calls, and the top
ops by self time, with matmuls, linear algebra, foreach kernels and copies named as such.

On a GPU the time of an aten op is the device time of the kernels it launched (its self CUDA
time), so "inside aten ops" is the time the GPU is busy and the rest is the host's launch and
Python work that the GPU waits on.
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.params import GradPool
from benchmarks.runner import timed_step

CATEGORIES = [
    ("matmul (mm/bmm/addmm/baddbmm)", ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::matmul")),
    (
        "linalg (eigh/qr)",
        ("aten::linalg_eigh", "aten::linalg_qr", "aten::_linalg_eigh", "aten::geqrf", "aten::orgqr", "aten::triu"),
    ),
    ("copies (stack/cat/copy/clone/to)", ("aten::stack", "aten::cat", "aten::copy_", "aten::clone", "aten::_to_copy")),
    ("reorder (gather/index_select/argsort)", ("aten::gather", "aten::index_select", "aten::argsort", "aten::sort")),
]
# on a CPU a torch._foreach_* op is a loop over per-tensor kernels: its time shows up as the
# per-tensor ops (aten::lerp_, aten::addcmul_, ...), which land in "elementwise and other"


def category(name: str) -> str:
    for cat, prefixes in CATEGORIES:
        if name.startswith(prefixes):
            return cat
    return "elementwise and other"


@dataclass
class Profile:
    label: str
    steps: int
    device: str  # "cpu" or "cuda"
    wall_ms: float  # per step, under the profiler
    plain_ms: float  # per step, same steps without the profiler
    aten_ms: float  # per step, sum of self times
    calls: float  # aten calls per step
    faults: float  # minor page faults per step (fresh memory: large temporaries freed back to the OS)
    top: list[tuple[str, float, float]] = field(default_factory=list)  # name, ms/step, calls/step
    categories: dict[str, float] = field(default_factory=dict)  # ms/step

    @property
    def overhead_ms(self) -> float:
        return max(self.wall_ms - self.aten_ms, 0.0)


def profile_optimizer(
    label: str,
    make: Callable[[list[tuple[str, torch.nn.Parameter]]], Any],
    subset: str,
    warmup: int,
    steps: int,
    tries: int = 3,
    device: str = "cpu",
) -> Profile:
    """Profile ``steps`` steps after ``warmup``; when the profiled wall time is far above the
    plain one (another process took the CPU), try again and keep the least disturbed try."""
    best: Profile | None = None
    for _ in range(tries):
        p = _profile_once(label, make, subset, warmup, steps, device)
        if best is None or p.wall_ms / p.plain_ms < best.wall_ms / best.plain_ms:
            best = p
        if best.wall_ms <= 1.25 * best.plain_ms:
            break
    assert best is not None
    return best


def _profile_once(
    label: str,
    make: Callable[[list[tuple[str, torch.nn.Parameter]]], Any],
    subset: str,
    warmup: int,
    steps: int,
    device: str,
) -> Profile:
    pool = GradPool(subset, device=device)
    dev = pool.device
    gpu = dev.type == "cuda"
    named = pool.make_params()
    opt = make(named)
    k = 0
    for _ in range(warmup):
        pool.load(named, k)
        opt.step()
        k += 1
    plain = 0.0
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        pool.load(named, k)
        plain += timed_step(opt, dev)
        k += 1
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / steps
    wall = 0.0
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if gpu else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            pool.attach(named, k)  # no copy under the profiler: only step()'s ops are seen
            wall += timed_step(opt, dev)
            k += 1
    rows = []
    aten = 0.0
    calls = 0
    cats: dict[str, float] = {}
    for ev in prof.key_averages():
        if not ev.key.startswith("aten::"):
            continue
        self_ms = (ev.self_device_time_total if gpu else ev.self_cpu_time_total) / 1000.0
        rows.append((ev.key, self_ms, ev.count))
        aten += self_ms
        calls += ev.count
        cat = category(ev.key)
        cats[cat] = cats.get(cat, 0.0) + self_ms
    rows.sort(key=lambda r: -r[1])
    return Profile(
        label=label,
        steps=steps,
        device=dev.type,
        wall_ms=wall / steps * 1000.0,
        plain_ms=plain / steps * 1000.0,
        aten_ms=aten / steps,
        calls=calls / steps,
        faults=faults,
        top=[(n, ms / steps, c / steps) for n, ms, c in rows[:8]],
        categories={k: v / steps for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
    )


def count_matmul_flops(
    make: Callable[[list[tuple[str, torch.nn.Parameter]]], Any], subset: str, warmup: int, steps: int
) -> float:
    """Matmul flops per step that an optimizer actually executes (mm, bmm, addmm, baddbmm, ...,
    as torch.utils.flop_counter counts them; QR and eigh are not counted), over ``steps`` steps
    after ``warmup`` (a whole refresh period, so a refresh counts at its rate)."""
    from torch.utils.flop_counter import FlopCounterMode

    pool = GradPool(subset)
    named = pool.make_params()
    opt = make(named)
    for k in range(warmup):
        pool.load(named, k)
        opt.step()
    with FlopCounterMode(display=False) as counter:
        for k in range(warmup, warmup + steps):
            pool.attach(named, k)
            opt.step()
    return counter.get_total_flops() / steps

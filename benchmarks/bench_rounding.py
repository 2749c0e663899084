"""What stochastic rounding of bfloat16 parameters costs a step.

    python -m benchmarks.bench_rounding [--recipes adamw,soap] [--rounds 5] [--device cpu|cuda]
                                        [--no-heavyball] [--heavyball-compiled]

On the benchmark's GPT-like parameter set (benchmarks/params.py) held in bfloat16, each recipe
steps twice over: writing its parameters rounded to nearest (the default) and with
``stochastic_round=True``. Beside them, heavyball's AdamW, which rounds its bfloat16 writes
stochastically on its own (eager unless ``--heavyball-compiled``: compiling takes minutes on a
CPU). Every optimizer starts from the same parameters and steps on the same gradients; the
group runs in rounds, each optimizer taking one refresh period of steps (10) per round in an
order rotated by the round, so drift hits all alike. Only ``opt.step()`` is timed. Reported:
the median step time of each, and the ratios stochastic / nearest and soapdsl / heavyball.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import soapdsl  # noqa: E402
from benchmarks import peers  # noqa: E402
from benchmarks.options import at_least  # noqa: E402
from benchmarks.params import gpt_shapes  # noqa: E402
from benchmarks.runner import timed_step  # noqa: E402

STEPS = 10  # a step per round of this many: one refresh period of soap (freq 10)
WARMUP = 12  # past the first refresh


def _named(device: torch.device) -> list[tuple[str, torch.nn.Parameter]]:
    gen = torch.Generator().manual_seed(0)
    return [
        (n, torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device, torch.bfloat16)))
        for n, s in gpt_shapes()
    ]


def _entries(recipes: list[str], heavyball: bool) -> dict[str, Callable[[Any], Any]]:
    out: dict[str, Callable[[Any], Any]] = {}
    for r in recipes:
        # the refresh period and max_dim of the main benchmark (bench_step.py)
        kw: dict[str, Any] = {"freq": 10, "max_dim": 2048} if r in ("soap", "soap_muon", "shampoo") else {}
        out[f"soapdsl {r} nearest"] = partial(soapdsl.build, r, **kw)
        out[f"soapdsl {r} stochastic"] = partial(soapdsl.build, r, stochastic_round=True, **kw)
    if heavyball:
        import heavyball as hb

        out["heavyball AdamW"] = lambda named: hb.AdamW(
            [p for _, p in named], lr=3e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", default="adamw,soap")
    ap.add_argument("--rounds", type=at_least(1), default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-heavyball", action="store_true", help="leave heavyball's AdamW out")
    ap.add_argument("--heavyball-compiled", action="store_true", help="heavyball's kernels through torch.compile")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    heavyball = not args.no_heavyball and peers.available("heavyball")
    if heavyball and not args.heavyball_compiled:
        peers.heavyball_eager()
    gen = torch.Generator().manual_seed(1)
    shapes = gpt_shapes()
    grads = [[torch.randn(s, generator=gen).to(device, torch.bfloat16) for _, s in shapes] for _ in range(2)]
    live: list[tuple[str, Any, Any, list[float]]] = []
    for label, make in _entries(args.recipes.split(","), heavyball).items():
        named = _named(device)
        live.append((label, named, make(named), []))

    def step(named: Any, opt: Any, k: int) -> float:
        for (_, p), g in zip(named, grads[k % 2], strict=True):
            p.grad = g.clone()
        return timed_step(opt, device)

    for label, named, opt, _ in live:
        for k in range(WARMUP):
            step(named, opt, k)
        print(f"warm-up {label}: done", file=sys.stderr)
    for r in range(args.rounds):
        for i in range(len(live)):
            label, named, opt, times = live[(i + r) % len(live)]
            times.extend(step(named, opt, WARMUP + r * STEPS + k) for k in range(STEPS))
    median = {label: statistics.median(times) * 1e3 for label, _, _, times in live}
    n = sum(p.numel() for _, p in live[0][1])
    print(f"bf16 parameters: {len(shapes)} tensors, {n / 1e6:.2f} M elements; device {device};")
    print(f"{args.rounds} rounds of {STEPS} steps after {WARMUP} warm-up steps; median step time")
    print("| optimizer | median ms | ratio |")
    print("|---|---|---|")
    for label, ms in median.items():
        ratio = ""
        if label.endswith("stochastic"):
            ratio = f"{ms / median[label.replace('stochastic', 'nearest')]:.2f}x its nearest"
            if heavyball and label == "soapdsl adamw stochastic":
                ratio += f", {ms / median['heavyball AdamW']:.2f}x heavyball AdamW"
        print(f"| {label} | {ms:.1f} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

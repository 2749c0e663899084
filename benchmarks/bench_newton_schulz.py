"""Newton-Schulz alone: the plain standard form, the standard form by halves, and the Gram form.

    python -m benchmarks.bench_newton_schulz [--device cpu|cuda] [--sizes 256x1024,1024x4096]
                                             [--batch 4] [--reps 10] [--tf32]

Times soapdsl's batched kernel (Muon's 5 quintic steps, fp32) on ``batch`` matrices of each
size in three ways, interleaved rep by rep so drift hits all alike: ``form=standard`` with its
symmetric products whole ("plain"), ``form=standard`` as it runs by default (by halves where
``halves_pay``: on a CPU from 256 rows), and ``form=gram`` (the Gram form where it counts fewer
flops). It reports which form runs, the median times and flop counts relative to the plain
form, and each one's error against a float64 run. The flop ratio is the bound; small matrices
on a GPU are bound by kernel launches instead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.options import at_least  # noqa: E402
from benchmarks.runner import timed  # noqa: E402
from soapdsl.ops import _linalg  # noqa: E402

COEFFS = (3.4445, -4.7750, 2.0315)
STEPS = 5
VARIANTS = ("plain", "standard", "gram")


@contextmanager
def _no_halves() -> Iterator[None]:
    saved = _linalg.HALVES_MIN_ROWS
    _linalg.HALVES_MIN_ROWS = sys.maxsize
    try:
        yield
    finally:
        _linalg.HALVES_MIN_ROWS = saved


def _run(g: torch.Tensor, variant: str) -> torch.Tensor:
    if variant == "plain":
        with _no_halves():
            return _linalg.newton_schulz(g, STEPS, COEFFS, 0, 1e-7, "clamp")
    return _linalg.newton_schulz(g, STEPS, COEFFS, 0, 1e-7, "clamp", form=variant)


def _runs(g: torch.Tensor) -> dict[str, str]:
    """What each variant runs on ``g`` (wide or tall [B, r, c])."""
    short, long_ = sorted(g.shape[-2:])
    wide = g if g.size(-2) <= g.size(-1) else g.mT
    standard = "halves" if _linalg.halves_pay(wide) else "plain"
    gram = "Gram" if _linalg.gram_pays(short, long_, STEPS, 0, 3) else standard
    return {"plain": "plain", "standard": standard, "gram": gram}


def _flops(short: int, long_: int, runs: str) -> int:
    form = {"plain": "standard", "halves": "halved", "Gram": "gram"}[runs]
    return _linalg.newton_schulz_flops(short, long_, STEPS, 0, form)


def measure(r: int, c: int, batch: int, reps: int, device: str) -> dict[str, float | str]:
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(batch, r, c, generator=gen).to(device)
    with _no_halves():
        exact = _run(g.double(), "plain")
    out: dict[str, float | str] = {}
    for v in VARIANTS:
        got = _run(g, v).double()
        out[f"err_{v}"] = float((got - exact).abs().max() / exact.abs().max())
        _run(g, v)  # warm-up
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(reps):
        order = VARIANTS[i % len(VARIANTS) :] + VARIANTS[: i % len(VARIANTS)]
        for v in order:
            times[v].append(timed(partial(_run, g, v), g.device))
    short, long_ = sorted((r, c))
    runs = _runs(g)
    for v in VARIANTS:
        out[f"ms_{v}"] = statistics.median(times[v]) * 1e3
        out[f"runs_{v}"] = runs[v]
        out[f"flops_{v}"] = _flops(short, long_, runs[v]) / _flops(short, long_, "plain")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_newton_schulz", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sizes", default="256x1024,512x2048,1024x4096", help="comma-separated RxC")
    ap.add_argument("--batch", type=at_least(1), default=4)
    ap.add_argument("--reps", type=at_least(1), default=10)
    ap.add_argument("--tf32", action="store_true", help="torch.set_float32_matmul_precision('high')")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device here")
    sizes = []
    for size in args.sizes.split(","):
        dims = size.lower().split("x")
        if len(dims) != 2 or not all(d.strip().isdigit() and int(d) > 0 for d in dims):
            ap.error(f"--sizes: expected RxC[,RxC...] like 256x1024, got {size!r}")
        sizes.append((int(dims[0]), int(dims[1])))
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{where}; torch {torch.__version__}; fp32 matmul precision {torch.get_float32_matmul_precision()}")
    print(f"{STEPS} quintic steps, batch {args.batch}, median of {args.reps} interleaved reps")
    print()
    print(
        "| size | default runs | form=gram runs | plain ms | default ms (flops) | form=gram ms (flops)"
        " | error plain | error default | error form=gram |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r, c in sizes:
        m = measure(r, c, args.batch, args.reps, args.device)
        plain = float(m["ms_plain"])
        cells = {
            v: f"{float(m[f'ms_{v}']):.2f} = {float(m[f'ms_{v}']) / plain:.2f}x ({float(m[f'flops_{v}']):.2f}x)"
            for v in ("standard", "gram")
        }
        print(
            f"| {args.batch} x {r} x {c} | {m['runs_standard']} | {m['runs_gram']} | {plain:.2f} |"
            f" {cells['standard']} | {cells['gram']} |"
            f" {m['err_plain']:.1e} | {m['err_standard']:.1e} | {m['err_gram']:.1e} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

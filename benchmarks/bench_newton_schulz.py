"""Newton-Schulz alone: the plain iteration, the iteration by halves, the spectral evaluation
and the Gram form.

    python -m benchmarks.bench_newton_schulz [--device cpu|cuda] [--sizes 256x1024,1024x4096]
                                             [--steps 5] [--cleanup 0] [--batch 4] [--reps 10] [--tf32]

Times soapdsl's batched kernel (fp32; Muon's 5 quintic steps by default, SOAP-Muon's with
``--steps 10 --cleanup 2``) on ``batch`` matrices of each size in four ways, interleaved rep by
rep so drift hits all alike: ``form=standard`` iterated with its symmetric products whole
("plain"), ``form=standard`` iterated as it runs by default (by halves where ``halves_pay``: on
a CPU from 256 rows), ``form=standard`` as it runs by default (spectrally where
``spectral_pays``: on a CPU, many steps on rectangular matrices), and ``form=gram`` (the Gram
form where it counts fewer flops). It reports which form runs, the median times and flop
counts relative to the plain form (the spectral evaluation's eigh is not a flop count: it shows
as "-"), and each one's error against a float64 run. The flop ratio is the bound; small
matrices on a GPU are bound by kernel launches instead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.options import at_least  # noqa: E402
from benchmarks.runner import timed  # noqa: E402
from soapdsl.ops import _linalg  # noqa: E402

COEFFS = (3.4445, -4.7750, 2.0315)
VARIANTS = ("plain", "iterate", "standard", "gram")


@contextmanager
def _without(*names: str) -> Iterator[None]:
    """Switch off the halved form and/or the spectral evaluation (their row thresholds)."""
    saved = {n: getattr(_linalg, n) for n in names}
    for n in names:
        setattr(_linalg, n, sys.maxsize)
    try:
        yield
    finally:
        for n, v in saved.items():
            setattr(_linalg, n, v)


def _run(g: torch.Tensor, variant: str, steps: int, cleanup: int) -> torch.Tensor:
    if variant in ("plain", "iterate"):
        off = ("HALVES_MIN_ROWS", "SPECTRAL_MIN_ROWS") if variant == "plain" else ("SPECTRAL_MIN_ROWS",)
        with _without(*off):
            return _linalg.newton_schulz(g, steps, COEFFS, cleanup, 1e-7, "clamp")
    return _linalg.newton_schulz(g, steps, COEFFS, cleanup, 1e-7, "clamp", form=variant)


def _runs(g: torch.Tensor, steps: int, cleanup: int) -> dict[str, str]:
    """What each variant runs on ``g`` (wide or tall [B, r, c])."""
    short, long_ = sorted(g.shape[-2:])
    wide = g if g.size(-2) <= g.size(-1) else g.mT
    iterate = "halves" if _linalg.halves_pay(wide) else "plain"
    standard = "spectral" if _linalg.spectral_pays(wide, steps, cleanup) else iterate
    gram = "Gram" if _linalg.gram_pays(short, long_, steps, cleanup, 3) else standard
    return {"plain": "plain", "iterate": iterate, "standard": standard, "gram": gram}


def _flops(short: int, long_: int, runs: str, steps: int, cleanup: int) -> int | None:
    if runs == "spectral":
        return None
    form = {"plain": "standard", "halves": "halved", "Gram": "gram"}[runs]
    return _linalg.newton_schulz_flops(short, long_, steps, cleanup, form)


def measure(r: int, c: int, batch: int, reps: int, device: str, steps: int = 5, cleanup: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(batch, r, c, generator=gen).to(device)
    exact = _run(g.double(), "plain", steps, cleanup)
    out: dict[str, Any] = {}
    for v in VARIANTS:
        got = _run(g, v, steps, cleanup).double()
        out[f"err_{v}"] = float((got - exact).abs().max() / exact.abs().max())
        _run(g, v, steps, cleanup)  # warm-up
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(reps):
        order = VARIANTS[i % len(VARIANTS) :] + VARIANTS[: i % len(VARIANTS)]
        for v in order:
            times[v].append(timed(partial(_run, g, v, steps, cleanup), g.device))
    short, long_ = sorted((r, c))
    runs = _runs(g, steps, cleanup)
    plain = _flops(short, long_, "plain", steps, cleanup)
    for v in VARIANTS:
        out[f"ms_{v}"] = statistics.median(times[v]) * 1e3
        out[f"runs_{v}"] = runs[v]
        flops = _flops(short, long_, runs[v], steps, cleanup)
        out[f"flops_{v}"] = None if flops is None or plain is None else flops / plain
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_newton_schulz", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sizes", default="256x1024,512x2048,1024x4096", help="comma-separated RxC")
    ap.add_argument("--steps", type=at_least(0), default=5, help="quintic steps (Muon 5, SOAP-Muon 10)")
    ap.add_argument("--cleanup", type=at_least(0), default=0, help="cubic steps after them (SOAP-Muon 2)")
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
    print(
        f"{args.steps} quintic + {args.cleanup} cubic steps, batch {args.batch}, median of {args.reps} interleaved reps"
    )
    print()
    print(
        "| size | iterated runs | default runs | form=gram runs | plain ms | iterated ms (flops)"
        " | default ms (flops) | form=gram ms (flops) | error plain | error iterated | error default"
        " | error form=gram |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r, c in sizes:
        m = measure(r, c, args.batch, args.reps, args.device, args.steps, args.cleanup)
        plain = float(m["ms_plain"])
        cells = {}
        for v in ("iterate", "standard", "gram"):
            ms, flops = float(m[f"ms_{v}"]), m[f"flops_{v}"]
            cells[v] = f"{ms:.2f} = {ms / plain:.2f}x ({'-' if flops is None else f'{flops:.2f}x'})"
        print(
            f"| {args.batch} x {r} x {c} | {m['runs_iterate']} | {m['runs_standard']} | {m['runs_gram']}"
            f" | {plain:.2f} |"
            f" {cells['iterate']} | {cells['standard']} | {cells['gram']} |"
            f" {m['err_plain']:.1e} | {m['err_iterate']:.1e} | {m['err_standard']:.1e} | {m['err_gram']:.1e} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

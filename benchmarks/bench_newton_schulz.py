"""Newton-Schulz alone: the standard form against the Gram form (``newton_schulz(form=gram)``).

    python -m benchmarks.bench_newton_schulz [--device cpu|cuda] [--sizes 256x1024,1024x4096]
                                             [--batch 4] [--reps 10] [--tf32]

Times soapdsl's batched kernel (Muon's 5 quintic steps, fp32) on ``batch`` matrices of each
size with ``form=standard`` and ``form=gram``, interleaved rep by rep so drift hits both alike,
and reports which form ``form=gram`` runs at that size (the Gram form only where it counts
fewer flops), the median times, their ratio, the flop ratio, and each one's error against a
float64 run of the standard form. It shows where the Gram form pays: the flop ratio is the bound, and small
matrices on a GPU are bound by kernel launches instead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.runner import timed  # noqa: E402
from soapdsl.ops._linalg import gram_pays, newton_schulz, newton_schulz_flops  # noqa: E402

COEFFS = (3.4445, -4.7750, 2.0315)
STEPS = 5
FORMS = ("standard", "gram")


def _run(g: torch.Tensor, form: str) -> torch.Tensor:
    return newton_schulz(g, STEPS, COEFFS, 0, 1e-7, "clamp", form=form)


def measure(r: int, c: int, batch: int, reps: int, device: str) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(batch, r, c, generator=gen).to(device)
    exact = _run(g.double(), "standard")
    out: dict[str, float] = {}
    for form in FORMS:
        got = _run(g, form).double()
        out[f"err_{form}"] = float((got - exact).abs().max() / exact.abs().max())
        _run(g, form)  # warm-up
    times: dict[str, list[float]] = {form: [] for form in FORMS}
    for i in range(reps):
        for form in FORMS if i % 2 == 0 else FORMS[::-1]:
            times[form].append(timed(partial(_run, g, form), g.device))
    for form in FORMS:
        out[f"ms_{form}"] = statistics.median(times[form]) * 1e3
    short, long_ = sorted((r, c))
    out["gram_runs"] = float(gram_pays(short, long_, STEPS, 0, 3))
    gram = newton_schulz_flops(short, long_, STEPS, 0, "gram") if out["gram_runs"] else None
    out["flop_ratio"] = (gram or newton_schulz_flops(short, long_, STEPS, 0)) / newton_schulz_flops(
        short, long_, STEPS, 0
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_newton_schulz", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sizes", default="256x1024,512x2048,1024x4096", help="comma-separated RxC")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--tf32", action="store_true", help="torch.set_float32_matmul_precision('high')")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device here")
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{where}; torch {torch.__version__}; fp32 matmul precision {torch.get_float32_matmul_precision()}")
    print(f"{STEPS} quintic steps, batch {args.batch}, median of {args.reps} interleaved reps")
    print()
    print(
        "| size | form=gram runs | standard ms | form=gram ms | time ratio | flop ratio | error standard"
        " | error form=gram |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        r, c = (int(x) for x in size.lower().split("x"))
        m = measure(r, c, args.batch, args.reps, args.device)
        print(
            f"| {args.batch} x {r} x {c} | {'the Gram form' if m['gram_runs'] else 'the standard form'} |"
            f" {m['ms_standard']:.2f} | {m['ms_gram']:.2f} |"
            f" {m['ms_gram'] / m['ms_standard']:.2f}x | {m['flop_ratio']:.2f}x |"
            f" {m['err_standard']:.1e} | {m['err_gram']:.1e} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

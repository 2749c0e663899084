"""A/B of one recipe's step time: this checkout's soapdsl against the soapdsl of a git revision.

    python -m benchmarks.ab_step REV [NEW] [--recipe muon] [--set ns_form=gram ...] [--subset hidden|all]
                                     [--width 256] [--params gpt|many] [--rounds 10] [--steps 6] [--warmup 3]
                                     [--device cpu|cuda] [--threads N]

Two worker processes build the same recipe on the benchmark's parameter set
(benchmarks/params.py) and the same gradients: one imports the soapdsl of this checkout, the
other the ``soapdsl/`` tree of ``REV`` (extracted with ``git archive``). The coordinator
interleaves them, ``--steps`` steps at a time, alternating which goes first, so machine drift
hits both alike; it prints the median step time of each, the median of the per-round ratios
(new / REV), and minor page faults per step. Two processes, not one, because a
change can touch any module of the package. Only ``opt.step()`` is timed.

Read the page-fault column before the ratio. On a CPU, glibc trims and regrows the heap between
steps in some processes and not in others: the same code measured 87 and 8347 minor faults per
muon step in two runs, about 10 ms of difference. A ratio between sides with similar fault
counts measures the code; otherwise run again.

``--width 16`` shrinks the same 27 tensors until every kernel is nearly free, so that the step time
is the host's work: Python, dispatch, launches. That is what a GPU step of this model size waits
on, and a CPU run with it catches a host-side regression. For example, session 6's per-element
layout check doubled adamw's host time (``python -m benchmarks.ab_step 6dbcc26~1 6dbcc26 --recipe
adamw --subset all --width 16``). ``--params many`` measures the same on the many-small-tensors
set (581 tensors of a GPT-2-shaped model, d=32, 48 blocks), where the per-parameter work of a
step is 20 times as large; with ``--threads 1`` the tiny kernels do not wait on OpenMP threads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

from benchmarks.options import at_least

REPO = Path(__file__).resolve().parent.parent


def _worker(args: argparse.Namespace) -> int:
    import torch

    import soapdsl
    from benchmarks.params import GradPool
    from benchmarks.runner import Entry, Live

    kw = dict(kv.split("=", 1) for kv in args.set)
    try:
        live = Live(
            Entry(args.recipe, lambda named: soapdsl.build(args.recipe, named, **kw)),
            GradPool(args.subset, device=args.device, d=args.width, params=args.params),
        )
    except soapdsl.SoapError as e:  # a bad recipe or --set: the message, not a traceback
        print(e, file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    for _ in range(args.warmup):
        live.step()
    print(json.dumps({"ready": soapdsl.__file__}), flush=True)
    for line in sys.stdin:
        f0 = live.result.faults
        times = [live.step(count_faults=True) for _ in range(int(line))]
        print(json.dumps({"times": times, "faults": live.result.faults - f0}), flush=True)
    return 0


def _extract(rev: str, into: Path) -> None:
    """The package and its data (``soapdsl/``, ``grammar/``, ``recipes/``) as of ``rev`` under ``into``."""
    cmd = ["git", "-C", str(REPO), "archive", rev, "soapdsl", "grammar", "recipes"]
    tar = subprocess.run(cmd, capture_output=True, check=False)
    if tar.returncode != 0:
        raise SystemExit(f"git archive {rev}: {tar.stderr.decode().strip()}")
    with tarfile.open(fileobj=BytesIO(tar.stdout)) as t:
        t.extractall(into, filter="data")


def _start(root: Path, args: argparse.Namespace) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(REPO)])}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--recipe", args.recipe, "--subset", args.subset]
    cmd += ["--warmup", str(args.warmup), "--device", args.device, "--params", args.params]
    if args.width is not None:
        cmd += ["--width", str(args.width)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    cmd += [a for kv in args.set for a in ("--set", kv)]
    return subprocess.Popen(cmd, env=env, cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _read(p: subprocess.Popen[str]) -> dict:
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line:
        raise SystemExit(f"a worker exited (code {p.wait()}); its error is above")
    return json.loads(line)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ab_step", description=__doc__.split("\n\n")[0])
    ap.add_argument("rev", nargs="?", help="the git revision to compare against (e.g. HEAD~1)")
    ap.add_argument("new", nargs="?", help="the git revision to measure (default: this checkout, as it is)")
    ap.add_argument("--recipe", default="muon")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe parameter (repeatable)")
    ap.add_argument("--subset", default="hidden", choices=["hidden", "all"])
    ap.add_argument(
        "--width", type=int, default=None, help="model width d (vocab 16 d; default 256, many: 32); 16: host work"
    )
    ap.add_argument("--params", default="gpt", choices=["gpt", "many"], help="the parameter set (benchmarks/params.py)")
    ap.add_argument("--threads", type=at_least(1), default=None, help="torch.set_num_threads in each worker")
    ap.add_argument("--rounds", type=at_least(1), default=10)
    ap.add_argument("--steps", type=at_least(1), default=6, help="steps per worker per round")
    ap.add_argument("--warmup", type=at_least(0), default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return _worker(args)
    if not args.rev:
        ap.error("give the git revision to compare against")
    if args.width is not None and args.width < 1:
        ap.error(f"--width {args.width}: must be at least 1")
    for kv in args.set:
        if "=" not in kv or not kv.split("=", 1)[0]:
            ap.error(f"--set {kv!r}: expected KEY=VALUE")
    new = args.new or "this checkout"
    if new == args.rev:
        ap.error("the two sides are the same revision")
    with tempfile.TemporaryDirectory(prefix="soapdsl-ab-") as tmp:
        roots = {args.rev: Path(tmp) / "old", new: REPO if args.new is None else Path(tmp) / "new"}
        for name, root in roots.items():
            if root != REPO:
                root.mkdir()
                _extract(name, root)
        sides = {name: _start(root, args) for name, root in roots.items()}
        try:
            for name, p in sides.items():
                print(f"{name}: soapdsl from {_read(p)['ready']}")
            times: dict[str, list[float]] = {n: [] for n in sides}
            faults = dict.fromkeys(sides, 0)
            ratios = []
            for r in range(args.rounds):
                order = list(sides) if r % 2 == 0 else list(sides)[::-1]
                medians = {}
                for name in order:
                    p = sides[name]
                    assert p.stdin is not None
                    p.stdin.write(f"{args.steps}\n")
                    p.stdin.flush()
                    out = _read(p)
                    times[name] += out["times"]
                    faults[name] += out["faults"]
                    medians[name] = statistics.median(out["times"])
                ratios.append(medians[new] / medians[args.rev])
        finally:
            for p in sides.values():
                if p.stdin is not None:
                    p.stdin.close()
                p.wait()
    extra = "".join(f" {kv}" for kv in args.set)
    width = args.width or (256 if args.params == "gpt" else 32)
    threads = f", {args.threads} threads" if args.threads is not None else ""
    many = " of many small tensors" if args.params == "many" else ""
    where = f"the {args.subset} set{many}, width {width}, {args.device}{threads}"
    print(f"\n{args.recipe}{extra} on {where}: {args.rounds} rounds x {args.steps} steps each")
    print("| soapdsl | median ms | page faults/step |")
    print("|---|---|---|")
    for name in sides:
        n = len(times[name])
        ms = statistics.median(times[name]) * 1e3
        print(f"| {name} | {ms:.{1 if ms >= 10 else 3}f} | {faults[name] / n:.0f} |")
    print(f"\n{new} / {args.rev}: median of the per-round ratios {statistics.median(ratios):.3f}x")
    print("per-round ratios, sorted: " + " ".join(f"{x:.3f}" for x in sorted(ratios)))
    return 0


if __name__ == "__main__":
    if str(REPO) not in sys.path:
        sys.path.append(str(REPO))  # after PYTHONPATH, so a worker keeps the soapdsl it was given
    raise SystemExit(main())

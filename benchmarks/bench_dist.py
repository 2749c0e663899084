"""Step time of a data-parallel run with the matrix work split across ranks, against every rank
repeating it (what a plain optimizer under DDP does).

    python -m benchmarks.bench_dist                       # soap, soap_muon and muon, 2 ranks
    python -m benchmarks.bench_dist --recipes soap --rounds 5 --out benchmarks/RESULTS_dist.md

Two gloo ranks on this machine, one torch thread each (the usual DDP setting of one process
per core), on the benchmark's GPT-like parameter set (benchmarks/params.py) with the same
gradients on both ranks, as DDP's all-reduce leaves them. Each rank holds two optimizers of
the same recipe over two copies of the parameters: one built with ``distributed=True`` (split)
and one without (every rank computes everything). Rounds interleave the two, so machine drift
hits both alike; a round times one refresh period (10 steps) of each after a warm-up, and the
report gives the median of the per-round ratios. A step's time is the slower rank's: the split
step ends with both ranks holding every result.

With ``--fsdp`` (the default) a third optimizer steps the same parameters sharded as FSDP2
shards them (DTensors, each rank holding half of every parameter's rows, with the gradients'
same rows): pointwise routes step each rank's rows, and each matrix route's parameter is
stepped whole on its owner rank (runtime/fsdp.py). Its rounds interleave with the other two;
the report gives its step time, its state per rank against the whole state every DDP rank
keeps, and whether its parameters equal the unsplit ones bit for bit.

After the timing, each rank compares its split and unsplit parameters; the report's last
column says whether they are equal bit for bit on every rank.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import soapdsl
from benchmarks import peers
from benchmarks.options import at_least
from benchmarks.params import GradPool
from benchmarks.runner import tensor_state_bytes

#: recipe -> its arguments, as bench_step gives them (SOAP's freq 10 and max_dim 2048 for both
#: SOAP recipes, so that the embedding and the head are rotated on their model side only)
SOAP_ARGS = {"freq": peers.SOAP_FREQ, "max_dim": peers.SOAP_MAX_DIM}
RECIPES: dict[str, dict[str, Any]] = {"soap": SOAP_ARGS, "soap_muon": SOAP_ARGS, "muon": {}}
STEPS = peers.SOAP_FREQ  # steps per round: one refresh period


def _worker(rank: int, world: int, init: str, args: argparse.Namespace, out: Path) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=10)
    )
    pool = GradPool("all")
    results: dict[str, Any] = {}
    for recipe in args.recipes:
        steps, kw = STEPS, RECIPES.get(recipe, {})
        split_params, plain_params = pool.make_params(), pool.make_params()
        split = soapdsl.build(recipe, split_params, distributed=True, **kw)
        plain = soapdsl.build(recipe, plain_params, **kw)
        # (name, optimizer, its parameters, what loads their gradients, untimed)
        contenders: list[tuple[str, Any, Any, Any]] = [
            ("split", split, split_params, pool.load),
            ("plain", plain, plain_params, pool.load),
        ]
        if args.fsdp:
            sharded_params, load_sharded = _sharded(pool, world)
            sharded = soapdsl.build(recipe, sharded_params, **kw)
            contenders.append(("fsdp", sharded, sharded_params, load_sharded))
        k = 0

        def run(opt: Any, named: list[tuple[str, Any]], load: Any, n: int, start: int) -> float:
            total = 0.0
            for i in range(n):
                load(named, start + i)  # untimed
                dist.barrier()
                t0 = time.perf_counter()
                opt.step()
                total += time.perf_counter() - t0
            return total

        # warm-up: the first step (skipped by the SOAP family) and a first refresh period
        for _, opt, named, load in contenders:
            run(opt, named, load, steps + 1, k)
        k += steps + 1
        rounds = []
        for r in range(args.rounds):
            times = {}
            for name, opt, named, load in contenders[r % len(contenders) :] + contenders[: r % len(contenders)]:
                times[name] = run(opt, named, load, steps, k) / steps
            k += steps
            rounds.append(times)
        same = all(torch.equal(a, b) for (_, a), (_, b) in zip(split_params, plain_params, strict=True))
        computed = dict(split._split.computed)  # type: ignore[union-attr]
        state = tensor_state_bytes(plain.state)
        results[recipe] = {"rounds": rounds, "same": same, "computed": computed, "state": state}
        if args.fsdp:
            results[recipe]["fsdp_state"] = tensor_state_bytes(sharded.state)
            results[recipe]["fsdp_same"] = all(
                torch.equal(a.full_tensor(), b) for (_, a), (_, b) in zip(sharded_params, plain_params, strict=True)
            )
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def _sharded(pool: GradPool, world: int) -> tuple[list[tuple[str, Any]], Any]:
    """The pool's parameters sharded as FSDP2 shards them, and a loader of its gradients' rows."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    named = [(n, torch.nn.Parameter(distribute_tensor(pool.init[n].clone(), mesh, [Shard(0)]))) for n, _ in pool.shapes]
    grads = [{n: distribute_tensor(g[n], mesh, [Shard(0)]) for n, _ in pool.shapes} for g in pool.grads]

    def load(params: list[tuple[str, Any]], k: int) -> None:
        for n, p in params:
            p.grad = grads[k % len(grads)][n]

    return named, load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_dist", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--ranks", type=at_least(1), default=2)
    parser.add_argument("--threads", type=at_least(1), default=1, help="torch threads per rank")
    parser.add_argument("--rounds", type=at_least(1), default=4)
    parser.add_argument("--out", type=Path, help="write the report here (Markdown) as well")
    parser.add_argument(
        "--fsdp", action=argparse.BooleanOptionalAction, default=True, help="also time FSDP2-sharded parameters"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        init = f"file://{out / 'store'}"
        t0 = time.perf_counter()
        mp.spawn(_worker, args=(args.ranks, init, args, out), nprocs=args.ranks, join=True)
        wall = time.perf_counter() - t0
        ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(args.ranks)]
    lines = [
        "# Data-parallel step time: matrix work split across ranks vs repeated on every rank",
        "",
        f"Command: `python -m benchmarks.bench_dist {' '.join(argv if argv is not None else sys.argv[1:])}`"
        f" ({wall:.0f} s). {args.ranks} gloo ranks, {args.threads} torch thread(s) each, on"
        f" {os.cpu_count()} CPU cores; torch {torch.__version__}; GPT-like parameter set (benchmarks/params.py).",
        "",
        "| recipe | split ms/step | repeated ms/step | split / repeated | matrices computed per rank"
        " | split == repeated |",
        "|---|---|---|---|---|---|",
    ]
    fsdp_lines = [
        "",
        "## FSDP2: each rank holds half of every parameter's rows",
        "",
        "| recipe | sharded ms/step | repeated ms/step | sharded / repeated | state per rank | DDP state per rank"
        " | sharded == repeated |",
        "|---|---|---|---|---|---|---|",
    ]
    for recipe in args.recipes:
        per_round = list(zip(*(r[recipe]["rounds"] for r in ranks), strict=True))  # per round: each rank's times
        split = [max(t["split"] for t in rnd) * 1e3 for rnd in per_round]
        plain = [max(t["plain"] for t in rnd) * 1e3 for rnd in per_round]
        if args.fsdp:
            fsdp = [max(t["fsdp"] for t in rnd) * 1e3 for rnd in per_round]
            fsdp_ratio = statistics.median(f / p for f, p in zip(fsdp, plain, strict=True))
            mib = ", ".join(f"{r[recipe]['fsdp_state'] / 2**20:.1f}" for r in ranks)
            fsdp_lines.append(
                f"| {recipe} | {statistics.median(fsdp):.1f} | {statistics.median(plain):.1f} | {fsdp_ratio:.2f}x"
                f" | {mib} MiB | {ranks[0][recipe]['state'] / 2**20:.1f} MiB"
                f" | {'yes' if all(r[recipe]['fsdp_same'] for r in ranks) else 'NO'} |"
            )
        ratio = statistics.median(s / p for s, p in zip(split, plain, strict=True))
        computed = ", ".join(str(r[recipe]["computed"]["here"]) for r in ranks)
        total = ranks[0][recipe]["computed"]["all"]
        same = "yes" if all(r[recipe]["same"] for r in ranks) else "NO"
        lines.append(
            f"| {recipe} | {statistics.median(split):.1f} | {statistics.median(plain):.1f} | {ratio:.2f}x"
            f" | {computed} of {total} | {same} |"
        )
    lines += [
        "",
        f"soap and soap_muon run with freq={peers.SOAP_FREQ} and max_dim={peers.SOAP_MAX_DIM}, as in bench_step."
        f" Each round times one refresh period ({STEPS} steps) of each optimizer, after a warm-up of as many;"
        " the ratio is the median over rounds of split / repeated, each the slower rank's time.",
    ]
    if args.fsdp:
        lines += fsdp_lines
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

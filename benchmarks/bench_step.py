"""Step time and state memory of soapdsl's recipes next to torch, heavyball and pytorch_optimizer.

    python -m benchmarks.bench_step [--quick] [--rounds R] [--device cpu|cuda] [--out benchmarks/RESULTS.md]
    python -m benchmarks.bench_step --many [--rounds R] [--threads N]

Four groups, each run interleaved in rounds (see :mod:`benchmarks.runner`) on the GPT-like
parameter set of :mod:`benchmarks.params`:

a. all parameters: soapdsl ``adamw`` (eager and ``torch_compile=True``) vs torch.optim.AdamW
   with ``foreach=True`` and ``fused=True``;
b. hidden 2-D matrices: soapdsl ``muon`` (fp32 Newton-Schulz, its default; eager and compiled,
   and eager with the opt-in ``ns_form=gram``) vs torch.optim.Muon and heavyball's Muon, both
   patched to fp32 Newton-Schulz;
c. all parameters, SOAP at frequency 10 and max_dim 2048: soapdsl ``soap`` (eager and
   compiled) vs the loop reference ``tests.references.SoapV2Ref``, heavyball's SOAP (compiled,
   its default) and pytorch_optimizer's SOAP;
d. all parameters: soapdsl ``soap_muon`` (and with the opt-in ``ns_form=gram``) vs soapdsl
   ``soap`` (all frequency 10, max_dim 2048).

Then the FLOP/byte model (:mod:`benchmarks.model`) with this machine's bandwidth and matmul
rate, profiles of soapdsl's steps (:mod:`benchmarks.profiling`), and the report
(:mod:`benchmarks.report`). ``--quick`` is a smoke run (one round, short warm-up, nothing
compiled: its numbers are not results).

``--many`` measures the host's share instead: groups a to c (soapdsl's ``adamw``, ``muon`` and
``soap`` eager, against the same peers but heavyball's) on the many-small-tensors parameter set
of :mod:`benchmarks.params` (581 tensors of at most 16,384 elements: the kernels are nearly
free, so a step's time is Python, dispatch and launches, what a GPU step of a deep narrow model
waits on). It prints a short markdown section of its own instead of the report.

``--device cuda`` runs the same groups on a GPU (each timed step synchronised), with group b
adding the as-shipped bf16 Newton-Schulz pair, soapdsl ``muon`` with ``ns_dtype=bf16`` against
torch.optim.Muon unpatched (on a GPU bf16 is the fast path, so it is timed interleaved with the
rest instead of separately), and the profiles reading the GPU's kernel times. The targets are
set for the CPU; on a GPU their ratios are reported for information.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import soapdsl  # noqa: E402
from benchmarks import model, peers, profiling, report  # noqa: E402
from benchmarks.options import at_least  # noqa: E402
from benchmarks.params import select  # noqa: E402
from benchmarks.runner import Entry, Group, Result, run_group  # noqa: E402

FREQ, MAX_DIM = peers.SOAP_FREQ, peers.SOAP_MAX_DIM


def _soapdsl(recipe: str, *, compiled: bool = False, graphs: bool = False, **args: Any):
    def make(named):
        return soapdsl.build(recipe, named, torch_compile=compiled, cuda_graphs=graphs, **args)

    return make


def groups(quick: bool, rounds: int | None, device: str = "cpu", compile_ours: bool = True) -> list[Group]:
    has_hb = peers.available("heavyball")
    has_po = peers.available("pytorch_optimizer")
    compiled = not quick and compile_ours
    soap_args: dict[str, Any] = {"freq": FREQ, "max_dim": MAX_DIM}
    hb_note = "eager (--quick skips compiling)"
    if not quick and peers.available("heavyball"):
        hb_note = f"compiled, mode {peers.heavyball_mode()}"

    def r(full: int) -> int:
        return rounds if rounds is not None else (1 if quick else full)

    a = [
        Entry("soapdsl adamw", _soapdsl("adamw"), formula=model.adamw_state),
        Entry("torch AdamW foreach", partial(peers.make_torch_adamw, foreach=True)),
        Entry("torch AdamW fused", partial(peers.make_torch_adamw, fused=True)),
    ]
    if compiled:
        a.insert(
            1, Entry("soapdsl adamw compiled", _soapdsl("adamw", compiled=True), model.adamw_state, "soapdsl adamw")
        )
    b = [
        Entry("soapdsl muon", _soapdsl("muon"), formula=model.muon_state, note="ns_dtype auto = fp32"),
        Entry("torch Muon fp32", peers.make_torch_muon_fp32, note="_zeropower_via_newtonschulz patched to fp32"),
        Entry(
            "soapdsl muon gram",
            _soapdsl("muon", ns_form="gram"),
            formula=model.muon_state,
            note="ns_form=gram: opt-in Gram Newton-Schulz, not torch's rounding",
        ),
    ]
    if compiled:
        b.insert(1, Entry("soapdsl muon compiled", _soapdsl("muon", compiled=True), model.muon_state, "soapdsl muon"))
    if has_hb:
        b.append(Entry("heavyball Muon fp32", peers.make_heavyball_muon_fp32, note=f"NS patched to fp32; {hb_note}"))
    gpu = device != "cpu"
    graphs_note = "cuda_graphs=True: Newton-Schulz replayed from CUDA graphs, the eager numbers"
    if gpu:  # CUDA graphs exist on a GPU only
        b.insert(1, Entry("soapdsl muon graphs", _soapdsl("muon", graphs=True), model.muon_state, note=graphs_note))
    if gpu:  # bf16 Newton-Schulz as shipped: fast on a GPU, so timed with the rest
        b.append(Entry("soapdsl muon bf16", _soapdsl("muon", ns_dtype="bf16"), model.muon_state, note="ns_dtype=bf16"))
        b.append(Entry("torch Muon bf16 (as shipped)", peers.make_torch_muon))
        if has_hb:
            b.append(Entry("heavyball Muon bf16 (as shipped)", peers.make_heavyball_muon, note=hb_note))
    soap_formula = partial(model.soap_state, max_dim=MAX_DIM)
    c = [
        Entry("soapdsl soap", _soapdsl("soap", **soap_args), formula=soap_formula),
        Entry("SoapV2Ref loop", peers.make_soap_v2_ref, note="tests.references.SoapV2Ref: 4 projections/step"),
    ]
    if compiled:
        c.insert(
            1,
            Entry("soapdsl soap compiled", _soapdsl("soap", compiled=True, **soap_args), soap_formula, "soapdsl soap"),
        )
    if has_hb:
        c.append(Entry("heavyball SOAP", peers.make_heavyball_soap, note=hb_note))
    if has_po:
        c.append(Entry("pytorch_optimizer SOAP", peers.make_pytorch_optimizer_soap))
    d = [
        Entry("soapdsl soap_muon", _soapdsl("soap_muon", **soap_args), formula=model.soap_muon_state),
        Entry("soapdsl soap", _soapdsl("soap", **soap_args), formula=soap_formula),
        Entry(
            "soapdsl soap_muon gram",
            _soapdsl("soap_muon", ns_form="gram", **soap_args),
            formula=model.soap_muon_state,
            note="ns_form=gram: opt-in Gram Newton-Schulz, not the reference's rounding",
        ),
    ]
    if gpu:
        d.insert(
            1,
            Entry(
                "soapdsl soap_muon graphs",
                _soapdsl("soap_muon", graphs=True, **soap_args),
                model.soap_muon_state,
                note=graphs_note,
            ),
        )
    if compiled:
        d.insert(
            1,
            Entry(
                "soapdsl soap_muon compiled",
                _soapdsl("soap_muon", compiled=True, **soap_args),
                model.soap_muon_state,
                "soapdsl soap_muon",
            ),
        )
    soap_warm = 2 if quick else 1 + FREQ  # the skipped first step, then one period with a refresh
    out = [
        Group(
            "a",
            "AdamW, all parameters",
            "all",
            a,
            10,
            3,
            r(12),
            [
                ("soapdsl adamw", "torch AdamW foreach"),
                ("soapdsl adamw", "torch AdamW fused"),
                ("soapdsl adamw compiled", "torch AdamW foreach"),
                ("soapdsl adamw compiled", "torch AdamW fused"),
            ],
        ),
        Group(
            "b",
            "Muon, hidden 2-D matrices",
            "hidden",
            b,
            10,
            3,
            r(8),
            [
                ("soapdsl muon", "torch Muon fp32"),
                ("soapdsl muon", "heavyball Muon fp32"),
                ("soapdsl muon graphs", "torch Muon fp32"),
                ("soapdsl muon graphs", "soapdsl muon"),
                ("soapdsl muon compiled", "torch Muon fp32"),
                ("soapdsl muon gram", "torch Muon fp32"),
                ("soapdsl muon gram", "soapdsl muon"),
                ("soapdsl muon bf16", "torch Muon bf16 (as shipped)"),
                ("soapdsl muon bf16", "heavyball Muon bf16 (as shipped)"),
            ],
        ),
        Group(
            "c",
            f"SOAP, all parameters, freq {FREQ}, max_dim {MAX_DIM}",
            "all",
            c,
            FREQ,
            soap_warm,
            r(6),
            [
                ("soapdsl soap", "SoapV2Ref loop"),
                ("soapdsl soap", "heavyball SOAP"),
                ("soapdsl soap", "pytorch_optimizer SOAP"),
                ("soapdsl soap compiled", "SoapV2Ref loop"),
                ("soapdsl soap compiled", "heavyball SOAP"),
            ],
        ),
        Group(
            "d",
            f"SOAP-Muon vs SOAP, all parameters, freq {FREQ}, max_dim {MAX_DIM}",
            "all",
            d,
            FREQ,
            soap_warm,
            r(6),
            [
                ("soapdsl soap_muon", "soapdsl soap"),
                ("soapdsl soap_muon graphs", "soapdsl soap"),
                ("soapdsl soap_muon graphs", "soapdsl soap_muon"),
                ("soapdsl soap_muon compiled", "soapdsl soap"),
                ("soapdsl soap_muon gram", "soapdsl soap"),
            ],
        ),
    ]
    for g in out:
        g.device = device
    return out


def many_groups(quick: bool, rounds: int | None, device: str = "cpu") -> list[Group]:
    """Groups a to c on the many-small-tensors set (``--many``): soapdsl eager against torch's
    AdamW and Muon and the SOAP loop reference, interleaved as the main groups are."""

    def r(full: int) -> int:
        return rounds if rounds is not None else (1 if quick else full)

    soap_warm = 2 if quick else 1 + FREQ
    out = [
        Group(
            "a",
            "AdamW, all parameters",
            "all",
            [
                Entry("soapdsl adamw", _soapdsl("adamw")),
                Entry("torch AdamW foreach", partial(peers.make_torch_adamw, foreach=True)),
                Entry("torch AdamW fused", partial(peers.make_torch_adamw, fused=True)),
            ],
            10,
            3,
            r(10),
            [("soapdsl adamw", "torch AdamW foreach"), ("soapdsl adamw", "torch AdamW fused")],
        ),
        Group(
            "b",
            "Muon, hidden 2-D matrices",
            "hidden",
            [
                Entry("soapdsl muon", _soapdsl("muon"), note="ns_dtype auto = fp32"),
                Entry("torch Muon fp32", peers.make_torch_muon_fp32, note="Newton-Schulz patched to fp32"),
            ],
            10,
            3,
            r(10),
            [("soapdsl muon", "torch Muon fp32")],
        ),
        Group(
            "c",
            f"SOAP, all parameters, freq {FREQ}, max_dim {MAX_DIM}",
            "all",
            [
                Entry("soapdsl soap", _soapdsl("soap", freq=FREQ, max_dim=MAX_DIM)),
                Entry("SoapV2Ref loop", peers.make_soap_v2_ref, note="tests.references.SoapV2Ref"),
            ],
            FREQ,
            soap_warm,
            r(6),
            [("soapdsl soap", "SoapV2Ref loop")],
        ),
    ]
    for g in out:
        g.device = device
        g.params = "many"
    return out


def bf16_peers(log) -> list[Result]:
    """torch's and heavyball's Muon as shipped (bf16 Newton-Schulz): one warm-up step, then two
    timed steps each, not interleaved (a bf16 step takes seconds on a CPU)."""
    entries = [Entry("torch Muon bf16 (as shipped)", peers.make_torch_muon)]
    if peers.available("heavyball"):
        entries.append(Entry("heavyball Muon bf16 (as shipped)", peers.make_heavyball_muon))
    g = Group("b16", "bf16 Newton-Schulz as shipped", "hidden", entries, 2, 1, 1)
    return run_group(g, log)


def profiles(quick: bool, device: str = "cpu") -> list[profiling.Profile]:
    soap_args: dict[str, Any] = {"freq": FREQ, "max_dim": MAX_DIM}
    steps = 3 if quick else FREQ  # one whole refresh period
    todo = [
        ("soapdsl adamw", _soapdsl("adamw"), "all", 3),
        ("torch AdamW foreach", partial(peers.make_torch_adamw, foreach=True), "all", 3),
        ("soapdsl muon", _soapdsl("muon"), "hidden", 3),
        ("torch Muon fp32", peers.make_torch_muon_fp32, "hidden", 3),
        ("soapdsl soap", _soapdsl("soap", **soap_args), "all", 1 + FREQ),
        ("soapdsl soap_muon", _soapdsl("soap_muon", **soap_args), "all", 1 + FREQ),
    ]
    if not peers.HAS_TORCH_MUON:  # the timed rounds report it as a peer that cannot be built
        todo = [t for t in todo if not t[0].startswith("torch Muon")]
    if device != "cpu":
        todo.append(("soapdsl soap_muon graphs", _soapdsl("soap_muon", graphs=True, **soap_args), "all", 1 + FREQ))
    return [
        profiling.profile_optimizer(label, make, subset, 2 if quick else warm, steps, device=device)
        for label, make, subset, warm in todo
    ]


def count_flops() -> dict[str, float]:
    """Matmul flops per step that soapdsl's recipes execute, over one refresh period."""
    soap_args: dict[str, Any] = {"freq": FREQ, "max_dim": MAX_DIM}
    todo = [
        ("adamw", _soapdsl("adamw"), "all", 3),
        ("muon", _soapdsl("muon"), "hidden", 3),
        ("muon gram", _soapdsl("muon", ns_form="gram"), "hidden", 3),
        ("soap", _soapdsl("soap", **soap_args), "all", 1 + FREQ),
        ("soap_muon", _soapdsl("soap_muon", **soap_args), "all", 1 + FREQ),
        ("soap_muon gram", _soapdsl("soap_muon", ns_form="gram", **soap_args), "all", 1 + FREQ),
    ]
    return {name: profiling.count_matmul_flops(make, subset, warm, FREQ) for name, make, subset, warm in todo}


def _load() -> str:
    try:
        return Path("/proc/loadavg").read_text().split(" ")[:3].__str__()
    except OSError:
        return "n/a"


def machine_info(device: str = "cpu") -> dict[str, str]:
    info = {
        "device": device,
        "nproc": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device == "cuda":
        prop = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{prop.name}, {prop.multi_processor_count} SMs, {prop.total_memory / 2**30:.0f} GiB"
        info["cuda"] = str(torch.version.cuda)
        info["fp32 matmul precision"] = torch.get_float32_matmul_precision()
    for mod in ("heavyball", "pytorch_optimizer"):
        try:
            from importlib.metadata import version

            info[mod] = version(mod)
        except Exception:
            info[mod] = "not installed"
    try:
        info["soapdsl commit"] = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip() + (
            " (+ uncommitted changes)"
            if subprocess.run(
                ["git", "-C", str(REPO), "status", "--porcelain", "soapdsl"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
            else ""
        )
    except OSError:
        pass
    return info


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "load average: " + _load()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: one round, short warm-up, nothing compiled")
    ap.add_argument("--rounds", type=at_least(1), default=None, help="rounds per group (default: 12/8/6/6; --quick: 1)")
    ap.add_argument("--out", default=None, help="write the markdown report here (e.g. benchmarks/RESULTS.md)")
    ap.add_argument("--groups", default=None, help="which groups to run (default: abcd; --many: abc)")
    ap.add_argument("--no-bf16", action="store_true", help="skip the as-shipped bf16 Muon measurement")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiles")
    ap.add_argument("--threads", type=at_least(1), default=None, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where parameters and state live")
    ap.add_argument("--no-compile", action="store_true", help="skip soapdsl's torch.compile entries")
    ap.add_argument(
        "--many",
        action="store_true",
        help="host overhead: groups a-c on 581 small tensors (benchmarks/params.py many_shapes); prints a section",
    )
    ap.add_argument(
        "--heavyball-mode",
        default=None,
        help="heavyball's torch.compile mode (default: its own, max-autotune-no-cudagraphs; autotuning every"
        " shape takes many minutes on a GPU, where 'default' is practical)",
    )
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device here")
    if args.many and args.out:
        ap.error("--many prints a section of its own; it does not write the report (--out)")
    known = "abc" if args.many else "abcd"
    if args.groups is None:  # --many has no group d
        args.groups = known
    if not args.groups:
        ap.error(f"--groups '': names no group (groups: {', '.join(known)})")
    for key in args.groups:
        if key not in known:
            ap.error(f"--groups {args.groups!r}: unknown group {key!r} (groups: {', '.join(known)})")
    if args.out:  # checked now: the report is written at the end of a run of minutes
        out = Path(args.out)
        if out.is_dir():
            ap.error(f"--out {args.out!r} is a directory: name the report's file (e.g. benchmarks/RESULTS.md)")
        if not out.parent.is_dir():
            ap.error(f"--out {args.out!r}: directory {str(out.parent)!r} does not exist")
        if not os.access(out if out.exists() else out.parent, os.W_OK):
            ap.error(f"--out {args.out!r} is not writable")
    shown = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python -m benchmarks.bench_step", *map(shlex.quote, shown)])

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    up_start = uptime()
    log(f"{started}  {up_start}")
    if args.quick and peers.available("heavyball"):
        peers.heavyball_eager()
    elif args.heavyball_mode is not None and peers.available("heavyball"):
        peers.heavyball_set_mode(args.heavyball_mode)
    info = machine_info(args.device)
    hb_mode = "n/a"
    if peers.available("heavyball"):
        import heavyball.utils

        hb_mode = str(heavyball.utils.compile_mode)
    info["heavyball compile_mode"] = hb_mode

    if args.many:
        many = [g for g in many_groups(args.quick, args.rounds, args.device) if g.key in args.groups]
        many_results: dict[str, list[Result]] = {}
        for g in many:
            log(f"group {g.key} (many small tensors): {g.title}")
            many_results[g.key] = run_group(g, log)
        print(
            report.render_many(
                command=command,
                started=started,
                uptime_start=up_start,
                uptime_end=uptime(),
                elapsed_s=time.perf_counter() - start,
                quick=args.quick,
                info=info,
                groups=many,
                results=many_results,
                shapes=select("all", params="many"),
            )
        )
        return 0

    log("measuring the machine ...")
    machine = model.measure_machine(args.quick, args.device)
    log(f"  {machine}")
    results: dict[str, list[Result]] = {}
    all_groups = [g for g in groups(args.quick, args.rounds, args.device, not args.no_compile) if g.key in args.groups]
    for g in all_groups:
        log(f"group {g.key}: {g.title}")
        t0 = time.perf_counter()
        results[g.key] = run_group(g, log)
        log(f"  group {g.key} took {time.perf_counter() - t0:.0f} s")
    bf16: list[Result] = []
    if not args.quick and not args.no_bf16 and "b" in args.groups and args.device == "cpu":
        log("bf16 Newton-Schulz peers as shipped ...")
        bf16 = bf16_peers(log)
    profs: list[profiling.Profile] = []
    if not args.no_profile:
        log("profiles ...")
        profs = profiles(args.quick, args.device)
    counted: dict[str, float] = {}
    if not args.quick:
        log("counting matmul flops ...")
        counted = count_flops()
    up_end = uptime()
    elapsed = time.perf_counter() - start
    text = report.render(
        command=command,
        started=started,
        uptime_start=up_start,
        uptime_end=up_end,
        elapsed_s=elapsed,
        quick=args.quick,
        info=info,
        machine=machine,
        groups=all_groups,
        results=results,
        bf16=bf16,
        profiles=profs,
        counted=counted,
        shapes=select("all"),
        hidden=select("hidden"),
        previous=Path(args.out).read_text() if args.out and Path(args.out).exists() else None,
    )
    if args.out:
        Path(args.out).write_text(text)
        log(f"wrote {args.out} ({elapsed:.0f} s)")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

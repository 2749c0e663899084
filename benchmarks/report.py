"""The markdown report of a benchmark run (benchmarks/RESULTS.md).

A hand-written section between ``<!-- analysis:start -->`` and ``<!-- analysis:end -->`` in the
previous report is carried over when the report is regenerated.
"""

from __future__ import annotations

import math
from typing import Any

from benchmarks import model
from benchmarks.profiling import Profile
from benchmarks.runner import Group, Result

START, END = "<!-- analysis:start -->", "<!-- analysis:end -->"

# (name, soapdsl label, group, peer label, group of peer, metric, limit)
TARGETS = [
    ("adamw step time <= 1.0x torch AdamW foreach", "soapdsl adamw", "a", "torch AdamW foreach", "median", 1.0),
    (
        "adamw step time vs torch AdamW fused (aim, not a target)",
        "soapdsl adamw",
        "a",
        "torch AdamW fused",
        "median",
        None,
    ),
    (
        "muon (fp32 NS) step time <= 0.9x torch Muon patched to fp32 NS",
        "soapdsl muon",
        "b",
        "torch Muon fp32",
        "median",
        0.9,
    ),
    (
        "muon ns_form=gram (opt-in Gram form, not torch's rounding) vs torch Muon fp32 (not a target)",
        "soapdsl muon gram",
        "b",
        "torch Muon fp32",
        "median",
        None,
    ),
    ("soap amortised <= 0.7x the loop reference SoapV2Ref", "soapdsl soap", "c", "SoapV2Ref loop", "amortised", 0.7),
    ("soap amortised <= 1.0x heavyball's compiled SOAP", "soapdsl soap", "c", "heavyball SOAP", "amortised", 1.0),
    ("soap_muon amortised <= 0.8x soap", "soapdsl soap_muon", "d", "soapdsl soap", "amortised", 0.8),
    (
        "soap_muon ns_form=gram (opt-in Gram form) amortised vs soap (not a target)",
        "soapdsl soap_muon gram",
        "d",
        "soapdsl soap",
        "amortised",
        None,
    ),
    (
        "muon cuda_graphs=True step time vs torch Muon fp32 (GPU runs only, not a target)",
        "soapdsl muon graphs",
        "b",
        "torch Muon fp32",
        "median",
        None,
    ),
    (
        "soap_muon cuda_graphs=True amortised vs soap (GPU runs only, the 0.8x target's GPU lever)",
        "soapdsl soap_muon graphs",
        "d",
        "soapdsl soap",
        "amortised",
        None,
    ),
    (
        "muon (bf16 NS) step time vs torch Muon as shipped (GPU runs only, not a target)",
        "soapdsl muon bf16",
        "b",
        "torch Muon bf16 (as shipped)",
        "median",
        None,
    ),
]


def _ms(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x * 1e3:.1f}"


def _mb(x: int | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:.2f} MiB ({x:,} B)"


def _find(results: dict[str, list[Result]], group: str, label: str) -> Result | None:
    for r in results.get(group, []):
        if r.label == label and r.error is None and r.times:
            return r
    return None


def _metric(r: Result, metric: str) -> float:
    return r.median if metric == "median" else r.amortised


def targets_table(results: dict[str, list[Result]], quick: bool) -> list[str]:
    out = ["| target | soapdsl | peer | ratio | verdict |", "|---|---|---|---|---|"]
    for name, mine, g, peer, metric, limit in TARGETS:
        a, b = _find(results, g, mine), _find(results, g, peer)
        if limit is None and a is None:  # an aim whose entry this run does not have (e.g. GPU-only)
            continue
        if a is None or b is None:
            missing = mine if a is None else peer
            out.append(f"| {name} | | | n/a | NOT MEASURED ({missing} did not run) |")
            continue
        ratio = _metric(a, metric) / _metric(b, metric)
        verdict = "(aim)" if limit is None else ("PASS" if ratio <= limit else "MISS")
        if quick and limit is not None:
            verdict += " (smoke run: not a result)"
        out.append(
            f"| {name} | {_ms(_metric(a, metric))} ms {metric} | {_ms(_metric(b, metric))} ms {metric} |"
            f" {ratio:.2f}x | {verdict} |"
        )
    return out


def group_table(g: Group, res: list[Result]) -> list[str]:
    peers = sorted({p for _, p in g.ratios})
    peers = [p for p in peers if any(r.label == p and r.times for r in res)]

    def row(cells: list[str]) -> str:  # one cell per peer, none without peers (a "" would add a column)
        return "| " + " | ".join(cells) + " |"

    head = ["optimizer", "median ms", "amortised ms", *(f"/ {p} (amort., median)" for p in peers)]
    out = [row([*head, "page faults/step", "warm-up extra s", "note"]), "|" + "---|" * (6 + len(peers))]
    by = {r.label: r for r in res}
    for r in res:
        if r.error is not None and not r.times:
            out.append(row([r.label, "", "", *("" for _ in peers), "", "", f"FAILED: {r.error}"]))
            continue
        cells = []
        for p in peers:
            q = by.get(p)
            if q is None or not q.times or q is r:
                cells.append("")
            else:
                cells.append(f"{r.amortised / q.amortised:.2f}x, {r.median / q.median:.2f}x")
        note = r.note
        if r.match:
            note = (note + "; " if note else "") + "vs eager " + r.match
        if r.error:
            note = (note + "; " if note else "") + "ERROR " + r.error
        extra = r.warmup_extra
        faults = "n/a" if math.isnan(r.faults_per_step) else f"{r.faults_per_step:.0f}"
        warm = "n/a" if math.isnan(extra) else f"{extra:.1f}"
        out.append(row([r.label, _ms(r.median), _ms(r.amortised), *cells, faults, warm, note]))
    return out


def state_table(groups: list[Group], results: dict[str, list[Result]]) -> list[str]:
    out = [
        "| group | optimizer | state bytes (tensors in opt.state) | plan.state_bytes() | formula | check |",
        "|---|---|---|---|---|---|",
    ]
    for g in groups:
        for r in results.get(g.key, []):
            if r.state_bytes is None:
                continue
            check = ""
            if r.formula_bytes is not None:
                ok = r.state_bytes == r.formula_bytes and (r.plan_bytes is None or r.plan_bytes == r.formula_bytes)
                check = "equal" if ok else "MISMATCH"
            cells = [g.key, r.label, _mb(r.state_bytes), _mb(r.plan_bytes), _mb(r.formula_bytes), check]
            out.append("| " + " | ".join(cells) + " |")
    return out


def model_section(
    machine: dict[str, float], results: dict[str, list[Result]], shapes, hidden, counted: dict[str, float]
) -> list[str]:
    peak = machine["mm_GFLOPs"] * 1e9
    bw = machine["bandwidth_GBs"] * 1e9
    f, d = model.SOAP_FREQ_DEFAULT, model.SOAP_MAX_DIM_DEFAULT
    rows = [
        ("adamw", "all", model.adamw_cost(shapes), "a",
         ["soapdsl adamw", "soapdsl adamw compiled", "torch AdamW foreach", "torch AdamW fused"]),
        ("muon", "hidden", model.muon_cost(hidden), "b",
         ["soapdsl muon", "soapdsl muon compiled", "torch Muon fp32", "heavyball Muon fp32"]),
        ("muon gram", "hidden", model.muon_cost(hidden, form="gram"), "b", ["soapdsl muon gram"]),
        ("soap", "all", model.soap_cost(shapes, f, d), "c",
         ["soapdsl soap", "soapdsl soap compiled", "SoapV2Ref loop", "heavyball SOAP", "pytorch_optimizer SOAP"]),
        ("soap_muon", "all", model.soap_muon_cost(shapes, f), "d",
         ["soapdsl soap_muon", "soapdsl soap_muon compiled"]),
        ("soap_muon gram", "all", model.soap_muon_cost(shapes, f, form="gram"), "d", ["soapdsl soap_muon gram"]),
    ]  # fmt: skip
    out = [
        f"Machine, measured in this run: memory bandwidth {machine['bandwidth_GBs']:.1f} GB/s (copy"
        f" {machine['copy_GBs']:.1f}, add {machine['add_GBs']:.1f}, in-place add {machine['add__GBs']:.1f});"
        f" fp32 matmul {machine['mm_GFLOPs']:.0f} GFLOP/s"
        f" ({int(machine.get('mm_size', 1024))}^3), batched 256x1024x256 bmm {machine['bmm256_GFLOPs']:.0f} GFLOP/s.",
        "",
        "Lower bound = max(flops / matmul peak, bytes / bandwidth) of the cheapest form of the step"
        " (benchmarks/model.py; a refresh amortised over its period). *Counted* is the matmul work soapdsl's"
        " step actually executes (torch.utils.flop_counter over one refresh period; QR and eigh not included)"
        " and the time it takes at the matmul peak.",
        "",
        "| recipe (params) | model GFLOP/step (matmul, QR, eigh) | model MB/step | lower bound ms |"
        " counted matmul GFLOP/step (soapdsl) | counted at peak ms | measured (amortised) ms / lower bound |",
        "|---|---|---|---|---|---|---|",
    ]
    parts = []
    for name, subset, lo, g, labels in rows:
        meas = []
        for lab in labels:
            r = _find(results, g, lab)
            if r is not None:
                meas.append(f"{lab}: {_ms(r.amortised)} ms = {r.amortised / lo.bound(peak, bw):.1f}x")
        cnt = counted.get(name)
        cnt_cells = f"{cnt / 1e9:.2f} | {cnt / peak * 1e3:.1f}" if cnt is not None else "not counted | "
        out.append(
            f"| {name} ({subset}) | {lo.flops / 1e9:.2f} | {lo.bytes / 1e6:.0f} | {lo.bound(peak, bw) * 1e3:.1f} |"
            f" {cnt_cells} | {'<br>'.join(meas)} |"
        )
        parts.append(
            f"- {name}: "
            + "; ".join(f"{k} {v[0] / 1e9:.2f} GFLOP / {v[1] / 1e6:.0f} MB" for k, v in sorted(lo.parts.items()))
        )
    return out + ["", "Model, per part (per step, refresh amortised):", "", *parts]


def profile_section(profs: list[Profile]) -> list[str]:
    out = []
    for p in profs:

        def share(ms: float, wall: float = p.wall_ms) -> str:
            return f"{100 * ms / wall:.0f}%"

        inside = "GPU kernels of aten ops" if p.device == "cuda" else "inside aten ops"
        outside = (
            "GPU idle (launches, Python, dispatch)"
            if p.device == "cuda"
            else "outside aten (Python, dispatch, profiler)"
        )
        out.append(
            f"**{p.label}** ({p.steps} steps profiled, per step): wall {p.wall_ms:.1f} ms under the profiler"
            f" ({p.plain_ms:.1f} ms without); {inside} {p.aten_ms:.1f} ms; {outside} {p.overhead_ms:.1f} ms"
            f" ({share(p.overhead_ms)}); {p.calls:.0f} aten calls;"
            f" {p.faults:.0f} minor page faults ({p.faults * 4096 / 2**20:.0f} MiB of fresh pages)."
        )
        out.append("")
        out.append("| where | ms/step | share of wall |")
        out.append("|---|---|---|")
        for cat, ms in p.categories.items():
            out.append(f"| {cat} | {ms:.1f} | {share(ms)} |")
        out.append(f"| {outside} | {p.overhead_ms:.1f} | {share(p.overhead_ms)} |")
        out.append("")
        out.append(
            f"Top ops by self {'GPU' if p.device == 'cuda' else 'CPU'} time: "
            + ", ".join(f"`{n}` {ms:.1f} ms ({c:.3g} calls)" for n, ms, c in p.top)
        )
        out.append("")
    return out


def _carried_analysis(previous: str | None) -> str:
    if previous and START in previous and END in previous:
        return previous[previous.index(START) : previous.index(END) + len(END)]
    return f"{START}\n(no analysis written yet)\n{END}"


def render(
    *,
    command: str,
    started: str,
    uptime_start: str,
    uptime_end: str,
    elapsed_s: float,
    quick: bool,
    info: dict[str, str],
    machine: dict[str, float],
    groups: list[Group],
    results: dict[str, list[Result]],
    bf16: list[Result],
    profiles: list[Profile],
    counted: dict[str, float],
    shapes: Any,
    hidden: Any,
    previous: str | None,
) -> str:
    lines = ["# soapdsl step-time benchmark", ""]
    if quick:
        lines += ["**Smoke run (--quick): one round, short warm-up, nothing compiled. Not results.**", ""]
    lines += [
        "Produced by:",
        "",
        "```",
        command,
        "```",
        "",
        f"- date: {started}; the whole run took {elapsed_s:.0f} s",
        *[f"- {k}: {v}" for k, v in info.items()],
        f"- `uptime` at start: `{uptime_start}`",
        f"- `uptime` at end: `{uptime_end}`",
        "- parameter set: GPT-like, d=256, 4 blocks, vocab 4096 (benchmarks/params.py):"
        f" {sum(math.prod(s) for _, s in shapes):,} parameters in {len(shapes)} tensors; hidden 2-D matrices:"
        f" {sum(math.prod(s) for _, s in hidden):,} in {len(hidden)}",
        "- timing: interleaved rounds (order rotated per round), warm-up excluded, only `opt.step()` timed;"
        " amortised = total time of whole refresh periods / steps (= mean for refresh-free optimizers);"
        " ratios are soapdsl / peer, below 1 means soapdsl is faster",
        *(
            [
                "- on a GPU: every timed step is synchronised before and after; the targets were set for the"
                " 2-core CPU, so here their ratios and verdicts are for information",
            ]
            if info.get("device") == "cuda"
            else []
        ),
        "",
        "## Targets",
        "",
        *targets_table(results, quick),
        "",
        "State bytes equal the closed-form formula for each soapdsl recipe: " + _state_verdict(groups, results),
        "",
        "Compiled (`torch_compile=True`) routes vs eager: " + _compile_verdict(results),
        "",
    ]
    for g in groups:
        res = results.get(g.key, [])
        lines += [
            f"## Group {g.key}: {g.title}",
            "",
            f"{g.rounds} rounds x {g.steps_per_round} steps per optimizer after {g.warmup} warm-up steps.",
            "",
            *group_table(g, res),
            "",
        ]
        if g.key == "b" and bf16:
            lines += [
                "As shipped, with bf16 Newton-Schulz (one warm-up step, then 2 timed steps each, not interleaved:"
                " bf16 matmul on this CPU is the bottleneck):",
                "",
                *[f"- {r.label}: {_ms(r.median)} ms median" + (f" (ERROR {r.error})" if r.error else "") for r in bf16],
                "",
            ]
    lines += ["## State bytes", "", *state_table(groups, results), ""]
    lines += ["## FLOP/byte model", "", *model_section(machine, results, shapes, hidden, counted), ""]
    if profiles:
        where = "GPU" if profiles[0].device == "cuda" else "CPU"
        lines += [f"## Profiles (torch.profiler, {where})", "", *profile_section(profiles)]
    lines += ["## Analysis", "", _carried_analysis(previous), ""]
    return "\n".join(lines)


def render_many(
    *,
    command: str,
    started: str,
    uptime_start: str,
    uptime_end: str,
    elapsed_s: float,
    quick: bool,
    info: dict[str, str],
    groups: list[Group],
    results: dict[str, list[Result]],
    shapes: Any,
) -> str:
    """The section that ``--many`` prints: each group's table, on the many-small-tensors set."""
    keep = ("device", "torch threads", "torch", "soapdsl commit")
    lines = ["### Host overhead: many small parameters", ""]
    if quick:
        lines += ["**Smoke run (--quick): one round, short warm-up. Not results.**", ""]
    lines += [
        "```",
        command,
        "```",
        "",
        f"- date: {started}; {elapsed_s:.0f} s; " + "; ".join(f"{k} {info[k]}" for k in keep if k in info),
        f"- `uptime` at start: `{uptime_start}`; at end: `{uptime_end}`",
        "- parameter set: GPT-2-shaped with biases, d=32, 48 blocks, vocab 512 (benchmarks/params.py many_shapes):"
        f" {sum(math.prod(s) for _, s in shapes):,} parameters in {len(shapes)} tensors of at most"
        f" {max(math.prod(s) for _, s in shapes):,} elements",
        "",
    ]
    for g in groups:
        lines += [
            f"Group {g.key}: {g.title}; {g.rounds} rounds x {g.steps_per_round} steps after {g.warmup} warm-up steps.",
            "",
            *group_table(g, results.get(g.key, [])),
            "",
        ]
    return "\n".join(lines)


def _state_verdict(groups: list[Group], results: dict[str, list[Result]]) -> str:
    bad, n = [], 0
    for g in groups:
        for r in results.get(g.key, []):
            if r.formula_bytes is None or r.state_bytes is None:
                continue
            n += 1
            if r.state_bytes != r.formula_bytes or (r.plan_bytes is not None and r.plan_bytes != r.formula_bytes):
                bad.append(f"{g.key}/{r.label}")
    if n == 0:
        return "not measured"
    return "PASS (all equal)" if not bad else "MISS: " + ", ".join(bad)


def _compile_verdict(results: dict[str, list[Result]]) -> str:
    items = [f"{r.label}: {r.match}" for res in results.values() for r in res if r.match]
    return "; ".join(items) if items else "not run"

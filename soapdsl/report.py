"""Rendering a Plan: the text and JSON that `soapdsl compile` prints."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from soapdsl import ir, registry
from soapdsl.compiler import FORMAT_VERSION, RoutePlan, is_empty, op_state_bytes, state_dtype, walk_ops
from soapdsl.runtime.fsdp import how_sharded

if TYPE_CHECKING:
    from soapdsl.compiler import Plan


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple | list):
        return [_jsonable(i) for i in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, ir.Pipeline):
        return v.text()
    return v


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"  # pragma: no cover


def _stage_json(path: str, stage: ir.Stage) -> dict[str, Any]:
    cls = registry.get(stage.op)
    dynamic = cls.dynamic_fields() if cls else frozenset()
    given = dict(stage.args)
    args = {}
    for name, default in ir.defaults_of(stage.op).items():
        if name in given:
            v = given[name]
            args[name] = {
                "text": v.text(),
                "dynamic": name in dynamic and bool(v.refs()),
                "refs": sorted(v.refs()),
            }
        else:
            args[name] = {"text": ir.const_text(default), "dynamic": False, "refs": []}
    out: dict[str, Any] = {"path": path, "op": stage.op, "args": args, "text": stage.text(filled=True)}
    if stage.via:
        out["via"] = list(stage.via)
    if stage.implicit:
        out["implicit"] = True
    if stage.label:
        out["label"] = stage.label
    return out


def _state_rows(rp: RoutePlan) -> tuple[list[tuple[str, str]], bool]:
    """Each state entry of the route and what it holds, and whether a row names the parameter's
    dims (d0, d1, ...): where the route's parameters differ in shape, an entry shaped by them (a
    factor [d0, d0]) is told by their dims, and one that some shapes keep not names those."""
    # each shape once, in the order of the parameters; an empty one keeps no state
    shapes = list(dict.fromkeys(tuple(e.shape) for e in rp.params if not is_empty(e.shape)))
    held: dict[str, dict[tuple[int, ...], tuple[int, ...]]] = {}  # in the order of the stages
    for op in walk_ops(rp.ops):
        for shape in shapes:
            for name, spec in op.state(shape).items():
                held.setdefault(op.state_key(name), {})[shape] = tuple(spec.shape)
    rows = []
    symbolic = False
    for key, by_shape in held.items():
        if all(spec == shape for shape, spec in by_shape.items()):
            text = "like the parameter"
        elif len(set(by_shape.values())) == 1:
            text = str(list(next(iter(by_shape.values()))))
        else:
            dims = _dims_of(by_shape)
            symbolic |= dims is not None
            text = dims or "; ".join(f"{list(spec)} for {list(shape)}" for shape, spec in by_shape.items())
        absent = [str(list(shape)) for shape in shapes if shape not in by_shape]
        rows.append((key, text + (f"; none for {', '.join(absent)}" if absent else "")))
    return rows, symbolic


def _dims_of(by_shape: Mapping[tuple[int, ...], tuple[int, ...]]) -> str | None:
    """'[d0, d0]' where every parameter's entry has its dims in the same places, else None."""
    if len({len(spec) for spec in by_shape.values()}) != 1:
        return None
    names = []
    for j in range(len(next(iter(by_shape.values())))):
        common = set.intersection(
            *({i for i, d in enumerate(shape) if d == spec[j]} for shape, spec in by_shape.items())
        )
        if not common:
            return None
        names.append(f"d{min(common)}")
    return f"[{', '.join(names)}]"


def share_groups(rp: RoutePlan) -> dict[str, list[list[str]]]:
    """Op path -> the groups (of two or more parameters) that share that op's state."""
    out: dict[str, list[list[str]]] = {}
    for op in walk_ops(rp.ops):
        if not any(spec.shared for e in rp.params for spec in op.state(e.shape).values()):
            continue
        groups: dict[str, list[str]] = {}
        for e in rp.params:
            if is_empty(e.shape):
                continue  # never stepped: it shares nothing
            groups.setdefault(op.share_key(e.name), []).append(e.name)
        shared = [members for members in groups.values() if len(members) > 1]
        if shared:
            out[op.path] = shared
    return out


def shared_savings(rp: RoutePlan) -> int:
    """Bytes of state that sharing saves in a route."""
    return sum(op_state_bytes(rp.ops, e.shape, e.dtype) - e.state_bytes for e in rp.params)


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    routes = []
    for rp in plan.routes:
        buckets: dict[str, int] = {}
        for p in rp.params:
            if is_empty(p.shape):
                continue  # never stepped, so in no batch
            buckets[str(list(p.shape))] = buckets.get(str(list(p.shape)), 0) + 1
        routes.append(
            {
                "index": rp.index,
                "selector": rp.selector,
                "settings": {k: v.text() for k, v in rp.route.settings},
                "options": {k: _jsonable(v) for k, v in rp.options.items()},
                "param_group": {k: _jsonable(v) for k, v in rp.hyper.items()},
                "batched": rp.batched,
                "fused": None if rp.fused is None else rp.fused.kernel,
                "pipeline": [_stage_json(path, s) for path, s in rp.route.pipeline.walk()],
                "params": [p.name for p in rp.params],
                "buckets": buckets if rp.batched else {},
                "state_keys": [k for k, _ in _state_rows(rp)[0]],
                "state_bytes": sum(p.state_bytes for p in rp.params),
                "share_groups": share_groups(rp),
                "shared_savings_bytes": shared_savings(rp),
                "fsdp2": dict(zip(("steps", "why"), how_sharded(rp), strict=True)),
            }
        )
    pb, sb = plan.param_bytes(), plan.state_bytes()
    return {
        "format": FORMAT_VERSION,
        "recipe": {
            "name": plan.recipe.name,
            "file": plan.recipe.file,
            "fingerprint": plan.fingerprint,
            "doc": plan.recipe.doc,
        },
        "args": {k: _jsonable(v) for k, v in plan.args.items()},
        "routes": routes,
        "params": [
            {
                "name": p.name,
                "shape": list(p.shape),
                "dtype": str(p.dtype).removeprefix("torch."),
                "route": p.route,
                "bytes": p.bytes,
                "state_bytes": p.state_bytes,
                "state_dtype": str(state_dtype(p.dtype)).removeprefix("torch."),
                "notes": p.notes,
            }
            for p in plan.params
        ],
        "totals": {
            "param_bytes": pb,
            "state_bytes": sb,
            "state_per_param_byte": round(sb / pb, 4) if pb else 0.0,
        },
    }


def _pipeline_lines(pipeline: ir.Pipeline, indent: str, prefix: str = "") -> list[str]:
    lines = []
    for i, stage in enumerate(pipeline.stages):
        path = f"{prefix}{i}"
        text = stage.text(filled=True) if stage.body is None else _head(stage)
        notes = []
        if stage.via:
            notes.append("via " + " > ".join(stage.via))
        if stage.implicit:
            notes.append("implicit")
        note = f"    # {', '.join(notes)}" if notes else ""
        lines.append(f"{indent}{path:<6}{text}{note}")
        if stage.body is not None:
            lines.extend(_pipeline_lines(stage.body, indent + "  ", path + "."))
            lines.append(f"{indent}      }}")
    return lines


def _head(stage: ir.Stage) -> str:
    bare = ir.Stage(stage.op, stage.args, None, stage.label, stage.implicit, stage.via, stage.loc)
    return bare.text(filled=True) + " {"


def plan_to_text(plan: Plan) -> str:
    r = plan.recipe
    out = [f"recipe {r.name}  ({r.file})  fingerprint {plan.fingerprint}"]
    if r.doc:
        out.append("  " + r.doc.splitlines()[0])
    out.append("arguments: " + ", ".join(f"{k}={ir.const_text(v)}" for k, v in plan.args.items()))
    for rp in plan.routes:
        out.append("")
        settings = ""
        if rp.route.settings:
            settings = " [" + ", ".join(f"{k}={v.text()}" for k, v in rp.route.settings) + "]"
        if rp.batched:
            batched = "batched by shape"
        elif rp.fused is not None:
            kernel = {"adamw": "AdamW", "adam": "Adam"}[rp.fused.kernel]
            batched = f"per parameter, torch's fused {kernel} kernel (CPU or CUDA)"
        else:
            batched = "per parameter (foreach)"
        count = f"{len(rp.params)} param" + ("" if len(rp.params) == 1 else "s")
        out.append(f"route {rp.index}: {rp.selector}{settings}  ({count}, {batched})")
        group = ", ".join(f"{k}={ir.const_text(v)}" for k, v in rp.hyper.items())
        out.append(f"  param_group: {group}")
        out.append("  pipeline:")
        out.extend(_pipeline_lines(rp.route.pipeline, "    "))
        rows, symbolic = _state_rows(rp)
        if rows:
            out.append("  state per parameter" + (" (d0, d1, ...: the parameter's dims):" if symbolic else ":"))
            width = max(len(k) for k, _ in rows)
            out.extend(f"    {k:<{width}}  {like}" for k, like in rows)
        elif rp.params:
            out.append("  state per parameter: none")
        groups = share_groups(rp)
        for path, members in groups.items():
            out.append(f"  shared by stage {path} (one state per group, held by its first parameter):")
            out.extend(f"    {', '.join(g)}" for g in members)
        if groups:
            out.append(f"  sharing saves {human_bytes(shared_savings(rp))} of state")
        how, why = how_sharded(rp)
        where = "each rank steps its own rows" if how == "rows" else "each parameter is stepped whole on one owner rank"
        out.append(f"  under FSDP2: {where} ({why})")
    params = plan.params
    if params:
        out.append("")
        out.append("routing:")
        nw = max(12, *(len(p.name) for p in params))
        sw = max(8, *(len(str(list(p.shape))) for p in params))
        noted = any(p.notes for p in params)
        out.append(
            f"  {'parameter':<{nw}}  {'shape':<{sw}}  route  {'state':>12}  state/param bytes"
            + ("  notes" if noted else "")
        )
        for p in params:
            ratio = p.state_bytes / p.bytes if p.bytes else 0.0
            row = f"  {p.name:<{nw}}  {list(p.shape)!s:<{sw}}  {p.route:>5}  {human_bytes(p.state_bytes):>12}  "
            out.append(row + (f"{ratio:<17.2f}  {'; '.join(p.notes)}" if p.notes else f"{ratio:.2f}"))
        pb, sb = plan.param_bytes(), plan.state_bytes()
        out.append("")
        out.append(
            f"state: {human_bytes(sb)} for {human_bytes(pb)} of parameters"
            f" ({sb / pb if pb else 0.0:.2f} bytes per parameter byte)"
        )
    return "\n".join(out) + "\n"

"""SoapOptimizer: a torch.optim.Optimizer that executes a Plan.

* one param_group per route, holding "lr" and the recipe's hyperparameters (LR schedulers
  and users may change them; stages that follow a recipe parameter read them every step);
* lazy state in ``self.state[param]`` (torch's conventions; keys namespaced by the stage's
  position, e.g. ``"1.momentum.buf"``), with a ``"step"`` count per parameter;
* parameters of equal shape in a batched route are stacked and run as one batch; their state
  lives in one slab per state key and ``self.state[param]`` holds views into it;
* no host-device synchronisation inside ``step()``: every decision is taken from host-side
  step counts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from soapdsl.compiler import FORMAT_VERSION, Plan, RoutePlan, state_dtype, walk_ops, walk_shaped
from soapdsl.errors import SoapArgumentError, SoapError, SoapStateError
from soapdsl.registry import Op
from soapdsl.runtime import fused
from soapdsl.runtime.context import Bucket, Ctx, Val

__all__ = ["SoapOptimizer"]


def run_ops(ctx: Ctx, ops: Sequence[Op], x: Val) -> Val:
    """Run ``ops`` in order, applying or dropping the pending scale where an op needs it,
    and recording the values that later stages read (probes)."""
    for op in ops:
        if op.probes_before:  # type: ignore[attr-defined]
            x = ctx.materialize(x)
            for reader in op.probes_before:  # type: ignore[attr-defined]
                reader.record(ctx, x)
        if x.denom is not None and not op.passes_quotient:
            x = ctx.resolve(x)
        if ctx.scale != 1.0 and not op.linear:
            if op.homogeneous and ctx.scale > 0:
                pass
            elif op.scale_invariant and ctx.scale > 0:
                ctx.scale = 1.0
            else:
                x = ctx.materialize(x)
        x = op.apply(ctx, x)
        if op.probes_after:  # type: ignore[attr-defined]
            x = ctx.materialize(x)
            for reader in op.probes_after:  # type: ignore[attr-defined]
                reader.record(ctx, x)
    return x


_MISSING = object()


def _key(item: tuple[tuple[int, tuple[Any, ...]], Any]) -> tuple[int, str]:
    (t, host), _ = item
    return (t, repr(host))


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    numbers = (int, float)
    return isinstance(a, numbers) and isinstance(b, numbers) and a == b and type(a) is type(b)


@dataclass
class _Cohort:
    t: int  # steps taken so far
    host: dict[str, Any]  # host-side state values shared by the cohort
    buckets: list[Bucket]
    states: dict[str, dict[str, list[torch.Tensor]]]
    steps: torch.Tensor  # 1-D, on the CPU: the "step" state of every parameter is a 0-d view of it
    # fused Adam's parameters with their m, v and step tensors, aligned (built on first use)
    fused: fused.Tensors | None = None

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for b in self.buckets for p in b.params]


@dataclass
class _Layout:
    signature: tuple[int, ...]
    cohorts: list[_Cohort]


class SoapOptimizer(torch.optim.Optimizer):
    """A torch optimizer compiled from a soapdsl recipe. Build it with :func:`soapdsl.build`."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self._routes: list[RoutePlan] = [rp for rp in plan.routes if rp.tensors]
        self._names: dict[int, str] = {
            id(t): e.name for rp in self._routes for t, e in zip(rp.tensors, rp.params, strict=True)
        }
        groups = [{"params": list(rp.tensors), **rp.hyper, "route": rp.selector} for rp in self._routes]
        if not groups:
            raise SoapArgumentError("the optimizer got an empty parameter list")
        self._sealed = False
        try:
            super().__init__(groups, {})
        except (ValueError, TypeError) as e:
            raise SoapArgumentError(str(e)) from None
        self._sealed = True
        self._layouts: dict[int, _Layout] = {}
        self._steps: dict[int, int] = {}  # host mirror of each parameter's step count
        # routes with the `compile` option run their pipeline through torch.compile
        self._runners: dict[int, Callable[..., Val]] = {
            rp.index: torch.compile(run_ops, dynamic=True) if rp.options.get("compile") else run_ops
            for rp in self._routes
        }
        # Adam-shaped routes run through torch's fused kernel where it applies (runtime/fused.py)
        self._fused: dict[int, fused.FusedAdam | None] = {rp.index: rp.fused for rp in self._routes}
        # hyperparameters that stages follow: re-validated whenever their values change
        self._watched: list[tuple[str, ...]] = [
            tuple(sorted({r for op in walk_ops(rp.ops) for v in op.dynamic.values() for r in v.refs()} | {"lr"}))
            for rp in self._routes
        ]
        self._validated: list[tuple[Any, ...] | None] = [None] * len(self._routes)

    # -- torch API ----------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_sealed", False):
            raise SoapArgumentError(
                "a soapdsl optimizer's param_groups are its routes; build a new optimizer (or add a"
                " route to the recipe) to optimize more parameters"
            )
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for i, (rp, group) in enumerate(zip(self._routes, self.param_groups, strict=True)):
            self._check_hyperparameters(i, rp, group)
            for cohort in self._layout(rp, group).cohorts:
                self._run(rp, group, cohort)
        return loss

    def _check_hyperparameters(self, i: int, rp: RoutePlan, group: dict[str, Any]) -> None:
        """Validate the param_group values the stages follow, when they changed since last step."""
        keys = self._watched[i]
        values = tuple(group.get(k, _MISSING) for k in keys)
        previous = self._validated[i]
        if previous is not None and all(_same(a, b) for a, b in zip(values, previous, strict=True)):
            return
        for key, value in zip(keys, values, strict=True):
            if value is _MISSING:
                raise SoapArgumentError(f"param_group of route '{rp.selector}' lost its key '{key}'")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise SoapArgumentError(
                    f"param_group['{key}'] of route '{rp.selector}' must be a number, got {type(value).__name__}"
                )
        for op in walk_ops(rp.ops):
            if op.dynamic:
                op.revalidate(group)
        self._validated[i] = values

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["soapdsl"] = {
            "format": FORMAT_VERSION,
            "recipe": self.plan.recipe.name,
            "fingerprint": self.plan.fingerprint,
            "routes": [rp.selector for rp in self._routes],
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._check_state_dict(state_dict)
        saved_groups = state_dict["param_groups"]
        id_map: dict[Any, torch.Tensor] = {}
        for saved, group in zip(saved_groups, self.param_groups, strict=True):
            id_map.update(zip(saved["params"], group["params"], strict=True))
        new_state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
        for key, value in state_dict["state"].items():
            if key not in id_map:
                raise SoapStateError(f"state dict holds state for parameter index {key!r}, which this optimizer lacks")
            p = id_map[key]
            new_state[p] = self._load_param_state(p, value)
        for saved, group in zip(saved_groups, self.param_groups, strict=True):
            for k, v in saved.items():
                if k != "params":
                    group[k] = v
        self.state = new_state
        self._layouts.clear()
        self._steps.clear()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __repr__(self) -> str:
        lines = [f"SoapOptimizer(recipe={self.plan.recipe.name!r}"]
        for rp, g in zip(self._routes, self.param_groups, strict=True):
            lines.append(f"  route {rp.selector}: {len(g['params'])} params, lr={g['lr']}")
        return "\n".join(lines) + "\n)"

    # -- state dict checks --------------------------------------------------------------------

    def _check_state_dict(self, sd: Any) -> None:
        if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
            raise SoapStateError("not an optimizer state dict (needs 'state' and 'param_groups')")
        meta = sd.get("soapdsl")
        if not isinstance(meta, dict):
            raise SoapStateError(
                "this state dict was not saved by a soapdsl optimizer (it has no 'soapdsl' entry);"
                f" this optimizer runs recipe '{self.plan.recipe.name}'"
            )
        if meta.get("format") != FORMAT_VERSION:
            raise SoapStateError(
                f"state dict format {meta.get('format')!r} cannot be read; this soapdsl reads format {FORMAT_VERSION}"
            )
        if meta.get("fingerprint") != self.plan.fingerprint or meta.get("recipe") != self.plan.recipe.name:
            raise SoapStateError(
                f"state dict was saved by recipe '{meta.get('recipe')}' (fingerprint"
                f" {meta.get('fingerprint')}), but this optimizer runs recipe"
                f" '{self.plan.recipe.name}' (fingerprint {self.plan.fingerprint})"
            )
        groups = sd["param_groups"]
        mine = [len(g["params"]) for g in self.param_groups]
        theirs = [len(g.get("params", ())) for g in groups] if isinstance(groups, list) else []
        if mine != theirs:
            raise SoapStateError(
                f"state dict has routes with {theirs} parameters, this optimizer has {mine}:"
                " it was saved for a different model"
            )

    def _load_param_state(self, p: torch.Tensor, saved: dict[str, Any]) -> dict[str, Any]:
        expected = self._state_specs(self._route_of(p), p)
        out: dict[str, Any] = {}
        name = self._names.get(id(p), "?")
        for key, value in saved.items():
            if key == "step":
                out[key] = value.detach().to("cpu", copy=True) if torch.is_tensor(value) else torch.tensor(float(value))
                continue
            if key in expected and torch.is_tensor(value):
                shape, dtype = expected[key]
                if tuple(value.shape) != shape:
                    raise SoapStateError(
                        f"state '{key}' of parameter '{name}' has shape {list(value.shape)}, expected {list(shape)}"
                    )
                out[key] = value.detach().to(device=p.device, dtype=dtype, copy=True)
            elif torch.is_tensor(value):
                raise SoapStateError(f"state dict holds unknown state '{key}' for parameter '{name}'")
            else:
                out[key] = value
        missing = set(expected) - set(out)
        if out and missing:
            raise SoapStateError(f"state dict lacks state {sorted(missing)} for parameter '{name}'")
        return out

    def _route_of(self, p: torch.Tensor) -> RoutePlan:
        for rp, g in zip(self._routes, self.param_groups, strict=True):
            if any(q is p for q in g["params"]):
                return rp
        raise SoapError("parameter is not managed by this optimizer")  # pragma: no cover

    # -- layout -------------------------------------------------------------------------------

    def _state_specs(self, rp: RoutePlan, p: torch.Tensor) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        out = {}
        for op, shape in walk_shaped(rp.ops, tuple(p.shape)):
            for name, spec in op.state(shape).items():
                if not spec.shared or self._leads(op, p):
                    out[op.state_key(name)] = (spec.shape, state_dtype(p.dtype))
        return out

    def _init_state(self, rp: RoutePlan, p: torch.Tensor) -> None:
        st = self.state[p]
        st["step"] = torch.zeros((), dtype=torch.float32)
        for op, shape in walk_shaped(rp.ops, tuple(p.shape)):
            for name, value in op.host_state(shape).items():
                st[op.state_key(name)] = value
            for name, spec in op.state(shape).items():
                if spec.shared and not self._leads(op, p):
                    continue  # the group's leader holds the shared tensor
                t = torch.zeros(spec.shape, dtype=state_dtype(p.dtype), device=p.device)
                if spec.init == "eye":
                    t.copy_(torch.eye(spec.shape[-2], spec.shape[-1], dtype=t.dtype, device=t.device).expand_as(t))
                st[op.state_key(name)] = t

    def _leads(self, op: Op, p: torch.Tensor) -> bool:
        """Whether ``p`` is the first parameter of its share group for ``op``."""
        name = self._names.get(id(p), "")
        key = op.share_key(name)
        for q in self._route_of(p).tensors:
            if op.share_key(self._names.get(id(q), "")) == key:
                return q is p
        return True  # pragma: no cover

    def _layout(self, rp: RoutePlan, group: dict[str, Any]) -> _Layout:
        active = [p for p in group["params"] if p.grad is not None]
        signature = tuple(id(p) for p in active)
        cached = self._layouts.get(rp.index)
        if cached is not None and cached.signature == signature:
            return cached
        for p in active:
            if p.grad.is_sparse:
                raise SoapArgumentError(
                    f"parameter '{self._names.get(id(p))}' has a sparse gradient, which soapdsl does not support"
                )
            if not self.state[p]:
                self._init_state(rp, p)
        by_step: dict[tuple[Any, ...], list[torch.Tensor]] = {}
        for p in active:
            st = self.state[p]
            host = tuple(sorted((k, v) for k, v in st.items() if k != "step" and not torch.is_tensor(v)))
            steps = self._steps.get(id(p))
            if steps is None:  # first seen since construction or a load: read the CPU counter once
                steps = self._steps[id(p)] = int(st["step"])
            by_step.setdefault((steps, host), []).append(p)
        if len(by_step) > 1:
            for op in walk_ops(rp.ops):
                if op.reduces_over_route():
                    counts = sorted({t for t, _ in by_step})
                    lagging = self._names.get(id(by_step[min(by_step)][0]), "?")
                    raise SoapArgumentError(
                        f"'{op.name}' reduces over all parameters of route '{rp.selector}', but they have"
                        f" taken different numbers of steps ({', '.join(map(str, counts))}; e.g."
                        f" '{lagging}' had no gradient at some step): give every parameter a gradient at"
                        " every step, or use a per-tensor variant",
                        getattr(op, "loc", None),
                    )
        cohorts = [self._cohort(rp, t, dict(host), ps) for (t, host), ps in sorted(by_step.items(), key=_key)]
        layout = _Layout(signature, cohorts)
        self._layouts[rp.index] = layout
        return layout

    def _cohort(self, rp: RoutePlan, t: int, host: dict[str, Any], params: list[torch.Tensor]) -> _Cohort:
        if rp.batched:
            groups: dict[tuple[Any, ...], list[torch.Tensor]] = {}
            for p in params:
                groups.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
            buckets = [Bucket(ps, key[0], True) for key, ps in groups.items()]
        else:  # one bucket per parameter; a leading dim of 1 (a view) where matrix ops need one
            buckets = [Bucket([p], tuple(p.shape), rp.needs_batch_dim) for p in params]
        for b in buckets:
            b.names = [self._names.get(id(p), "?") for p in b.params]
        states: dict[str, dict[str, list[torch.Tensor]]] = {}
        for j, b in enumerate(buckets):
            for op, shape in walk_shaped(rp.ops, b.shape):
                per_op = states.setdefault(op.path, {})
                for name, spec in op.state(shape).items():  # names may depend on the shape
                    key = op.state_key(name)
                    slab = self._shared_slab(rp, op, b, key) if spec.shared else self._slab(b, key)
                    # a bucket whose shape lacks this state keeps None; its op never reads it
                    per_op.setdefault(name, [None] * len(buckets))[j] = slab  # type: ignore[list-item]
        for op in walk_ops(rp.ops):
            states.setdefault(op.path, {})
        # the step counters as one slab too: a step counts them all with one add_ instead of one
        # per parameter (the host's share of a small model's step time on a GPU)
        steps = self._slab(Bucket(params, (), True), "step")
        return _Cohort(t, host, buckets, states, steps)

    def _shared_slab(self, rp: RoutePlan, op: Op, bucket: Bucket, key: str) -> torch.Tensor:
        """A slab with one entry per share group of the bucket; records member -> slot."""
        keys = [op.share_key(n) for n in bucket.names]
        slots = list(dict.fromkeys(keys))
        leaders = []
        for k in slots:
            leader = next(
                (p for p in bucket.params if key in self.state[p] and op.share_key(self._names.get(id(p), "")) == k),
                None,
            )
            if leader is None:
                members = [n for n in bucket.names if op.share_key(n) == k]
                raise SoapArgumentError(
                    f"'{op.name}' shares state within group '{k}', but its first parameter is not"
                    f" stepping with {members}: every parameter of a share group must have a"
                    " gradient at every step",
                    getattr(op, "loc", None),
                )
            leaders.append(leader)
        bucket.groups[op.path] = (
            None if len(slots) == len(keys) else torch.tensor([slots.index(k) for k in keys], device=leaders[0].device)
        )
        return self._slab(Bucket(leaders, bucket.shape, bucket.stacked), key)

    def _slab(self, bucket: Bucket, key: str) -> torch.Tensor:
        tensors = [self.state[p][key] for p in bucket.params]
        if not bucket.stacked:
            return tensors[0]
        if len(tensors) == 1:
            return tensors[0].unsqueeze(0)  # a view: in-place updates reach the state
        base = tensors[0]._base
        if (
            base is not None
            and base.shape[0] == len(tensors)
            and all(t._base is base and t.data_ptr() == base[i].data_ptr() for i, t in enumerate(tensors))
        ):
            return base
        slab = torch.stack(tensors)
        for i, p in enumerate(bucket.params):
            self.state[p][key] = slab[i]
        return slab

    # -- execution ----------------------------------------------------------------------------

    def _run(self, rp: RoutePlan, group: dict[str, Any], cohort: _Cohort) -> None:
        lowered = self._fused[rp.index]
        if lowered is not None and self._run_fused(lowered, group, cohort):
            return
        grads: list[torch.Tensor] = []
        for b in cohort.buckets:
            dtype = state_dtype(b.params[0].dtype)
            if b.stacked and b.size > 1:
                grads.append(torch.stack([p.grad for p in b.params]).to(dtype))  # type: ignore[misc]
            elif b.stacked:
                g = b.params[0].grad
                assert g is not None
                grads.append((g if g.dtype == dtype else g.to(dtype)).unsqueeze(0))
            else:
                g = b.params[0].grad
                assert g is not None
                grads.append(g if g.dtype == dtype else g.to(dtype))
        t = cohort.t + 1
        ctx = Ctx(group, t, cohort.buckets, grads, cohort.states, run_ops, host=cohort.host)
        ops = list(walk_ops(rp.ops))
        proceed = [op.before(ctx) for op in ops]  # every op sees the step, even when one skips it
        if all(proceed):
            self._runners[rp.index](ctx, rp.ops, Val(grads, owned=False))
            for op in ops:
                op.after(ctx)
            cohort.steps.add_(1.0)
            self._stepped(cohort, t)
        if ctx.host_changed:
            params = cohort.params
            for key, value in ctx._host_writes.items():
                for p in params:
                    self.state[p][key] = value
            self._layouts.pop(rp.index, None)

    def _run_fused(self, f: fused.FusedAdam, group: dict[str, Any], cohort: _Cohort) -> bool:
        """One step of an Adam-shaped route through torch's fused kernel; False: not possible."""
        hyper = f.hyper(group)
        if hyper is None:
            return False
        if cohort.fused is None:
            params = cohort.params
            cohort.fused = fused.Tensors.of(params, [self.state[p] for p in params], cohort.steps, f)
        ts = cohort.fused
        if not fused.usable(ts.params, ts.m, ts.v):
            return False
        ts.advance(cohort.t + 1)
        fused.step(f, ts.params, (ts.m, ts.v), ts.kernel_steps, hyper)
        self._stepped(cohort, cohort.t + 1)
        return True

    def _stepped(self, cohort: _Cohort, t: int) -> None:
        """Record that every parameter of ``cohort`` has taken step ``t`` (its counters already count it)."""
        cohort.t = t
        for b in cohort.buckets:
            for p in b.params:
                self._steps[id(p)] = t

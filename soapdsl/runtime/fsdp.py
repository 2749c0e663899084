"""FSDP2: parameters sharded by ``torch.distributed.fsdp.fully_shard``.

Under FSDP2 every parameter is a DTensor placed ``Shard(0)`` on a 1-D device mesh: each rank
holds a block of its rows and, after the backward's reduce-scatter, the same rows of its
gradient. A soapdsl optimizer built for such parameters steps them in two ways, route by route:

* a route whose stages are all pointwise (``Op.pointwise``: momentum, Adam's moments, bias
  correction, weight decay, the step itself; Adam, AdamW, Lion-like and SGD pipelines) runs on
  each rank's own rows, with state of their shape and no communication;
* any other route (a matrix stage, a norm over a parameter, state shared between parameters)
  gives each parameter one owner rank, chosen when the optimizer is built: the largest first,
  each to the rank holding the fewest elements so far (the members of a share group, and the
  parameters of a route that reduces over all of them, go together). At each step one
  ``all_to_all`` brings every owned parameter's rows, and its gradient's, to its owner; the
  owner runs the route's whole pipeline on the whole tensors, as one process would; a second
  ``all_to_all`` sends every rank its rows of the new values. The state of such a parameter
  lives on its owner only.

The numbers equal one process's: a pointwise stage computes each element from the same
elements wherever it runs, and a matrix is computed whole by the same kernels. Not where a
stage's arithmetic depends on which parameters step beside it: ``shape_scale`` folds its factor
into the step size when the parameters stepping together share one, and multiplies the update
when they do not, so an owner whose share of a Muon route has one factor where the whole route
has several rounds the last bits differently. Nor where torch's fused Adam kernel on the CPU
computes an element in its vector loop for the whole parameter and in its scalar tail for a
rank's rows (one element 1 ulp off, seen on a 13x9 weight split 7 and 6 rows).

The pipelines run in an inner :class:`SoapOptimizer` over plain tensors (``proxies``): a
shard-local parameter's proxy aliases its rows (``set_`` at each step, so that it follows
FSDP's storage), an owned parameter's proxy is a whole-size buffer on its owner, whose memory
is held during a step only. The outer optimizer's ``state`` shows each rank's share (refilled
after each step and load), so that ``state_dict()`` holds it: a rank's checkpoint loads into
the same rank of the same sharding. ``full_state_dict()`` gathers the shares into what one
process would save, and such a whole state dict loads as each rank's part.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from soapdsl.compiler import FORMAT_VERSION, Plan, RoutePlan, is_dtensor, is_empty, walk_ops, walk_shaped
from soapdsl.errors import SoapArgumentError, SoapError, SoapStateError
from soapdsl.runtime.dist import Splitter
from soapdsl.runtime.state import OptimizerState

if TYPE_CHECKING:
    from soapdsl.runtime.optimizer import SoapOptimizer

__all__ = ["Sharded", "how_sharded"]


def how_sharded(rp: RoutePlan) -> tuple[str, str]:
    """How the route steps FSDP2-sharded parameters, and why: ("rows", ...) when every stage
    is pointwise and no state is shared, else ("owner", ...) (``soapdsl compile`` reports it)."""
    whole = next((op for op in walk_ops(rp.ops) if not op.pointwise()), None)
    if whole is not None:
        return "owner", f"'{whole.name}' needs whole parameters"
    if any(
        spec.shared for e in rp.params for op, seen in walk_shaped(rp.ops, e.shape) for spec in op.state(seen).values()
    ):
        return "owner", "state shared between parameters"
    return "rows", "every stage pointwise"


@dataclasses.dataclass
class _Owned:
    """A parameter stepped whole on its owner."""

    param: Any  # the DTensor
    owner: int
    rows: list[int]  # each rank's number of rows
    row_bytes: int  # bytes of one row (of the value; the gradient has the same dtype)
    #: on the owner: the whole parameter, as the inner optimizer steps it (its memory is held
    #: during a step only)
    proxy: torch.Tensor | None


class Sharded:
    """Steps the parameters of an FSDP2 model for a :class:`SoapOptimizer` (see the module doc)."""

    def __init__(self, opt: SoapOptimizer, plan: Plan) -> None:
        dts: list[Any] = [t for rp in opt._routes for t in rp.tensors if is_dtensor(t)]
        mesh = dts[0].device_mesh
        if any(t.device_mesh != mesh for t in dts):
            raise SoapArgumentError(
                "the parameters are DTensors on different device meshes; soapdsl steps parameters"
                " sharded over one mesh (fully_shard the model with one mesh)"
            )
        self.split = Splitter(mesh.get_group(), mode="FSDP2")
        self.rank, self.world = self.split.rank, self.split.world
        # a weak reference: no cycle keeps the optimizer and its process group alive past its
        # last use (a gloo group freed by the interpreter's finalisation can abort the process)
        self.opt: SoapOptimizer = weakref.proxy(opt)  # type: ignore[assignment]
        names = opt._names
        opt._agree(self.split)  # every rank built alike, before their work is paired up
        # each rank's rows of every DTensor (FSDP pads unevenly divided parameters; the last
        # ranks may hold fewer rows, or none)
        mine = [int(t.to_local().shape[0]) for t in dts]
        seen: list[Any] = [None] * self.world
        dist.all_gather_object(seen, mine, group=self.split.group)
        rows = {id(t): [seen[r][i] for r in range(self.world)] for i, t in enumerate(dts)}
        for t in dts:
            if not t.to_local().is_contiguous():
                raise SoapArgumentError(
                    f"parameter '{names.get(id(t), '?')}' has non-contiguous local rows; soapdsl steps"
                    " FSDP2's contiguous shards"
                )
        # the owners: every unit of the routes that cannot run on the rows, the largest first,
        # each to the rank holding the fewest elements so far (the same choice on every rank)
        local_routes = {rp.index for rp in plan.routes if rp.tensors and how_sharded(rp)[0] == "rows"}
        units = [(rp, u) for rp in plan.routes if rp.tensors and rp.index not in local_routes for u in _units(rp)]
        units.sort(key=lambda ru: -sum(math.prod(ru[0].params[i].shape) for i in ru[1]))
        load = [0] * self.world
        owner_of: dict[int, int] = {}
        for rp, unit in units:
            plain = [i for i in unit if not is_dtensor(rp.tensors[i])]
            if len(plain) == len(unit):
                continue  # plain tensors: every rank steps its own, as torch.optim does
            if plain:  # the owner would step them with the rest, every other rank without it
                sharded = next(i for i in unit if is_dtensor(rp.tensors[i]))
                raise SoapArgumentError(
                    f"parameters '{rp.params[sharded].name}' (FSDP2-sharded) and '{rp.params[plain[0]].name}'"
                    f" (not sharded) of route '{rp.selector}' must be stepped together (they share state,"
                    " or a stage reduces over the route): fully_shard the modules that hold either, or"
                    " none of them"
                )
            owner = min(range(self.world), key=lambda r: (load[r], r))
            load[owner] += sum(math.prod(rp.params[i].shape) for i in unit)
            for i in unit:
                owner_of[id(rp.tensors[i])] = owner
        self.owned: list[_Owned] = []
        #: (real parameter, proxy) of every parameter stepped here
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.local: list[tuple[Any, torch.Tensor]] = []  # (DTensor, proxy of its rows)
        self.first_row: dict[int, int] = {}  # a pointwise route's DTensor -> this rank's first row
        inner_routes = []
        for rp in plan.routes:
            local_route = rp.index in local_routes
            keep: list[int] = []
            proxies: list[torch.Tensor] = []
            tensors: list[Any] = rp.tensors
            for i, t in enumerate(tensors):
                if is_empty(tuple(t.shape)):
                    continue  # nothing to update: no rank steps it (as one process does not)
                if not is_dtensor(t):
                    proxy: torch.Tensor | None = t
                elif local_route:
                    self.first_row[id(t)] = sum(rows[id(t)][: self.rank])
                    rows_here = t.to_local().detach()
                    proxy = torch.empty(0, dtype=t.dtype, device=rows_here.device).set_(rows_here)
                    self.local.append((t, proxy))
                else:
                    owner = owner_of[id(t)]
                    proxy = None
                    if owner == self.rank:
                        proxy = torch.zeros(tuple(t.shape), dtype=t.dtype, device=t.to_local().device)
                        _release(proxy)  # its memory is held during a step only
                    row_bytes = math.prod(t.shape[1:]) * t.dtype.itemsize
                    self.owned.append(_Owned(t, owner, rows[id(t)], row_bytes, proxy))
                if proxy is not None:
                    keep.append(i)
                    proxies.append(proxy)
            new_index = {old: new for new, old in enumerate(keep)}
            leaders = {k: new_index[i] for k, i in rp.leaders.items() if i in new_index}
            inner_routes.append(
                dataclasses.replace(rp, params=[rp.params[i] for i in keep], tensors=proxies, leaders=leaders)
            )
            self.pairs.extend((rp.tensors[i], p) for i, p in zip(keep, proxies, strict=True))
        from soapdsl.runtime.optimizer import SoapOptimizer

        inner_plan = dataclasses.replace(plan, routes=inner_routes)
        self.inner: SoapOptimizer | None = SoapOptimizer(inner_plan) if any(rp.tensors for rp in inner_routes) else None
        if self.inner is not None:  # stochastic rounding draws a row's bits as the whole parameter would
            self.inner._first_elements.update(
                (id(proxy), (self.first_row[id(t)] * math.prod(t.shape[1:]), math.prod(t.shape)))
                for t, proxy in self.local
            )
        # outer param_group -> inner param_group (a route with nothing stepped here has none)
        inner_index = {rp.index: j for j, rp in enumerate(r for r in inner_routes if r.tensors)}
        self.groups = [(i, inner_index[rp.index]) for i, rp in enumerate(opt._routes) if rp.index in inner_index]
        self.owners = [(names.get(id(o.param), "?"), o.owner) for o in self.owned]
        self._mirror: OptimizerState | None = None
        self.mirror()

    # -- step ---------------------------------------------------------------------------------

    def step(self) -> None:
        opt, inner = self.opt, self.inner
        stepping = [o for o in self.owned if o.param.grad is not None]
        if self.owned:  # the exchanges pair up the ranks' lists: they must agree (pointwise routes need nothing)
            self.split.begin_step(hash(tuple(o.param.grad is not None for o in self.owned)), opt.param_groups)
        if inner is not None:
            if opt.state is not self._mirror or opt.state.dirty:
                # the state was changed from outside (reset, replaced): the inner steps with it
                inner.state = OptimizerState((proxy, dict(opt.state[p])) for p, proxy in self.pairs if opt.state.get(p))
            for i, j in self.groups:
                theirs, mine = opt.param_groups[i], inner.param_groups[j]
                for k, v in theirs.items():
                    if k != "params" and mine.get(k, _NONE) is not v:
                        mine[k] = v
                for k in mine.keys() - theirs.keys() - {"params"}:
                    del mine[k]  # a key deleted from the outer group: the inner's check names it
            for p, proxy in self.local:
                local = p.to_local()
                if proxy.data_ptr() != local.data_ptr() or proxy.shape != local.shape:
                    proxy.set_(local)
                proxy.grad = None if p.grad is None else p.grad.to_local()
        self._gather(stepping)
        failure: BaseException | None = None
        if inner is not None:
            try:
                inner._step()
            except Exception as e:  # told to the other ranks by the scatter, then raised here
                failure = e
            finally:
                for o in stepping:
                    if o.proxy is not None:
                        o.proxy.grad = None
                for _, proxy in self.local:
                    proxy.grad = None
        try:
            self._scatter(stepping, failed=failure is not None)
        finally:
            for o in stepping:
                if o.proxy is not None:
                    _release(o.proxy)
        self.mirror()
        if failure is not None:
            raise failure

    def _gather(self, stepping: list[_Owned]) -> None:
        """Every rank's rows of each stepping parameter and its gradient to the parameter's owner."""
        if not stepping:
            return
        device = stepping[0].param.to_local().device
        send_parts: list[list[torch.Tensor]] = [[] for _ in range(self.world)]
        recv_sizes = [0] * self.world
        for o in stepping:
            local, grad = o.param.to_local(), o.param.grad.to_local()
            if grad.dtype != local.dtype:
                raise SoapArgumentError(
                    f"parameter '{self.opt._names.get(id(o.param), '?')}' has a {grad.dtype} gradient"
                    f" for {local.dtype} values; under FSDP2 soapdsl needs them alike"
                )
            send_parts[o.owner] += [_bytes(local), _bytes(grad)]
            if o.owner == self.rank:
                for r in range(self.world):
                    recv_sizes[r] += 2 * o.rows[r] * o.row_bytes
        out = self._exchange(send_parts, recv_sizes, device)
        at = 0
        mine = [o for o in stepping if o.owner == self.rank]
        for o in mine:
            _hold(o.proxy)  # type: ignore[arg-type]
        grads = {id(o): torch.empty_like(o.proxy) for o in mine}  # type: ignore[arg-type]
        for r in range(self.world):
            for o in mine:
                first = sum(o.rows[:r])
                n = o.rows[r] * o.row_bytes
                for dest in (o.proxy, grads[id(o)]):
                    _bytes(dest[first : first + o.rows[r]]).copy_(out[at : at + n])  # type: ignore[index]
                    at += n
        for o in mine:
            o.proxy.grad = grads[id(o)]  # type: ignore[union-attr]

    def _scatter(self, stepping: list[_Owned], failed: bool) -> None:
        """Every rank's rows of the new values, from each parameter's owner.

        Each rank's message to each rank ends with a status byte (1: its step failed), so that
        a rank whose step raised does not leave the others waiting: they raise too, naming it,
        and no rank writes values from a failed step."""
        if not stepping:
            return
        device = stepping[0].param.to_local().device
        status = torch.full((1,), int(failed), dtype=torch.uint8, device=device)
        send_parts: list[list[torch.Tensor]] = [[] for _ in range(self.world)]
        recv_sizes = [1] * self.world
        for o in stepping:
            if o.owner == self.rank:
                first = 0
                for r in range(self.world):
                    send_parts[r].append(_bytes(o.proxy[first : first + o.rows[r]]))  # type: ignore[index]
                    first += o.rows[r]
            recv_sizes[o.owner] += o.rows[self.rank] * o.row_bytes
        out = self._exchange([[*ps, status] for ps in send_parts], recv_sizes, device)
        ends = [sum(recv_sizes[: r + 1]) - 1 for r in range(self.world)]
        codes = out[ends].tolist()
        if failed:
            return  # this rank raises its own error
        if any(codes):
            r = codes.index(1)
            raise SoapError(
                f"FSDP2: rank {r} failed in its share of the step (its own error is raised there);"
                " this rank stops too, instead of waiting for it, and the parameters that owners step keep their values"
            )
        at = [sum(recv_sizes[:r]) for r in range(self.world)]
        for o in stepping:
            n = o.rows[self.rank] * o.row_bytes
            _bytes(o.param.to_local()).copy_(out[at[o.owner] : at[o.owner] + n])
            at[o.owner] += n

    def _exchange(self, parts: list[list[torch.Tensor]], recv_sizes: list[int], device: torch.device) -> torch.Tensor:
        """One ``all_to_all``: ``parts[r]`` (byte tensors) to rank ``r``; ``recv_sizes[r]`` bytes
        from rank ``r``, in rank order."""
        send = [torch.cat(ps) if ps else torch.empty(0, dtype=torch.uint8, device=device) for ps in parts]
        out = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=device)
        sizes = [int(t.numel()) for t in send]
        dist.all_to_all_single(out, torch.cat(send), recv_sizes, sizes, group=self.split.group)
        return out

    # -- state --------------------------------------------------------------------------------

    def mirror(self) -> None:
        """Show this rank's share of the state in the outer optimizer's ``state``."""
        inner = self.inner
        held = [] if inner is None else [(p, inner.state[proxy]) for p, proxy in self.pairs if inner.state.get(proxy)]
        mirror = self._mirror
        if mirror is None or self.opt.state is not mirror:
            mirror = self._mirror = self.opt.state = OptimizerState()
        # refilled in place: a reference to opt.state kept across steps stays current
        dict.clear(mirror)
        for p, st in held:
            dict.__setitem__(mirror, p, mirror._own(dict(st)))
        mirror.dirty = False

    def for_checkpointers(self, sd: dict[str, Any]) -> None:
        """In a state dict of this rank's share: a pointwise route's state tensors, this rank's
        rows, as DTensors sharded as their parameter is. torch.distributed.checkpoint then saves
        each rank's rows, and loads them back (or whole, into an optimizer of whole parameters),
        as it does for torch's optimizers under FSDP2; the owners' state stays whole tensors,
        each held by one rank."""
        from torch.distributed.tensor import DTensor

        pos = _positions(self.opt.param_groups)
        # an entry for every parameter, as torch.distributed.checkpoint's set_optimizer_state_dict
        # wants (strict): one naming the owner for each parameter another rank owns (it loads as
        # nothing into a sharded optimizer, and is refused by name by one of whole parameters),
        # an empty one for a parameter of this rank that has no state yet
        for o in self.owned:
            if o.owner != self.rank:
                sd["state"].setdefault(pos[id(o.param)], {OWNER_KEY: o.owner})
        for k in pos.values():
            sd["state"].setdefault(k, {})
        sd["state"] = dict(sorted(sd["state"].items()))
        for p, proxy in self.local:
            st = sd["state"].get(pos[id(p)])
            if not isinstance(st, dict):
                continue
            for key, v in st.items():
                if torch.is_tensor(v) and not is_dtensor(v) and v.dim() > 0 and v.shape == proxy.shape:
                    st[key] = DTensor.from_local(
                        v, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
                    )

    def _rows_of(self, p: Any, proxy: torch.Tensor, st: dict[str, Any], whole: bool = True) -> dict[str, Any]:
        """A pointwise route's saved state for ``p`` as this rank's rows: a DTensor's local rows
        (a share saved by this rank, or filled by torch.distributed.checkpoint), this rank's
        slice of a whole tensor, or (``whole=False``: a share saved before shares held DTensors)
        the rows themselves."""
        first, n = self.first_row[id(p)], proxy.shape[0]
        name = self.opt._names.get(id(p), "?")
        rows = {}
        for key, v in st.items():
            if is_dtensor(v):
                local = v.to_local()
                if tuple(v.shape) != tuple(p.shape) or local.shape != proxy.shape:
                    raise SoapStateError(
                        f"state '{key}' of parameter '{name}' is sharded as {list(v.shape)} with"
                        f" {list(local.shape)} on this rank, expected {list(p.shape)} with {list(proxy.shape)}"
                    )
                v = local
            elif torch.is_tensor(v) and v.dim() > 0 and not whole:
                if v.shape != proxy.shape:
                    raise SoapStateError(
                        f"state '{key}' of parameter '{name}' has shape {list(v.shape)}, expected this"
                        f" rank's rows, {list(proxy.shape)}"
                    )
            elif torch.is_tensor(v) and v.dim() > 0:
                if tuple(v.shape) != tuple(p.shape):
                    raise SoapStateError(
                        f"state '{key}' of parameter '{name}' has shape {list(v.shape)}, expected {list(p.shape)}"
                    )
                v = v[first : first + n]
            rows[key] = v
        return rows

    def shards(self) -> dict[str, Any]:
        """What a checkpoint of this rank's share is for: the sharding, and which rank owns what."""
        return {"world": self.world, "rank": self.rank, "owners": [[n, o] for n, o in self.owners]}

    def load(self, sd: dict[str, Any], id_map: dict[Any, torch.Tensor]) -> None:
        """Load this rank's share: one saved by the same rank under the same sharding, or its part
        of a whole state dict (saved by one process, or by :meth:`full_state_dict`). ``id_map``:
        each saved state key's parameter (every key has one)."""
        meta = sd.get("soapdsl")
        saved = _plain(meta.get("shards")) if isinstance(meta, dict) else None
        outer_index = _positions(self.opt.param_groups)
        # the state by position, as this optimizer's state_dict keys it
        sd = {**sd, "state": {outer_index[id(id_map[k])]: st for k, st in sd["state"].items()}}
        by_index = dict(enumerate(p for g in self.opt.param_groups for p in g["params"]))
        if saved is None:
            # a whole state dict: every rank checks all of it, as one process would, so that a
            # fault stops every rank here (found by a parameter's owner alone, it would leave the
            # other ranks waiting for the owner at the next step)
            for k, st in sd["state"].items():
                if not placeholder(st):  # (another rank's parameter, in a torch.distributed.checkpoint)
                    self.opt._load_param_state(by_index[k], st, check=True)
            state = self._share_of(sd["state"], outer_index)
        else:
            if saved != self.shards():
                where = f"rank {saved.get('rank')} of {saved.get('world')}"
                if (saved.get("rank"), saved.get("world")) == (self.rank, self.world):
                    where += ", with other owners of the parameters (another model or recipe)"
                raise SoapStateError(
                    f"this state dict was saved by {where} under FSDP2, this is rank {self.rank} of"
                    f" {self.world}: each rank loads the state dict that the same rank saved, under the"
                    " same sharding and ranks, or a whole one (opt.full_state_dict())"
                )
            held = {outer_index[id(p)] for p, _ in self.pairs}
            extra = sorted({k for k, st in sd["state"].items() if not placeholder(st)} - held, key=str)
            if extra:
                raise SoapStateError(
                    f"this rank's state dict holds state for parameter index {extra[0]!r}, which another"
                    " rank steps under FSDP2 (or this optimizer lacks)"
                )
            local = {id(p): proxy for p, proxy in self.local}
            state = {
                k: self._rows_of(by_index[k], local[id(by_index[k])], st, whole=False)
                if id(by_index[k]) in local and isinstance(st, dict)
                else st
                for k, st in sd["state"].items()
            }
        inner = self.inner
        if inner is not None:
            # the checkpoint as the inner optimizer's own: its parameters' positions, its routes
            inner_index = _positions(inner.param_groups)
            mine = {
                inner_index[id(proxy)]: state[outer_index[id(p)]]
                for p, proxy in self.pairs
                if outer_index[id(p)] in state
            }
            groups = [
                {**sd["param_groups"][i], "params": [inner_index[id(q)] for q in inner.param_groups[j]["params"]]}
                for i, j in self.groups
            ]
            plan = self.opt.plan
            inner_meta = {
                "format": FORMAT_VERSION,
                "recipe": plan.recipe.name,
                "fingerprint": plan.fingerprint,
                "routes": [g["route"] for g in inner.param_groups],
            }
            inner.load_state_dict({"state": mine, "param_groups": groups, "soapdsl": inner_meta})
        self.mirror()

    def _share_of(self, whole: dict[Any, Any], outer_index: dict[int, int]) -> dict[Any, Any]:
        """This rank's part of a whole state dict's state: an owned parameter's state if this rank
        owns it, and this rank's rows of a pointwise route's state (shaped like the parameter)."""
        out = {}
        for p, proxy in self.pairs:
            k = outer_index[id(p)]
            st = whole.get(k)
            if id(p) in self.first_row and isinstance(st, dict):
                st = self._rows_of(p, proxy, st)
            elif isinstance(st, dict) and any(is_dtensor(v) for v in st.values()):
                raise SoapStateError(
                    f"the state of parameter '{self.opt._names.get(id(p), '?')}' is sharded (DTensors),"
                    " but one rank steps it whole under FSDP2: it was saved by another recipe or sharding"
                )
            if st is not None:
                out[k] = st
        return out

    def full_state_dict(self) -> dict[str, Any]:
        """The whole state dict, as one process stepping the whole model would save it, on every
        rank (a collective: every rank calls it); its tensors are on the CPU."""
        sd = self.opt.state_dict()
        pos = _positions(self.opt.param_groups)
        state = sd["state"]
        owned = {pos[id(o.param)] for o in self.owned if o.owner == self.rank}
        rows = {pos[id(p)] for p, _ in self.local}
        mine = {k: {key: _cpu(v) for key, v in st.items()} for k, st in state.items() if k in owned or k in rows}
        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, mine, group=self.split.group)
        whole: dict[Any, Any] = {k: {key: _cpu(v) for key, v in st.items()} for k, st in state.items()}
        for r, part in enumerate(everyone):
            for k, st in part.items():
                if k not in rows:
                    whole[k] = st  # its owner's
                elif r == 0:
                    whole[k] = dict(st)
                else:  # a pointwise route's state: the ranks' rows, in rank order
                    whole[k] = {
                        key: torch.cat([whole[k][key], v]) if torch.is_tensor(v) and v.dim() > 0 else whole[k][key]
                        for key, v in st.items()
                    }
        meta = {k: v for k, v in sd["soapdsl"].items() if k != "shards"}
        # the empty entries of other ranks' parameters (for_checkpointers) have their owners'
        # state now; one left empty belongs to a parameter no rank has stepped
        state = {k: st for k, st in sorted(whole.items()) if not placeholder(st)}
        return {"state": state, "param_groups": sd["param_groups"], "soapdsl": meta}


#: the one key of a rank share's entry for a parameter another rank owns: its owner's rank
OWNER_KEY = "soapdsl.fsdp2_owner"


def placeholder(st: Any) -> bool:
    """Whether a saved entry holds no state: empty, or naming another rank as the owner."""
    return isinstance(st, dict) and set(st) <= {OWNER_KEY}


def _positions(groups: list[dict[str, Any]]) -> dict[int, int]:
    """Each parameter's position in ``groups``: how a state dict names it."""
    return {id(p): i for i, p in enumerate(p for g in groups for p in g["params"])}


_NONE = object()


def _plain(saved: Any) -> Any:
    """A saved ``shards`` entry with its pairs as lists (a serializer may have made them tuples)."""
    if not isinstance(saved, dict) or not isinstance(saved.get("owners"), list | tuple):
        return saved
    return {**saved, "owners": [list(x) if isinstance(x, list | tuple) else x for x in saved["owners"]]}


def _hold(t: torch.Tensor) -> None:
    """Give an owner's whole-size stand-in its memory back, for a step (contents undefined)."""
    storage = t.untyped_storage()
    if storage.nbytes() < t.numel() * t.element_size():
        storage.resize_(t.numel() * t.element_size())


def _release(t: torch.Tensor) -> None:
    """Free an owner's whole-size stand-in between steps (its shape stays; its data is gone)."""
    t.untyped_storage().resize_(0)


def _cpu(v: Any) -> Any:
    """A state value on the CPU; of a DTensor, this rank's rows."""
    if is_dtensor(v):
        v = v.to_local()
    return v.detach().cpu() if torch.is_tensor(v) else v


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes, as a flat uint8 view."""
    return t.reshape(-1).view(torch.uint8)


def _units(rp: RoutePlan) -> list[list[int]]:
    """The route's parameters in groups that one rank must step together: each alone, but the
    members of a share group (state shared between them) together, and the whole route when a
    stage reduces over all of its parameters. An empty parameter is in none: it is never stepped."""
    n = len(rp.params)
    ops = list(walk_ops(rp.ops))
    if any(op.reduces_over_route() for op in ops):
        return [[i for i, e in enumerate(rp.params) if not is_empty(e.shape)]]
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, str], int] = {}
    for i, e in enumerate(rp.params):
        for op, seen in walk_shaped(rp.ops, e.shape):
            if not any(spec.shared for spec in op.state(seen).values()):
                continue
            key = (op.path, op.share_key(e.name))
            if key in first:
                parent[find(i)] = find(first[key])
            else:
                first[key] = i
    units: dict[int, list[int]] = {}
    for i in range(n):
        if not is_empty(rp.params[i].shape):
            units.setdefault(find(i), []).append(i)
    return list(units.values())

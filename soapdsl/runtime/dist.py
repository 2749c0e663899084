"""Data-parallel training: the expensive matrix work split across ranks, the results shared.

Under DDP every rank holds the same parameters and, after the gradient all-reduce, the same
gradients, so every rank would repeat the same eigenbasis refreshes, inverse roots and
Newton-Schulz iterations. With ``build(..., distributed=True)`` each of those batched
computations is split instead: every matrix of a batch is computed on one rank (the least
loaded so far in this step, counted in flops, the same choice on every rank), and one
``all_gather`` per batch gives every rank all the results; an op hands over all its batches
at once, and each batch's gather runs in the background while the next batch is computed. The
state stays replicated, so a checkpoint is saved from any one rank as usual, and each matrix is
computed by the same kernels as in one process: the results equal a single process's
(tests/test_distributed.py).

A call that holds one matrix in all computes it on every rank: split, one rank would compute
it while the others waited. Elementwise stages, SOAP's projections into its basis and its factor products
run on every rank: splitting the projections and products too was measured (two gloo ranks on
the 2-core CPU, benchmarks/bench_dist.py) to move 48 MB a step for soap and to save nothing
(soap 0.92x of the unsplit step instead of 0.94x; soap_muon 0.66x instead of 0.64x).
"""

from __future__ import annotations

import hashlib
import math
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from soapdsl.errors import SoapArgumentError, SoapError, SoapStateError

#: what an output of a split computation looks like per matrix: (shape, dtype)
Like = tuple[tuple[int, ...], torch.dtype]
#: one batch of a split computation: (fn, its batched inputs, its outputs' Like, one matrix's flops)
Item = tuple[Callable[..., Sequence[torch.Tensor]], Sequence[torch.Tensor], Sequence[Like], float]


def hyperparameters(groups: Sequence[dict[str, Any]]) -> list[list[tuple[str, Any]]]:
    """The param_groups' values that every rank must share: numbers, booleans, strings and
    tuples of them (a tensor by its shape and dtype, whose value would need a device read;
    other objects not at all, as their text may hold an address)."""
    out = []
    for g in groups:
        values = [(k, _plain_value(g[k])) for k in sorted(g) if k != "params"]
        out.append([(k, v) for k, v in values if v is not _SKIP])
    return out


_SKIP = object()


def _plain_value(v: Any) -> Any:
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape), str(v.dtype))
    if isinstance(v, list | tuple):
        items = [_plain_value(x) for x in v]
        return _SKIP if any(x is _SKIP for x in items) else tuple(items)
    return _SKIP


def _digest(values: Any) -> int:
    """A hash of ``values`` that is the same in every process (Python's hash of a string is not)."""
    return int.from_bytes(hashlib.blake2b(repr(values).encode(), digest_size=8).digest(), "little", signed=True)


def _differences(mine: list[list[tuple[str, Any]]], other: list[list[tuple[str, Any]]]) -> list[tuple[Any, ...]]:
    """(route, key, my value, the other's value) of each hyperparameter that differs."""
    out = []
    for g, h in zip(mine, other, strict=False):
        a, b = dict(g), dict(h)
        route = a.get("route", b.get("route", "?"))
        for k in sorted(a.keys() | b.keys()):
            if a.get(k, _MISSING) != b.get(k, _MISSING):
                out.append((route, k, a.get(k, "(none)"), b.get(k, "(none)")))
    return out


_MISSING = object()


class Splitter:
    """Splits batched matrix computations over the ranks of a process group."""

    def __init__(self, group: Any, mode: str = "distributed=True") -> None:
        """``mode`` names the kind of run in the errors: ``distributed=True`` (DDP) or ``FSDP2``."""
        self.mode = mode
        self.keeps = (
            "DDP keeps them so); for other parallelism build without distributed=True"
            if mode != "FSDP2"
            else "FSDP keeps them so)"
        )
        if group is not True and not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
            raise SoapArgumentError(
                f"distributed must be True, False or a torch.distributed process group, got {group!r}"
            )
        if not dist.is_available() or not dist.is_initialized():
            raise SoapArgumentError(
                "distributed=True needs torch.distributed initialised first"
                " (torch.distributed.init_process_group), as DDP does"
            )
        self.group = None if group is True else group
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self.load = [0.0] * self.world
        #: since the optimizer was built (for tests and reports): matrices split across the
        #: ranks that this rank computed, and in all; and lone ones (a call with a single matrix
        #: in all), which every rank computes (one rank would compute while the others waited)
        self.computed = {"here": 0, "all": 0, "everywhere": 0}
        # where the collectives' buffers live: NCCL takes CUDA tensors only, gloo CPU ones
        nccl = "nccl" in str(dist.get_backend(self.group)).lower()
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def begin_step(self, key: int, groups: Sequence[dict[str, Any]] = ()) -> None:
        """Check that every rank is about to take the same step (``key``: a hash of what it
        steps) with the same hyperparameters (``groups``: the param_groups), then assign this
        step's matrices afresh, in the same order on every rank."""
        values = hyperparameters(groups)
        mine = torch.tensor([key, _digest(values)], dtype=torch.int64, device=self.device)
        keys = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(keys, mine, group=self.group)
        theirs = [k.tolist() for k in keys]
        for r, (k, _) in enumerate(theirs):
            if k != key:
                raise SoapStateError(
                    f"{self.mode}: rank {self.rank} and rank {r} differ in the parameters with a"
                    " gradient at this step, or in their shapes or step counts. The ranks would split"
                    f" different work: every rank must step the same parameters alike ({self.keeps}"
                )
        if any(d != theirs[self.rank][1] for _, d in theirs):
            # every rank sees the difference: all of them gather the values, to name it
            everyone: list[Any] = [None] * self.world
            dist.all_gather_object(everyone, values, group=self.group)
            r, (route, name, here, there) = next(
                (r, diff) for r, other in enumerate(everyone) for diff in _differences(values, other)
            )
            raise SoapStateError(
                f"{self.mode}: route '{route}' has {name}={here!r} on rank {self.rank} and {name}={there!r}"
                f" on rank {r}: every rank must step with the same hyperparameters (a scheduler or"
                " a change to opt.param_groups on some ranks only?)"
            )
        self.load = [0.0] * self.world

    def _assign(self, count: int, cost: float) -> list[int]:
        owners = []
        for _ in range(count):
            r = min(range(self.world), key=lambda i: (self.load[i], i))
            self.load[r] += cost
            owners.append(r)
        return owners

    def map_many(self, items: Sequence[Item]) -> list[list[torch.Tensor]]:
        """Each item's ``fn`` over the leading batch dim of its ``xs``, each matrix on one rank,
        every result on every rank. ``like`` gives each output's per-matrix shape and dtype;
        ``cost`` is one matrix's work (flops), used to balance the ranks.

        Each batch's ``all_gather`` runs in the background while the next batch is computed.
        When the items hold a single matrix in all, every rank computes it (one rank would
        compute while the others waited).

        An exception in ``fn`` on one rank is raised there, and on the other ranks as the same
        type when it is ``torch.linalg.LinAlgError`` (the ops turn that into a located error),
        else as a SoapError naming the rank; once every rank has taken part in every gather, so
        that no rank is left waiting in a collective.
        """
        if sum(xs[0].size(0) for _, xs, _, _ in items) < 2:
            self.computed["everywhere"] += sum(xs[0].size(0) for _, xs, _, _ in items)
            return [list(fn(*xs)) for fn, xs, _, _ in items]
        failure: BaseException | None = None
        pending = []
        for fn, xs, like, cost in items:
            n = xs[0].size(0)
            owners = self._assign(n, cost)
            mine = [i for i, r in enumerate(owners) if r == self.rank]
            counts = [owners.count(r) for r in range(self.world)]
            self.computed["here"] += len(mine)
            self.computed["all"] += n
            item_bytes = [math.prod(shape) * dtype.itemsize for shape, dtype in like]
            # one section per output, each 8-byte aligned so that its bytes view as its dtype
            sections = [-(-max(counts) * size // 8) * 8 for size in item_bytes]
            starts = [sum(sections[:i]) for i in range(len(sections))]
            buf = torch.zeros(sum(sections) + 1, dtype=torch.uint8, device=self.device)
            # the last byte: 0 ok, 1 failed, 2 LinAlgError (and 1 for the batches after a failure)
            if failure is not None:
                buf[-1] = 1
            elif mine:
                try:
                    index = torch.tensor(mine, device=xs[0].device)
                    outs = fn(*(x.index_select(0, index) for x in xs))
                    for o, (_, dtype), at in zip(outs, like, starts, strict=True):
                        part = o.to(device=self.device, dtype=dtype).contiguous().view(-1).view(torch.uint8)
                        buf[at : at + part.numel()] = part
                except Exception as e:  # told to every rank through the gathers, then raised here
                    failure = e
                    buf[-1] = 2 if isinstance(e, torch.linalg.LinAlgError) else 1
            parts = [torch.empty_like(buf) for _ in range(self.world)]
            work = dist.all_gather(parts, buf, group=self.group, async_op=True)
            pending.append((work, parts, owners, counts, starts, item_bytes, like, xs[0].device, n))
        for work, *_ in pending:
            work.wait()
        if failure is not None:
            raise failure
        for _, parts, *_ in pending:
            codes = [int(p[-1]) for p in parts]
            if any(codes):
                r = next(i for i, c in enumerate(codes) if c)
                if codes[r] == 2:
                    raise torch.linalg.LinAlgError(f"a decomposition failed on rank {r}")
                raise SoapError(
                    f"distributed=True: rank {r} failed while computing its share of the matrix work"
                    " (its own error is raised there); this rank stops too, instead of waiting for it"
                )
        out = []
        for _, parts, owners, counts, starts, item_bytes, like, device, n in pending:
            results = [torch.empty((n, *shape), dtype=dtype, device=device) for shape, dtype in like]
            for r in range(self.world):
                if not counts[r]:
                    continue
                index = torch.tensor([i for i, o in enumerate(owners) if o == r], device=device)
                for res, (shape, dtype), size, at in zip(results, like, item_bytes, starts, strict=True):
                    raw = parts[r][at : at + counts[r] * size]
                    res.index_copy_(0, index, raw.view(dtype).view(counts[r], *shape).to(device))
            out.append(results)
        return out

    def agree(self, what: str, description: Any) -> None:
        """Check that every rank describes the same thing (when the optimizer is built: each
        route's parameters, with their names, shapes and dtypes) before splitting work by it; a
        difference would pair up mismatched computations and give wrong numbers."""
        mine = pickle.dumps(description)
        seen: list[Any] = [None] * self.world
        dist.all_gather_object(seen, mine, group=self.group)
        for r, other in enumerate(seen):
            if other != mine:
                raise SoapStateError(
                    f"{self.mode}: rank {self.rank} and rank {r} differ in {what}. Every rank must"
                    f" build the optimizer for the same parameters and step them alike ({self.keeps}"
                )

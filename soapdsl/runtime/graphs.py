"""CUDA graphs for a route's Newton-Schulz iterations (the route option ``cuda_graph``).

On a GPU a small model's Newton-Schulz step is bound by kernel launches, not by the GPU: 10
quintic and 2 cubic steps launch three matmuls and a copy each, per shape. Captured once into
a CUDA graph, the whole iteration is one launch, replayed every step with the same kernels on
the same shapes, so the numbers equal the eager path's bit for bit.

How a call runs (:meth:`GraphCache.run`):

- the first call for a key (an op, a bucket, the input's shape, dtype and layout) runs eagerly:
  it initialises what the kernels need and records how large the input is;
- the second captures: a warm-up run on a side stream, then the capture, on that stream;
- from then on: the input is copied into the graph's input buffer, the graph is replayed, and
  its result is copied out to a fresh tensor.

Memory. The graphs of one route share one memory pool, and keep nothing alive in it between
replays: the input buffer lives in an *arena* outside the pool, shared by every graph of the
route (one graph runs at a time, and each reads its input before the next is written), and the
result is copied out right after the replay. The pool's blocks are the iteration's temporaries,
dead at the end of every replay, so any order of replays is safe and the pool is as large as
the largest iteration's temporaries, not their sum. The cost over the eager path is the arena:
one buffer as large as the route's largest bucket.

Falls back to the eager call, with the same numbers, where a graph cannot be used: off CUDA,
inside a capture already running (a user capturing the whole step), under ``torch.compile``,
and, with a warning naming the key, when a capture fails.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch

# (the caller's key, the input's shape, dtype, device and strides, and what else decides which
# kernels run: the fp32 matmul precision, and autocast's dtype where a step runs under autocast)
_Key = tuple[Hashable, tuple[int, ...], torch.dtype, torch.device, tuple[int, ...], str, torch.dtype | None]


@dataclass
class _Entry:
    graph: torch.cuda.CUDAGraph
    inp: torch.Tensor  # a view of the arena
    out: torch.Tensor  # the result, in the pool: read right after each replay


class GraphCache:
    """The CUDA graphs of one route: one per key, captured on the key's second call."""

    def __init__(self) -> None:
        self._entries: dict[_Key, _Entry] = {}
        self._seen: dict[_Key, int] = {}  # key -> input bytes, recorded at its eager first call
        self._failed: set[_Key] = set()
        self._arenas: dict[torch.device, torch.Tensor] = {}  # uint8, one per device
        self._pools: dict[torch.device, Any] = {}  # torch.cuda.graph_pool_handle()
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self.replays = 0  # counters for tests and benchmarks
        self.captures = 0

    def __len__(self) -> int:
        return len(self._entries)

    def run(
        self,
        key: Hashable,
        fn: Callable[[torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        eager: Callable[[], torch.Tensor],
    ) -> torch.Tensor:
        """``fn(x)``, from a CUDA graph of ``fn`` where one can be used, else ``eager()``.

        ``fn`` must be a pure function of its input's values, with no host synchronisation, that
        launches the same kernels on every call with inputs of one shape: a graph replays the
        kernels it captured. It may overwrite its input, which is always the graph's own copy;
        ``eager()`` computes the same from ``x`` itself, without overwriting what the caller
        still needs."""
        if not usable(x):
            return eager()
        autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        k: _Key = (key, tuple(x.shape), x.dtype, x.device, x.stride(), torch.get_float32_matmul_precision(), autocast)
        entry = self._entries.get(k)
        if entry is None:
            if k in self._failed:
                return eager()
            if k not in self._seen:
                self._seen[k] = x.numel() * x.element_size()
                return eager()
            entry = self._capture(k, fn, x)
            if entry is None:
                return eager()
        entry.inp.copy_(x)
        entry.graph.replay()
        self.replays += 1
        return entry.out.clone()

    def _capture(self, key: _Key, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> _Entry | None:
        # on x's GPU, whichever is current (a route may hold parameters on several)
        with torch.cuda.device(x.device):
            return self._capture_here(key, fn, x)

    def _capture_here(self, key: _Key, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> _Entry | None:
        inp = self._input(x)
        if x.device not in self._streams:
            self._streams[x.device] = torch.cuda.Stream(x.device)
            self._pools[x.device] = torch.cuda.graph_pool_handle()
        stream, here = self._streams[x.device], torch.cuda.current_stream(x.device)
        graph = torch.cuda.CUDAGraph()
        try:
            # the warm-up that torch's CUDA-graph notes ask for, on the capturing stream
            inp.copy_(x)
            stream.wait_stream(here)
            with torch.cuda.stream(stream):
                fn(inp)
            here.wait_stream(stream)
            with torch.cuda.graph(graph, pool=self._pools[x.device], stream=stream):
                out = fn(inp)
        except Exception as e:  # any capture failure means: stay eager for this key
            self._failed.add(key)
            self._abandon(x.device)
            warnings.warn(
                f"soapdsl: a CUDA graph of {key[0]} on {list(x.shape)} {x.dtype} could not be captured"
                f" ({type(e).__name__}: {e}); it runs eagerly, with the same numbers",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        self.captures += 1
        entry = _Entry(graph, inp, out)
        self._entries[key] = entry
        return entry

    def keep_only(self, devices: set[torch.device]) -> None:
        """Drop the graphs, arena and pool of every device not in ``devices`` (the route's
        parameters moved away from it); what was seen there is forgotten too."""
        for d in [d for d in self._arenas.keys() | self._pools.keys() if d not in devices]:
            self._arenas.pop(d, None)
            self._pools.pop(d, None)
            self._streams.pop(d, None)
        for table in (self._entries, self._seen):
            for k in [k for k in table if k[3] not in devices]:
                del table[k]
        self._failed = {k for k in self._failed if k[3] in devices}

    def _abandon(self, device: torch.device) -> None:
        """After a failed capture: torch's capture_end raises before it ends the allocator's
        recording into the pool, and a later capture into that pool, or on that stream, would
        fail or allocate from it. End the recording, and capture from here on with a new pool
        and stream."""
        torch.cuda.synchronize(device)
        end = getattr(torch._C, "_cuda_endAllocateToPool", None)
        if end is not None:
            try:
                end(device.index, self._pools[device])
            except RuntimeError:
                pass  # the recording had ended after all
        del self._pools[device], self._streams[device]

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """A view of ``x``'s device's arena, shaped and strided like ``x``. Growing an arena
        moves it, and so drops every graph captured over the old one on that device (each is
        captured again on its next call)."""
        # x's own layout where it is a dense one (the eager call sees it, and a transposed operand
        # can take other kernels); row-major where x overlaps itself (an expanded tensor) or skips
        stride = x.stride() if _dense(x) else torch.empty(x.shape, device="meta").stride()
        nbytes = x.numel() * x.element_size()
        arena = self._arenas.get(x.device)
        if arena is None or arena.numel() < nbytes:
            # as large as every input seen so far needs, so that it grows once, not once per key
            size = max([nbytes, *(n for k, n in self._seen.items() if k[3] == x.device)])
            arena = self._arenas[x.device] = torch.empty(size, dtype=torch.uint8, device=x.device)
            for k in [k for k in self._entries if k[3] == x.device]:
                del self._entries[k]
        # aligned for any dtype: the arena starts at an allocator block, 512-byte aligned
        return arena[:nbytes].view(x.dtype).as_strided(x.shape, stride)


def _dense(x: torch.Tensor) -> bool:
    """Whether ``x``'s elements fill a block of memory, each once, in some order of its dims."""
    dims = sorted((s, n) for n, s in zip(x.shape, x.stride(), strict=True) if n != 1)
    expected = 1
    for s, n in dims:
        if s != expected:
            return False
        expected *= n
    return True


def usable(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` may use a graph now."""
    return x.is_cuda and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing()

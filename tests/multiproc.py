"""Two gloo ranks on the CPU, for the data-parallel and FSDP2 tests."""

from __future__ import annotations

import contextlib
import datetime
import gc
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from soapdsl.errors import SoapError

WORLD = 2


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One torch thread here, as on every rank (restored after): a single-process reference
    with a thread count of its own could round the matrix products differently."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def spawn(fn, tmp_path: Path, *args, world: int = WORLD) -> list[dict]:
    """Run ``fn(rank, *args)`` on ``world`` gloo ranks (two by default), one thread each; each
    returns a dict, saved per rank."""
    init = f"file://{tmp_path / f'store{world}'}"
    mp.spawn(_entry, args=(fn, init, tmp_path, args, world), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _entry(rank: int, fn, init: str, out: Path, args: tuple, world: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        result = fn(rank, *args)
    except SoapError as e:
        result = {"error": type(e).__name__, "message": str(e)}
    except Exception:  # reported to the test, which fails on it
        result = {"error": "internal", "message": traceback.format_exc()}
    torch.save(result, out / f"rank{rank}.pt")
    del result
    # objects in reference cycles (an optimizer and its helpers) may hold the process groups:
    # freed by the interpreter's finalisation instead, a gloo group can abort the process
    # ("terminate called without an active exception")
    gc.collect()
    dist.destroy_process_group()


# What older torch releases cannot do on CPU ranks, told by the frame and the message of the
# error inside torch (soapdsl supports torch 2.6, whose FSDP2 has both gaps): a test whose rank
# failed with one of them is skipped, any other error still fails it
TORCH_GAPS = [
    ("_fsdp_collectives.py", "object has no attribute 'record_event'", "run FSDP2's forward on CPU ranks"),
    ("in distribute_tensor", "resulted in a negative output size", "shard an empty tensor with distribute_tensor"),
]


def skip_on_torch_gap(ranks: list[dict]) -> None:
    for r in ranks:
        message = r.get("message", "") if r.get("error") == "internal" else ""
        for frame, error, what in TORCH_GAPS:
            if frame in message and error in message:
                pytest.skip(f"torch {torch.__version__} cannot {what}")

"""Runs a 2-process gloo job for the distributed tests (DDP, FSDP2, compressed DDP hooks).

``worker(rank, world_size, port, out_dir)`` sets up its process group with
:func:`init_gloo` and saves what the test checks as ``out_dir/rank{rank}.pt``; :func:`run_two_ranks` spawns
it, fails the test on a hang, and returns both ranks' results."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world: int, port: int) -> None:
    """In a worker: one intra-op thread (two ranks share the 2 cores) and the gloo process
    group on 127.0.0.1:port."""
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def run_two_ranks(worker, out_dir, *, timeout_s: float = 120, what: str = "distributed workers") -> list:
    """Spawns ``worker`` on 2 ranks; [rank0 results, rank1 results]. Skips without gloo."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    ctx = mp.spawn(worker, args=(2, free_port(), str(out_dir)), nprocs=2, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{what} did not finish in {timeout_s:.0f} s (hang?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(2)]

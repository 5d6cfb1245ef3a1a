"""Run a function on N real processes joined in a gloo group (the way a training pool's ranks are), collect results."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out_dir: str, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args, tmp_path: Path) -> list:
    """``fn(rank, world, *args)`` on ``world`` spawned processes; the per-rank return values, by rank.
    ``fn`` must be a module-level function (spawn pickles it by name)."""
    out = tmp_path / f"ranks-{_free_port()}"
    out.mkdir()
    mp.spawn(_rank_main, args=(world, _free_port(), str(out), fn, args), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]

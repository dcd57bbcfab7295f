"""Shared test helpers: running a CLI command as several torch.distributed (gloo) CPU ranks."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import pytest
import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, world_size: int, port: int, argv: list[str]) -> None:
    """One rank: the environment torchrun would set, then `domainmerge ARGV`."""
    from domainmerge.cli import main

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    status = main(argv)
    if status != 0:
        raise SystemExit(status)


@pytest.fixture
def run_ranks() -> Callable[[list[str], int], None]:
    """``run_ranks(argv, n)`` runs ``domainmerge ARGV`` as n gloo processes, like torchrun would."""
    def run(argv: list[str], n: int = 2) -> None:
        torch.multiprocessing.spawn(_rank_main, args=(n, _free_port(), argv), nprocs=n, join=True)
    return run

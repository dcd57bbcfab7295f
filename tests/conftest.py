"""Shared test helpers: running a CLI command as several torch.distributed (gloo) CPU ranks, and
the ``cuda`` marker (tests of the CUDA paths, skipped where no CUDA device is present)."""

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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)

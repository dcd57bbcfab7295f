"""demo.jobs.Pool: inline with one job, worker processes with more, and an early stop that does
not wait for the workers' runs."""

import os
import time

import pytest

from domainmerge.demo.jobs import Pool, default_jobs
from domainmerge.errors import Terminated


def test_one_job_runs_inline_and_hands_errors_back_through_the_future() -> None:
    with Pool(1) as pool:
        assert pool.submit(os.getpid).result() == os.getpid()
        future = pool.submit(int, "not a number")
    assert isinstance(future.exception(), ValueError)
    with pytest.raises(ValueError):
        Pool(0)
    assert 1 <= default_jobs() <= 4


def test_workers_are_other_processes_and_an_error_in_the_parent_stops_their_runs() -> None:
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="stop"):
        with Pool(2) as pool:
            warm = [pool.submit(time.sleep, 1.0) for _ in range(2)]
            [f.result() for f in warm]
            assert pool.submit(os.getpid).result() != os.getpid()
            running = [pool.submit(time.sleep, 120) for _ in range(2)]
            time.sleep(0.5)
            raise RuntimeError("stop")
    # the two 120 s sleeps were stopped, not waited for
    assert time.perf_counter() - start < 60
    for future in running:
        assert future.cancelled() or isinstance(future.exception(), Terminated)

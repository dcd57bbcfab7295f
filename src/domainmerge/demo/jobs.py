"""The demo's independent runs in worker processes: the same numbers as one process, less wall time.

Every training run of the demo is a pure function of its arguments (``training.adapt`` re-seeds
every draw from the run's seed), and so is every score, so runs that do not depend on one another
can go to separate processes. Each worker uses the parent's torch thread count: with one thread
per run (the demo's default) the results are bit-identical whatever ``jobs`` is, which a test
checks.

``Pool(1)`` runs each call in the calling process when it is submitted (no worker processes):
the serial demo is the same code path without the processes.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, TypeVar

import torch

from domainmerge.errors import Terminated

T = TypeVar("T")


def default_jobs() -> int:
    """Worker processes by default: the usable cores, at most 4 (the demo never has more than
    six runs ready at once, and each worker holds its own copy of the world)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


# Worker side of stopping early: SIGTERM from the parent aborts the worker's current job (and any
# job it would start after) with Terminated, which goes back to the parent like any exception; the
# worker itself stays up until the pool's shutdown, so it exits cleanly (a killed worker leaves
# semaphores behind that Python warns about). SIGINT is not used: a process started in the
# background of a non-interactive shell ignores it, and so do the workers it spawns.
_running = False
_stopping = False


def _on_sigterm(signum: int, frame: Any) -> None:
    global _stopping
    _stopping = True
    if _running:
        raise Terminated(signum)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    signal.signal(signal.SIGTERM, _on_sigterm)


def _job(fn: Callable[..., T], *args: Any) -> T:
    global _running
    if _stopping:
        raise Terminated(signal.SIGTERM)
    _running = True
    try:
        return fn(*args)
    finally:
        _running = False


class Pool:
    """``submit(fn, *args) -> Future`` on ``jobs`` worker processes (``jobs == 1``: inline).

    Workers are spawned (not forked: a forked OpenMP runtime can hang) and use the parent's
    torch thread count. Use as a context manager: leaving it normally waits for running calls;
    leaving it on an exception (an error, Ctrl-C, SIGTERM) stops them at once.
    """

    def __init__(self, jobs: int) -> None:
        if jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {jobs}")
        self.jobs = jobs
        self._executor: ProcessPoolExecutor | None = None
        if jobs > 1:
            self._executor = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_init_worker, initargs=(torch.get_num_threads(),))

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` (a module-level function; arguments are pickled) on a worker."""
        if self._executor is not None:
            return self._executor.submit(_job, fn, *args)
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:  # handed to the caller through .result(), as a worker's would be
            future.set_exception(exc)
        return future

    def close(self) -> None:
        """Wait for running calls and stop the workers; calls not yet started are cancelled."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None and self._executor is not None:
            # An error or a signal in the parent: stop the workers' runs instead of waiting for them.
            processes = getattr(self._executor, "_processes", None) or {}   # pid -> Process
            for pid in list(processes):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        self.close()


__all__ = ["Pool", "default_jobs"]

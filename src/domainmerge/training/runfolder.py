"""The output folder of an ``adapt`` run: checked before any work, locked while a run writes to
it, and made a run only by its first checkpoint.

A folder is a run when it holds ``latest.pth`` or an ``iter_N.pth``; a ``log.jsonl`` alone is
not one. A new run (also one that replaces an old run with ``force``) keeps its log lines in
memory until its first checkpoint is written; only then are the old run's files replaced. So a
run stopped before its first checkpoint (a data error, a NaN loss, Ctrl-C) leaves the folder as
it found it, and a typo found late never costs the previous run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any, TextIO

from domainmerge.errors import Option, OutputExistsError, UserError
from domainmerge.fsutil import atomic_path, check_output_dir, write_error, write_text_atomic

LATEST = "latest.pth"
LOG = "log.jsonl"


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds the checkpoints of a run (a log without them is not a run)."""
    return (out / LATEST).exists() or any(out.glob("iter_*.pth"))


def _check_state(out: Path, *, resume: bool, force: bool) -> None:
    if resume:
        if not (out / LATEST).is_file():
            raise UserError(f"{out}: holds no {LATEST} to resume; drop ", Option("resume", switch=True),
                            " to start a new run")
    elif holds_run(out) and not force:
        raise OutputExistsError(out, ": holds a training run; pass ", Option("resume", switch=True),
                                " to continue it or ", Option("force", switch=True), " to start over")


def _iteration(line: str) -> float:
    """The 'iter' of a log line (lines that are not records count as iteration 0: kept)."""
    try:
        value = json.loads(line).get("iter", 0)
    except (ValueError, AttributeError):
        return 0
    return value if isinstance(value, int | float) else 0


class RunFolder:
    """The output folder of one run, on the process that writes (rank 0); other ranks get one
    that writes nothing (``main=False``). Use :meth:`open`, then :meth:`log`, :meth:`save` and
    finally :meth:`close`."""

    def __init__(self, out: Path, *, main: bool, resume: bool) -> None:
        self.out, self.main = out, main
        self.started = resume            # the run's files are in the folder (resumed, or saved once)
        self._pending: list[str] = []    # log lines of a new run before its first checkpoint
        self._log: TextIO | None = None
        self._lock_fd: int | None = None
        self._created: list[Path] = []   # folders made here, removed again if nothing was saved

    @classmethod
    def open(cls, out: str | os.PathLike[str], *, resume: bool, force: bool, main: bool = True) -> RunFolder:
        """Check ``out`` (a folder or nothing yet, writable; a run there needs ``resume`` or
        ``force``), then on the main process create it and lock it against a second run."""
        path = Path(out)
        check_output_dir(path)
        if path.exists():
            _check_state(path, resume=resume, force=force)
        elif resume:
            raise UserError(f"{path}: no such folder to resume; drop ", Option("resume", switch=True),
                            " to start a new run")
        folder = cls(path, main=main, resume=resume)
        if main:
            try:
                folder._lock(resume=resume, force=force)
            except BaseException:
                folder.close()
                raise
        return folder

    def _lock(self, *, resume: bool, force: bool) -> None:
        missing = []
        parent = self.out
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self._created = missing
            self._lock_fd = os.open(self.out, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise write_error(self.out, exc) from None
        try:   # flock on the folder itself: no lock file to leave behind; released when the process ends
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{self.out}: another adapt run is writing to this folder; wait for it to end "
                            "or choose another output folder") from None
        _check_state(self.out, resume=resume, force=force)   # a run may have ended here meanwhile

    def trim_log(self, upto: int) -> None:
        """Drop the log lines of iterations after ``upto`` (a resumed run repeats them)."""
        path = self.out / LOG
        if not (self.main and path.is_file()):
            return
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [ln for ln in lines if _iteration(ln) <= upto]
        if len(kept) != len(lines):
            write_text_atomic(path, "".join(kept))

    def log(self, record: dict[str, Any]) -> None:
        """Append one line to ``log.jsonl`` (kept in memory until the first checkpoint of a new run)."""
        if not self.main:
            return
        line = json.dumps(record) + "\n"
        if not self.started:
            self._pending.append(line)
            return
        try:
            if self._log is None:
                self._log = open(self.out / LOG, "a", encoding="utf-8")
            self._log.write(line)
            self._log.flush()
        except OSError as exc:
            raise write_error(self.out / LOG, exc) from None

    def save(self, n: int, payload: dict[str, Any]) -> Path | None:
        """Write ``latest.pth`` atomically and hard-link it as ``iter_N.pth``; the first save of a
        new run replaces the previous run's files. Returns latest.pth (None off the main process)."""
        if not self.main:
            return None
        from domainmerge.checkpoint import write_pickle

        latest = self.out / LATEST
        with atomic_path(latest) as tmp:
            write_pickle(payload, tmp)
        if not self.started:
            for old in self.out.glob("iter_*.pth"):   # the previous run's (force): ours are not linked yet
                old.unlink(missing_ok=True)
            write_text_atomic(self.out / LOG, "".join(self._pending))
            self._pending, self.started = [], True
        target = self.out / f"iter_{n}.pth"
        tmp_link = self.out / f".iter_{n}.pth.link"
        tmp_link.unlink(missing_ok=True)
        try:
            os.link(latest, tmp_link)
            os.replace(tmp_link, target)
        except OSError:   # a file system without hard links: a second copy
            tmp_link.unlink(missing_ok=True)
            with atomic_path(target) as tmp:
                write_pickle(payload, tmp)
        return latest

    def close(self) -> None:
        """Close the log, release the lock; folders made by :meth:`open` go again if no checkpoint
        was written (a folder without one is not a run)."""
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)   # releases the flock
            self._lock_fd = None
        if not self.started:
            for folder in self._created:   # deepest first; a folder someone wrote into stays
                with contextlib.suppress(OSError):
                    folder.rmdir()
            self._created = []

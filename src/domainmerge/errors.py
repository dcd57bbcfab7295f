"""The one exception type for mistakes a user can cause (bad file, key, value or option),
and what keeps it one line across DataLoader worker processes."""

from __future__ import annotations

import re
import signal
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

# How torch.utils.data re-raises an exception from a worker: the exception type called with
# "Caught X in DataLoader worker process N.\nOriginal Traceback (most recent call last):\n..."
_WORKER_MARK = "in DataLoader worker process"


class UserError(Exception):
    """A problem the user can fix; its message is one line naming the file/key/value and the fix.

    The command line prints it without a traceback and exits with status 2.
    """


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM while :func:`domainmerge.fsutil.handle_termination`
    is active; unwinds like KeyboardInterrupt (temporary files are removed). Exit status 143."""

    def __init__(self, signum: int = 15):
        super().__init__(signum)
        self.signum = signum


def worker_message(exc: BaseException) -> str:
    """The original one-line message of an exception re-raised from a DataLoader worker (the
    last line of the worker's formatted traceback), or the message itself otherwise."""
    text = str(exc)
    if _WORKER_MARK not in text.split("\n", 1)[0]:
        return text
    name = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    at = text.rfind(name)
    if at < 0:  # an exception of the builtins module is printed without its module
        name = f"{type(exc).__qualname__}: "
        at = text.rfind(name)
    return text[at + len(name):].strip() if at >= 0 else text.strip().splitlines()[-1]


def killed_worker_signal(exc: BaseException) -> int | None:
    """The signal number when ``exc`` is torch's "DataLoader worker (pid N) is killed by signal:
    Terminated/Interrupt" (the workers got the SIGTERM/SIGINT sent to the whole process group,
    as batch schedulers and Ctrl-C do), else None."""
    if not isinstance(exc, RuntimeError):
        return None
    found = re.search(r"DataLoader worker \(pid \d+\) is killed by signal: (\w+)", str(exc))
    return {"Terminated": int(signal.SIGTERM), "Interrupt": int(signal.SIGINT)}.get(found.group(1)) if found else None


def unwrap_worker_error(exc: UserError) -> UserError:
    """``exc`` with a DataLoader worker's traceback text replaced by the original one line."""
    message = worker_message(exc)
    return exc if message == str(exc) else type(exc)(message)


def loader_errors(iterable: Iterable[T]) -> Iterator[T]:
    """Iterate a DataLoader (or anything); a UserError raised in a worker process comes out as
    the same one-line UserError that ``num_workers=0`` gives, without the worker's traceback."""
    try:
        yield from iterable
    except UserError as exc:
        raise unwrap_worker_error(exc) from None

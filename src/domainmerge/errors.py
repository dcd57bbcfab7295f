"""The one exception type for mistakes a user can cause (bad file, key, value or option),
and what keeps it one line across DataLoader worker processes."""

from __future__ import annotations

import contextlib
import copy
import os
import re
import signal
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

# How torch.utils.data re-raises an exception from a worker: the exception type called with
# "Caught X in DataLoader worker process N.\nOriginal Traceback (most recent call last):\n..."
_WORKER_MARK = "in DataLoader worker process"


@dataclass(frozen=True)
class Option:
    """A keyword argument that an error message refers to (the one to change, or to give).

    A message reads in Python terms (``allow_missing=True``, ``weights``, ``dtype='int64'``); the
    command line renders the same option as its flag (``--allow-missing``, ``--weights``,
    ``--dtype int64``), see :meth:`UserError.for_command`.

    ``value``: the value shown with it (``repr`` in Python, ``str`` on the command line), None for
    the option alone.
    ``switch``: a boolean option to set to this value (True: ``name=True`` / ``--name``; False:
    ``name=False`` / ``--no-name``).
    """

    name: str
    value: object = None
    switch: bool | None = None

    def python(self) -> str:
        """The option as a Python keyword argument: ``allow_missing=True``, ``dtype='int64'``."""
        if self.switch is not None:
            return f"{self.name}={self.switch}"
        return self.name if self.value is None else f"{self.name}={self.value!r}"

    def flag(self, flags: Mapping[str, str] | None = None) -> str:
        """The option as a command-line flag; ``flags`` maps option names to a command's own flag
        (``{'lam': '--lambda'}``); others become ``--name-with-dashes`` (``--no-name`` for a
        switch set to False)."""
        own = (flags or {}).get(self.name)
        if own is not None:
            flag = own
        elif self.switch is False:
            flag = "--no-" + self.name.replace("_", "-")
        else:
            flag = "--" + self.name.replace("_", "-")
        return flag if self.value is None or self.switch is not None else f"{flag} {self.value}"


@dataclass(frozen=True)
class Tool:
    """A tool an error message points to, named as the Python function in the library and as the
    command on the command line (``Tool("inspect", "domainmerge.merging.inspection.inspect_files")``
    -> ``domainmerge inspect``)."""

    command: str
    function: str

    def python(self) -> str:
        """The function, as a notebook calls it."""
        return self.function

    def flag(self, flags: Mapping[str, str] | None = None) -> str:
        """The command, as the shell runs it (``flags`` unused: the signature of :meth:`Option.flag`)."""
        return f"`domainmerge {self.command}`"


INSPECT = Tool("inspect", "domainmerge.merging.inspection.inspect_files")
CONVERT_LABELS = Tool("convert-labels DATASET ROOT", "domainmerge.data.convert.convert_labels")

Part = str | Option | Tool


class UserError(Exception):
    """A problem the user can fix; its message is one line naming the file/key/value and the fix.

    Give the message as one string, or as pieces of text, :class:`Option` s and :class:`Tool` s:
    ``str(exc)`` names an option as a Python keyword (``allow_missing=True``) and a tool as its
    function, :meth:`for_command` as the command's flag (``--allow-missing``) and command. Library
    code never writes a command-line flag or command into a message itself. The command line
    prints :meth:`for_command` without a traceback and exits with status 2; while it runs a
    command (:func:`command_messages`), ``str(exc)`` renders for the command too, so a message
    embedded in another (or sent from a DataLoader worker as text) names the flags as well.
    """

    def __init__(self, *parts: Part):
        super().__init__(*parts)
        self.parts: tuple[Part, ...] = parts

    def __str__(self) -> str:
        if _COMMAND_FLAGS:
            return self.for_command(_COMMAND_FLAGS[-1])
        return "".join(p if isinstance(p, str) else p.python() for p in self.parts)

    def for_command(self, flags: Mapping[str, str] | None = None) -> str:
        """The message as the command line prints it: every option as a flag (``flags``: the
        command's own flag names, see :meth:`Option.flag`)."""
        # Not called `message`: torch re-raises a worker's exception as cls(message=...) when the
        # class has an attribute of that name.
        return "".join(p if isinstance(p, str) else p.flag(flags) for p in self.parts)

    @property
    def options(self) -> list[Option]:
        """The options the message refers to."""
        return [p for p in self.parts if isinstance(p, Option)]

    def prefixed(self, text: str) -> UserError:
        """The same error (same type and fields) with ``text`` put before its message, e.g. the
        file a model was read from."""
        out = copy.copy(self)
        out.parts = (text, *self.parts)
        return out


# The flags of the command the command line is running (empty: a library call).
_COMMAND_FLAGS: list[Mapping[str, str]] = []


@contextlib.contextmanager
def command_messages(flags: Mapping[str, str]) -> Iterator[None]:
    """Within the block, ``str()`` of a UserError names options as the command's flags (``flags``
    as in :meth:`UserError.for_command`): for the command line only. DataLoader workers forked
    inside the block inherit it, so the messages they send back read the same."""
    _COMMAND_FLAGS.append(flags)
    try:
        yield
    finally:
        _COMMAND_FLAGS.pop()


class MergeError(UserError):
    """Inputs or options that cannot be merged: ``key`` and ``input`` name the tensor and the
    input file (or state dict) at fault when there is one."""

    def __init__(self, *parts: Part, key: str | None = None, input: str | None = None):
        super().__init__(*parts)
        self.key, self.input = key, input


class CheckpointError(UserError):
    """A checkpoint file that cannot be read or written: ``path`` and the ``reason``."""

    def __init__(self, path: str | os.PathLike[str], *reason: Part):
        super().__init__(*((f"{path}: ", *reason) if reason else (str(path),)))
        self.args = (path, *reason)  # how pickle (and torch's DataLoader) rebuild it
        self.path = Path(path)
        self.reason = reason


class DamagedCheckpoint(CheckpointError):
    """A checkpoint file whose bytes are damaged or cut: ``what`` was found, ``fix`` says what to do
    (by default fetch or write the file again; a caller that knows better, e.g. ``adapt
    --resume`` with the run's other checkpoints at hand, re-raises with its own ``fix``)."""

    def __init__(self, path: str | os.PathLike[str], what: str,
                 fix: Part | tuple[Part, ...] = "re-download or re-save it"):
        fixes = fix if isinstance(fix, tuple) else (fix,)
        super().__init__(path, what, "; ", *fixes)
        self.args = (path, what, fix)
        self.what, self.fix = what, fix


class OutputExistsError(UserError):
    """An output file that exists and may not be replaced (``force``/``replace`` not given)."""

    def __init__(self, path: str | os.PathLike[str], *parts: Part):
        super().__init__(*((f"{path}", *parts) if parts else
                           (f"{path}: exists; pass ", Option("force", switch=True), " to overwrite it")))
        self.args = (path, *parts)
        self.path = Path(path)


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
    if message == str(exc):
        return exc
    out = copy.copy(exc)  # keeps the type and its fields (path, key ...)
    out.parts = (message,)
    return out


def loader_errors(iterable: Iterable[T]) -> Iterator[T]:
    """Iterate a DataLoader (or anything); a UserError raised in a worker process comes out as
    the same one-line UserError that ``num_workers=0`` gives, without the worker's traceback."""
    try:
        yield from iterable
    except UserError as exc:
        raise unwrap_worker_error(exc) from None

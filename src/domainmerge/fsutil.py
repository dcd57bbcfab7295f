"""Safe file output: check output paths before any work, write to a temporary file beside the
target, then move it into place.

Guarantees every writer gets from :func:`atomic_path`:

- a crash, an exception, Ctrl-C or SIGTERM (under :func:`handle_termination`, which the CLI
  installs) never leaves a half-written output or a hidden temporary file;
- the output gets the permissions a plain ``open(path, 'w')`` would give (0666 minus the umask),
  or keeps the mode of the file it replaces, never the temporary file's private 0600;
- a new output is created without replacing anything (``renameat2(RENAME_NOREPLACE)``, else a
  hard link): when two processes write the same new file, the second one fails instead of
  silently replacing the first;
- a full disk, a file size limit, a read-only or forbidden folder is a :class:`UserError`
  naming the file, not an ``OSError`` traceback.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from domainmerge.errors import Option, OutputExistsError, Terminated, UserError

# Errors that mean "this output cannot be written here", not a bug: reported as UserError.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                errno.ENOTDIR}
_ADVICE = {errno.ENOSPC: "free some space or write elsewhere",
           errno.EDQUOT: "free some space or write elsewhere",
           errno.EFBIG: "raise the file size limit (ulimit -f) or write elsewhere"}

# Temporary files alive right now, removed by remove_temporaries() (SIGTERM, interpreter exit).
_LIVE: set[str] = set()
_LIVE_LOCK = threading.Lock()


def write_error(path: str | os.PathLike[str], exc: OSError) -> UserError:
    """A one-line UserError for an OSError met while writing ``path``."""
    reason = exc.strerror or type(exc).__name__
    advice = _ADVICE.get(exc.errno or 0, "choose a writable folder")
    return UserError(f"{path}: cannot write ({reason}); {advice}")


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else set and restored."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    with _LIVE_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _probe_folder(folder: Path, what: str) -> None:
    """Create and remove a file in ``folder``: the only check that sees read-only mounts,
    immutable folders and permissions alike (also when running as root)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".domainmerge-probe.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise UserError(f"{what}: cannot create files in {folder} ({exc.strerror}); "
                        "choose a writable folder") from None
    _track(probe)  # removed on SIGTERM like any temporary file
    os.close(fd)
    os.unlink(probe)
    _untrack(probe)


def _existing_folder(path: Path, what: str) -> Path:
    """The folder that will hold ``path``; it must exist and be a folder."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.exists():
        raise UserError(f"{what}: folder {folder} does not exist; create it first")
    if not folder.is_dir():
        raise UserError(f"{what}: {folder} is not a folder; choose another output path")
    return folder


def check_output_path(target: str | os.PathLike[str], *, force: bool = False,
                      inputs: tuple[str | os.PathLike[str], ...] = ()) -> Path:
    """Validate an output file before any work: not one of the inputs, not existing unless
    ``force``, in an existing folder where files can be created."""
    path = Path(target)
    for src in inputs:
        if Path(src).exists() and path.exists() and path.resolve() == Path(src).resolve():
            raise UserError(f"{path}: the output is one of the inputs; choose another output path")
    if path.is_dir():
        raise UserError(f"{path}: is a directory; give a file name for the output")
    folder = _existing_folder(path, str(path))
    if path.exists() and not force:
        raise OutputExistsError(path)
    _probe_folder(folder, str(path))
    return path


def check_output_dir(target: str | os.PathLike[str], *, option: str = "") -> Path:
    """Validate an output folder before any work: a folder or not yet existing, with its nearest
    existing parent a folder where files can be created (it is created when written to)."""
    path = Path(target)
    what = f"{option} {path}".strip()
    if path.exists() and not path.is_dir():
        raise UserError(f"{what}: exists and is not a folder; give a folder")
    existing = path
    while not existing.exists():
        parent = existing.parent
        if parent == existing:
            break
        existing = parent
    if not existing.is_dir():
        raise UserError(f"{what}: {existing} is not a folder; choose another output folder")
    _probe_folder(existing, what)
    return path


# renameat2(2) flag: fail with EEXIST instead of replacing the target.
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_renameat2: Any = None


def _libc_renameat2() -> Any:
    global _renameat2
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            _renameat2 = fn
        except (OSError, AttributeError):
            _renameat2 = False
    return _renameat2


def rename_noreplace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Move ``src`` to ``dst`` atomically, raising FileExistsError if ``dst`` exists.

    Linux ``renameat2(RENAME_NOREPLACE)`` where the C library and file system have it; else a
    hard link (fails on an existing name) and unlink of ``src``; file systems without hard
    links fall back to a check then rename (a small race window remains only there).
    """
    fn = _libc_renameat2()
    if fn:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(dst))
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.rename(src, dst)
        return
    os.unlink(src)


def _track(tmp: str) -> None:
    with _LIVE_LOCK:
        _LIVE.add(tmp)


def _untrack(tmp: str) -> None:
    with _LIVE_LOCK:
        _LIVE.discard(tmp)


def remove_temporaries() -> None:
    """Delete every temporary file of an unfinished atomic write (on termination)."""
    with _LIVE_LOCK:
        live = list(_LIVE)
        _LIVE.clear()
    for tmp in live:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], *, replace: bool | None = None) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; move it onto ``target`` on success.

    ``replace``: whether an existing ``target`` may be replaced (a command's ``--force``); None (library
    default) allows it when ``target`` exists on entry. A new target is created without
    replacing anything, so a file that appeared meanwhile (another process writing the same
    output) is kept and this write fails. On any exception the temporary file is removed and
    ``target`` is left untouched, so a crash never leaves a half-written output. Write errors
    (disk full, size limit, read-only folder) become a UserError naming ``target``.
    """
    path = Path(target)
    folder = _existing_folder(path, str(path))
    existed = os.path.lexists(path)
    if replace is None:
        replace = existed
    elif existed and not replace:
        raise OutputExistsError(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        if exc.errno in WRITE_ERRNOS:
            raise write_error(path, exc) from None
        raise
    _track(tmp)
    os.close(fd)
    try:
        yield Path(tmp)
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode) if replace and existed else 0o666 & ~current_umask()
        except FileNotFoundError:
            mode = 0o666 & ~current_umask()
        os.chmod(tmp, mode)
        if replace:
            os.replace(tmp, path)
        else:
            try:
                rename_noreplace(tmp, path)
            except FileExistsError:
                raise OutputExistsError(path, ": was created by someone else while this one was being written; "
                                        "it is left as it is: pass ", Option("force", switch=True),
                                        " to overwrite it or choose another output path") from None
        _untrack(tmp)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _untrack(tmp)
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            raise write_error(path, exc) from None
        raise


def write_text_atomic(target: str | os.PathLike[str], text: str, *, replace: bool | None = None) -> None:
    """Write ``text`` to ``target`` atomically (UTF-8)."""
    with atomic_path(target, replace=replace) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def handle_termination() -> Iterator[None]:
    """While active, SIGTERM raises :class:`Terminated` in the main thread, so every pending
    atomic write removes its temporary file as on Ctrl-C; the previous handler is restored on
    exit. The CLI wraps each command in it; importing the library installs nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    sigchld = getattr(signal, "SIGCHLD", None)
    previous_chld = signal.getsignal(sigchld) if sigchld is not None else None

    def quiet(signum: int, frame: Any) -> None:
        """Python-level no-op (SIG_DFL would make an already pending signal print a warning)."""

    def raise_terminated(signum: int, frame: Any) -> None:
        # Ignore repeats while cleaning up, and the death of DataLoader workers that got the same
        # signal (torch's SIGCHLD handler would raise over this exception); then unwind:
        # atomic_path removes its temporary file.
        signal.signal(signum, quiet)
        if sigchld is not None:
            signal.signal(sigchld, quiet)
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if sigchld is not None and signal.getsignal(sigchld) is quiet and previous_chld is not None:
            signal.signal(sigchld, previous_chld)
        remove_temporaries()

"""Safe file output: write to a temporary file beside the target, then rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from domainmerge.errors import UserError


def check_output_path(target: str | os.PathLike[str], *, force: bool = False,
                      inputs: tuple[str | os.PathLike[str], ...] = ()) -> Path:
    """Validate an output path: not one of the inputs, not existing unless ``force``."""
    path = Path(target)
    for src in inputs:
        if Path(src).exists() and path.exists() and path.resolve() == Path(src).resolve():
            raise UserError(f"{path}: the output is one of the inputs; choose another output path")
    if path.is_dir():
        raise UserError(f"{path}: is a directory; give a file name for the output")
    if path.exists() and not force:
        raise UserError(f"{path}: exists; pass --force to overwrite it")
    return path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``target`` on success.

    On any exception the temporary file is removed and ``target`` is left untouched, so a
    crash never leaves a half-written output.
    """
    path = Path(target)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"{path}: folder {folder} does not exist; create it first")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(target: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``target`` atomically (UTF-8)."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")

"""PyTorch pickles: finding the state dict inside a loaded container, loading safely (refusals and
damage told apart) and writing (:func:`write_pickle`)."""

from __future__ import annotations

import os
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from domainmerge.checkpoint.core import STATE_DICT_KEYS
from domainmerge.errors import CheckpointError, DamagedCheckpoint, Option


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _find_state_dict(obj: Any, path: Path) -> tuple[str | None, Mapping[str, torch.Tensor]]:
    """Locate the tensors inside a loaded pickle; returns (container key or None, state dict)."""
    if _is_state_dict(obj):
        return None, obj
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            if key in obj and _is_state_dict(obj[key]):
                return key, obj[key]
        # A container whose state dict also holds a few non-tensor entries: keep the tensors.
        for key in STATE_DICT_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                tensors = {k: v for k, v in obj[key].items() if isinstance(v, torch.Tensor)}
                if tensors:
                    return key, tensors
    kind = type(obj).__name__
    entries = f" with entries {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping) else ""
    raise CheckpointError(path, f"holds a {kind}{entries}, not a state dict; expected a dict of tensors or "
                    f"a container with one of {', '.join(STATE_DICT_KEYS)}")


def _unsafe(message: str) -> bool:
    """Whether the safe loader refused a pickle for what it would run (a class or function to
    import), as opposed to bytes it cannot parse at all."""
    return bool(re.search(r"Unsupported (global|class)|GLOBAL |unrecognized function|reduce", message))


def _pickle_damage(path: Path) -> str | None:
    """Why a file cannot be a PyTorch checkpoint at all, from its first bytes (None: it might be)."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head:
        return "the file is empty"
    if head.startswith(b"PK"):
        return None if zipfile.is_zipfile(path) else "a zip archive without its directory: truncated"
    if head[:1] != b"\x80":  # every pickle torch.save writes starts with the PROTO opcode
        return "neither a zip archive nor a pickle"
    return None


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    damage = _pickle_damage(path)
    if damage is not None:
        raise DamagedCheckpoint(path, f"damaged or not a PyTorch checkpoint ({damage})")
    mmap = zipfile.is_zipfile(path)  # only the zip format can be memory-mapped
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if trust_pickle or not _unsafe(str(exc)):
            first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip() and "Weights only" not in ln
                          and "WeightsUnpickler" not in ln), "unreadable pickle")
            raise DamagedCheckpoint(path, f"damaged or not a PyTorch checkpoint ({first})") from exc
        raise CheckpointError(path, "holds Python objects beyond tensors and plain containers, so the safe loader "
                              "refuses it; if you trust this file, pass ", Option("trust_pickle", switch=True)
                              ) from exc
    except (RuntimeError, EOFError, ValueError, OSError, ModuleNotFoundError, AttributeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, EOFError) or "corrupted" in str(exc) or "failed reading" in first:
            raise DamagedCheckpoint(path, f"damaged or truncated PyTorch checkpoint ({first[:120]})") from exc
        raise CheckpointError(path, f"not a readable PyTorch checkpoint ({first})") from exc
    except (IndexError, KeyError, TypeError, struct.error, UnicodeDecodeError, MemoryError) as exc:
        # what the (weights-only) unpickler raises on cut or scrambled legacy pickles
        raise DamagedCheckpoint(path, f"damaged or truncated PyTorch checkpoint ({type(exc).__name__}: "
                                f"{str(exc)[:80]})") from exc


class _Sink:
    """A file for torch.save that writes every byte (looping on partial writes) and keeps the
    exception raised in it (OSError of a full disk, KeyboardInterrupt or Terminated of a signal
    handled during the write), which torch's writer would turn into an opaque RuntimeError."""

    def __init__(self, fd: int):
        self.fd = fd
        self.error: BaseException | None = None

    def write(self, data: Any) -> int:
        try:
            view = memoryview(data).cast("B")
            while view.nbytes:
                view = view[os.write(self.fd, view):]
        except BaseException as exc:
            self.error = exc
            raise
        return len(data) if isinstance(data, (bytes, bytearray)) else memoryview(data).nbytes

    def flush(self) -> None:
        pass


def write_pickle(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)``, but a full disk or size limit raises the OSError (errno kept,
    so :func:`domainmerge.fsutil.atomic_path` reports it as a UserError naming the output)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    sink = _Sink(fd)
    try:
        torch.save(obj, sink)  # type: ignore[arg-type]
    except BaseException:
        if sink.error is not None:
            raise sink.error from None
        raise
    finally:
        os.close(fd)

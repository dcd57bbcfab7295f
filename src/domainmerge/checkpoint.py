"""Checkpoint files: read lazily, unwrap containers, write atomically in the input's format.

Formats read: ``.safetensors`` and PyTorch pickles (``.pth``/``.pt``/``.bin``/``.ckpt``) holding a
bare state dict or a container (``{'state_dict': ...}`` as mmseg/mmcv and Lightning write,
``{'model': ...}``, with ``meta``, ``optimizer`` and other entries). Pickles are loaded with
``weights_only=True`` unless the caller trusts the file.

Low memory: safetensors tensors are read one at a time with plain file reads (no mapping of the
whole file), zip-format pickles are memory-mapped, and a safetensors output can be written
tensor by tensor (:class:`SafetensorsWriter`), so merging K checkpoints never holds K copies.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import pickle
import re
import struct
import sys
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from domainmerge.errors import CheckpointError, Option, UserError
from domainmerge.fsutil import atomic_path

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl")
# Container entries that may hold the state dict, most specific first.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
# Prefixes that wrap the network inside DA training checkpoints and DataParallel.
WRAPPER_PREFIXES = ("model.", "ema_model.", "imnet_model.", "module.")
DROPPED_ENTRIES = ("optimizer", "optimizer_states", "lr_schedulers", "scheduler")
CONTAINERS = ("auto", "mmseg", "plain")

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def _fmt_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in PICKLE_SUFFIXES:
        return "pickle"
    raise CheckpointError(path, f"unknown checkpoint suffix {suffix!r}; use .safetensors or one of "
                    f"{', '.join(PICKLE_SUFFIXES)}")


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


@dataclass
class TensorInfo:
    """Shape and dtype of one stored tensor, known without reading its data."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class Checkpoint:
    """An opened checkpoint: tensor names and shapes, tensors read on demand, container kept.

    ``container_key`` is None for a bare state dict or safetensors; ``extras`` holds the
    container's other entries (``meta`` ...); ``metadata`` the safetensors string metadata.
    """

    path: Path
    format: str
    container_key: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    infos: dict[str, TensorInfo] = field(default_factory=dict)
    mapped: bool = False
    _tensors: Mapping[str, torch.Tensor] | None = None
    _st_offsets: dict[str, tuple[int, int]] = field(default_factory=dict)
    _st_data_start: int = 0
    _mm: mmap.mmap | None = None

    def keys(self) -> list[str]:
        """Tensor names in stored order."""
        return list(self.infos)

    def __contains__(self, key: object) -> bool:
        return key in self.infos

    def __len__(self) -> int:
        return len(self.infos)

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor: a copy-on-write view of the mapped file (safetensors and zip pickles,
        so writing to it never touches the file) or the loaded tensor (legacy pickles)."""
        if key not in self.infos:
            raise CheckpointError(self.path, f"has no tensor {key!r}")
        if self._tensors is not None:
            return self._tensors[key]
        return self._read_st(key)

    def _read_st(self, key: str) -> torch.Tensor:
        info = self.infos[key]
        begin, end = self._st_offsets[key]
        if end == begin:
            return torch.empty(info.shape, dtype=info.dtype)
        if self._mm is None:
            with open(self.path, "rb") as fh:
                # A private (copy-on-write) mapping: no read copy, pages shared with the page cache.
                self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        flat = torch.frombuffer(self._mm, dtype=torch.uint8, count=end - begin, offset=self._st_data_start + begin)
        return flat.view(info.dtype).reshape(info.shape)

    def release(self, key: str) -> None:
        """Tell the kernel a mapped tensor's pages are no longer needed.

        Only clean pages (copies of the file) are dropped, so this loses nothing: a later read
        maps them in again, and a tensor edited in place keeps its edits (its pages are left
        alone). It keeps the resident memory of a merge near one model, not K.
        """
        if self._tensors is not None and self.mapped:
            _drop_pages(self._tensors[key])
        elif self._mm is not None and key in self._st_offsets:
            _drop_pages(self._read_st(key))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All tensors as a dict (reads everything)."""
        return {k: self.get(k) for k in self.infos}

    def close(self) -> None:
        """Release the mapping and loaded tensors (tensors still referenced stay valid).

        The mapping is not closed explicitly: tensors made by ``torch.frombuffer`` hold a reference
        to it but no buffer export, so ``mmap.close()`` would succeed and leave them pointing at
        unmapped memory (a segmentation fault on the next read). Dropping our reference unmaps it
        once the last tensor viewing it is freed."""
        self._mm = None
        self._tensors = None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _written_pages(start: int, end: int) -> bool:
    """Whether any page in [start, end) of a private file mapping was written to (a copy-on-write
    page is anonymous memory; /proc/self/pagemap bit 61 is set only for file pages). True when
    this cannot be told, so that nothing is ever dropped blindly."""
    page = mmap.PAGESIZE
    first, count = start // page, (end - start + page - 1) // page
    try:
        with open("/proc/self/pagemap", "rb") as fh:
            fh.seek(first * 8)
            raw = fh.read(count * 8)
    except OSError:
        return True
    if len(raw) != count * 8:
        return True
    present, file_page = 1 << 63, 1 << 61
    return any(e & present and not e & file_page for e in struct.unpack(f"<{count}Q", raw))


def _drop_pages(tensor: torch.Tensor) -> None:
    """madvise(MADV_DONTNEED) over the pages of a tensor in a private file mapping (Linux),
    unless one of them was written to: dropping a copy-on-write page would silently bring the
    file's bytes back and undo the caller's in-place edit."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
            _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = False
    if not _LIBC or tensor.numel() == 0:
        return
    page = mmap.PAGESIZE
    start = tensor.data_ptr() // page * page
    end = tensor.data_ptr() + tensor.numel() * tensor.element_size()
    if _written_pages(start, end):
        return
    _LIBC.madvise(start, end - start, 4)  # 4 = MADV_DONTNEED; failure only means memory stays


_LIBC: Any = None


# Every dtype name the safetensors format defines, with its item size; the ones in _ST_DTYPES
# are read here, the others are valid files domainmerge does not handle.
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F4": 1,
                "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
                "I64": 8, "U64": 8, "F64": 8, "C64": 8}


def _damaged(path: Path, what: str) -> UserError:
    return CheckpointError(path, f"damaged safetensors file ({what}); re-download or re-export it")


def _st_entry(path: Path, key: str, entry: Any, data_size: int) -> tuple[TensorInfo, tuple[int, int]]:
    """Validate one header entry: dtype, shape and a byte range of exactly shape x itemsize."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise _damaged(path, f"entry {key!r} lacks dtype, shape or data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _ST_ITEMSIZE:
        raise _damaged(path, f"tensor {key!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise _damaged(path, f"tensor {key!r} has shape {shape!r}, not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise _damaged(path, f"tensor {key!r} has data_offsets {offsets!r}, not [begin, end] with begin <= end")
    begin, end = offsets
    numel = 1
    for d in shape:
        numel *= d
    if numel * _ST_ITEMSIZE[dtype] != end - begin:
        raise _damaged(path, f"tensor {key!r}: shape {shape} of {dtype} needs {numel * _ST_ITEMSIZE[dtype]} "
                             f"bytes but its data_offsets span {end - begin}")
    if end > data_size:
        raise CheckpointError(path, f"tensor {key!r} lies beyond the end of the file; the file is truncated "
                        "(re-download or re-export it)")
    if dtype not in _ST_DTYPES:
        raise CheckpointError(path, f"tensor {key!r} has dtype {dtype}, which domainmerge does not handle; "
                        "convert it to float32/float16/bfloat16")
    return TensorInfo(tuple(shape), _ST_DTYPES[dtype]), (begin, end)


def _open_safetensors(path: Path) -> Checkpoint:
    """Open a safetensors file, validating its header fully: a JSON object of entries with a
    known dtype, a shape whose size matches its byte range, ranges that tile the data section
    exactly (no gap, overlap or bytes beyond), and string-to-string ``__metadata__``."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise CheckpointError(path, "too short to be a safetensors file; the file is damaged")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(path, "invalid safetensors header; the file is damaged or not safetensors")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(path, f"invalid safetensors header ({exc}); the file is damaged") from exc
    if not isinstance(header, dict):
        raise _damaged(path, f"the header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise _damaged(path, "__metadata__ is not an object of strings")
    data_size = size - 8 - n
    ck = Checkpoint(path=path, format="safetensors", metadata=dict(metadata))
    ck._st_data_start = 8 + n
    entries = [(key, *_st_entry(path, key, entry, data_size)) for key, entry in header.items()]
    position = 0
    for key, info, (begin, end) in sorted(entries, key=lambda e: (e[2][0], e[2][1])):
        if begin != position:
            what = "overlaps the previous tensor" if begin < position else f"leaves a gap at byte {position}"
            raise _damaged(path, f"tensor {key!r} at bytes {begin}-{end} {what}")
        position = end
        ck.infos[key] = info
        ck._st_offsets[key] = (begin, end)
    if position != data_size:
        raise _damaged(path, f"{data_size - position} bytes after the last tensor")
    if not ck.infos:
        raise CheckpointError(path, "holds no tensors")
    return ck


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
        raise CheckpointError(path, f"damaged or not a PyTorch checkpoint ({damage}); re-download or re-save it")
    mmap = zipfile.is_zipfile(path)  # only the zip format can be memory-mapped
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if trust_pickle or not _unsafe(str(exc)):
            first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip() and "Weights only" not in ln
                          and "WeightsUnpickler" not in ln), "unreadable pickle")
            raise CheckpointError(path, f"damaged or not a PyTorch checkpoint ({first}); re-download or re-save "
                                  "it") from exc
        raise CheckpointError(path, "holds Python objects beyond tensors and plain containers, so the safe loader "
                              "refuses it; if you trust this file, pass ", Option("trust_pickle", switch=True)
                              ) from exc
    except (RuntimeError, EOFError, ValueError, OSError, ModuleNotFoundError, AttributeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, EOFError) or "corrupted" in str(exc) or "failed reading" in first:
            raise CheckpointError(path, f"damaged or truncated PyTorch checkpoint ({first[:120]}); re-download "
                            "or re-save it") from exc
        raise CheckpointError(path, f"not a readable PyTorch checkpoint ({first})") from exc
    except (IndexError, KeyError, TypeError, struct.error, UnicodeDecodeError, MemoryError) as exc:
        # what the (weights-only) unpickler raises on cut or scrambled legacy pickles
        raise CheckpointError(path, f"damaged or truncated PyTorch checkpoint ({type(exc).__name__}: "
                        f"{str(exc)[:80]}); re-download or re-save it") from exc


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


def open_checkpoint(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> Checkpoint:
    """Open a checkpoint for reading, tensors read lazily where the format allows.

    Args:
        path: a ``.safetensors`` file or a PyTorch pickle (``.pth``/``.pt``/``.bin``/``.ckpt``/``.pkl``)
            holding a bare state dict or a container (``{'state_dict': ...}``, ``{'model': ...}``).
        trust_pickle: load a pickle with ``weights_only=False`` (it may run code: only for a
            file you trust); by default pickles holding more than tensors and containers are refused.

    Returns:
        A :class:`Checkpoint` (a context manager): ``keys()``, ``infos`` (shape and dtype),
        ``get(key)``, ``state_dict()``, the container's other entries in ``extras`` and the
        safetensors ``metadata``.

    Example:
        >>> import os, tempfile, torch
        >>> from domainmerge.checkpoint import open_checkpoint
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = os.path.join(folder, "model.pth")
        ...     torch.save({"meta": {"iter": 10}, "state_dict": {"conv.weight": torch.ones(2, 3)}}, path)
        ...     with open_checkpoint(path) as ck:
        ...         print(ck.keys(), ck.infos["conv.weight"].shape, ck.container_key, ck.extras)
        ['conv.weight'] (2, 3) state_dict {'meta': {'iter': 10}}
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(p, "no such file")
    if p.is_dir():
        raise CheckpointError(p, "is a directory; give a checkpoint file")
    fmt = _fmt_of(p)
    if fmt == "safetensors":
        return _open_safetensors(p)
    obj = _torch_load(p, trust_pickle)
    container_key, sd = _find_state_dict(obj, p)
    extras: dict[str, Any] = {}
    if container_key is not None and isinstance(obj, Mapping):
        extras = {k: v for k, v in obj.items() if k != container_key}
    ck = Checkpoint(path=p, format="pickle", container_key=container_key, extras=extras)
    ck._tensors = sd
    ck.mapped = zipfile.is_zipfile(p) and sys.platform.startswith("linux")
    ck.infos = {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in sd.items()}
    return ck


def load_state_dict(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The flat state dict of a checkpoint file, container unwrapped, keys as stored.

    Args:
        path: a ``.safetensors`` file or a PyTorch pickle (see :func:`open_checkpoint`).
        trust_pickle: load a pickle with ``weights_only=False`` (only for a file you trust).

    Returns:
        Tensor name -> tensor (wrapper prefixes such as ``model.`` kept; see
        :func:`strip_model_prefix`).

    Example:
        >>> import os, tempfile, torch
        >>> from domainmerge.checkpoint import load_state_dict
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = os.path.join(folder, "model.pth")
        ...     torch.save({"state_dict": {"model.w": torch.tensor([1., 2.])}, "optimizer": {}}, path)
        ...     load_state_dict(path)
        {'model.w': tensor([1., 2.])}
    """
    with open_checkpoint(path, trust_pickle=trust_pickle) as ck:
        return ck.state_dict()


def detect_prefixes(keys: Iterable[str]) -> list[str]:
    """The wrapper prefixes (``model.``, ``ema_model.`` ...) that some key starts with."""
    keys = list(keys)
    return [p for p in WRAPPER_PREFIXES if any(k.startswith(p) for k in keys)]


def network_prefix(keys: Iterable[str]) -> str:
    """The wrapper prefix of the student network: ``model.`` when some key has it (DA training
    checkpoints also hold ``ema_model.`` and ``imnet_model.``), else ``module.`` (DataParallel),
    else ``""`` (a bare network). The rule behind every ``prefix='auto'``."""
    found = detect_prefixes(keys)
    return "model." if "model." in found else ("module." if "module." in found else "")


def strip_model_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = "auto") -> dict[str, torch.Tensor]:
    """The student network's tensors without their wrapper prefix.

    ``auto`` takes ``model.`` when present (DA training checkpoints also hold ``ema_model.``
    and ``imnet_model.``), else ``module.``, else keeps keys as they are. An explicit prefix
    selects the keys under it; ``""`` keeps everything.

    Args:
        state_dict: tensor name -> tensor, e.g. from :func:`load_state_dict`.
        prefix: ``"auto"``, an explicit wrapper prefix (``"ema_model."``), or ``""``.

    Returns:
        A new dict of the selected tensors, keys without the prefix (the tensors are not copied).

    Raises:
        UserError: no key starts with the explicit ``prefix``.

    Example:
        >>> import torch
        >>> from domainmerge.checkpoint import strip_model_prefix
        >>> sd = {"model.w": torch.zeros(1), "ema_model.w": torch.ones(1)}
        >>> strip_model_prefix(sd)
        {'w': tensor([0.])}
        >>> strip_model_prefix(sd, "ema_model.")
        {'w': tensor([1.])}
    """
    if prefix == "auto":
        prefix = network_prefix(state_dict)
    if not prefix:
        return dict(state_dict)
    out = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not out:
        raise UserError(f"no tensor key starts with {prefix!r}; found prefixes "
                        f"{detect_prefixes(state_dict) or 'none'}; give the right ", Option("prefix"))
    return out


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor, given every tensor's shape and dtype up front.

    The header (names, dtypes, offsets) is written first, then each tensor's bytes in the same
    order, so a merged model is never held whole in memory.
    """

    def __init__(self, fh: BinaryIO, infos: Mapping[str, TensorInfo], metadata: Mapping[str, str]):
        self._fh = fh
        self._order = list(infos)
        self._infos = dict(infos)
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for key in self._order:
            info = infos[key]
            if info.dtype not in _ST_NAMES:
                raise UserError(f"tensor {key!r} has dtype {info.dtype}, which safetensors output "
                                "does not support here; write a .pth file instead")
            nbytes = info.numel * torch.empty((), dtype=info.dtype).element_size()
            header[key] = {"dtype": _ST_NAMES[info.dtype], "shape": list(info.shape),
                           "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as safetensors does
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        self._next = 0

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; keys must come in the order given to the constructor."""
        expected = self._order[self._next]
        if key != expected:
            raise RuntimeError(f"safetensors writer expected {expected!r}, got {key!r}")
        info = self._infos[key]
        if tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
            raise RuntimeError(f"{key}: got {tuple(tensor.shape)} {tensor.dtype}, announced "
                               f"{info.shape} {info.dtype}")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        if flat.numel():
            self._fh.write(flat.view(torch.uint8).numpy().data)
        self._next += 1

    def finish(self) -> None:
        """Check that every announced tensor was written."""
        if self._next != len(self._order):
            raise RuntimeError(f"safetensors writer: {len(self._order) - self._next} tensors missing")


def output_format(path: str | os.PathLike[str]) -> str:
    """'safetensors' or 'pickle', from the output file name."""
    return _fmt_of(Path(path))


def build_container(state_dict: Mapping[str, torch.Tensor], *, template: Checkpoint | None,
                    record: Mapping[str, Any] | None) -> Any:
    """The object to pickle: the template's container (optimizer dropped, record added to meta).

    A template that was a bare state dict stays bare (its users load it with
    ``model.load_state_dict(torch.load(f))``; there is no meta to hold the record). Without a
    template (or from safetensors), a record gives an mmseg container ``{'meta', 'state_dict'}``.
    """
    sd = dict(state_dict)
    if template is not None and template.format == "pickle" and template.container_key is None:
        return sd
    if template is None or template.container_key is None:
        if record is None:
            return sd
        return {"meta": {"domainmerge": dict(record)}, "state_dict": sd}
    out: dict[str, Any] = {k: v for k, v in template.extras.items() if k not in DROPPED_ENTRIES}
    if record is not None:
        meta = out.get("meta")
        meta = dict(meta) if isinstance(meta, Mapping) else ({} if meta is None else {"original": meta})
        meta["domainmerge"] = dict(record)
        out["meta"] = meta
    out[template.container_key] = sd
    return out


def safetensors_metadata(template: Checkpoint | None, record: Mapping[str, Any] | None,
                         meta: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The string metadata of a safetensors output: the template's, ``format: pt``, and the
    domainmerge ``record`` and ``meta`` as JSON."""
    metadata = dict(template.metadata) if template is not None else {}
    metadata.setdefault("format", "pt")
    if record is not None:
        metadata["domainmerge"] = json.dumps(record, default=str)
    if meta is not None:
        metadata["meta"] = json.dumps(meta, default=str)
    return metadata


def _pickle_object(state_dict: Mapping[str, torch.Tensor], template: Checkpoint | None,
                   record: Mapping[str, Any] | None, meta: Mapping[str, Any] | None, container: str) -> Any:
    """What a pickle output holds for ``container`` (see :func:`save_checkpoint`)."""
    if container == "mmseg" or (container == "auto" and meta is not None and template is None):
        obj: dict[str, Any] = {"meta": dict(meta or {}), "state_dict": dict(state_dict)}
        if record is not None:
            obj["meta"]["domainmerge"] = dict(record)
        return obj
    if container == "plain":
        return dict(state_dict)
    return build_container(state_dict, template=template, record=record)


class CheckpointWriter:
    """One checkpoint output written tensor by tensor (see :func:`checkpoint_writer`): a
    safetensors file receives each tensor as it comes, so a streamed merge never holds the
    model; a pickle collects the tensors and is written by :meth:`finish`."""

    def __init__(self, path: Path, fmt: str, infos: Mapping[str, TensorInfo], *, template: Checkpoint | None,
                 record: Mapping[str, Any] | None, meta: Mapping[str, Any] | None, container: str):
        self.path, self.format = path, fmt
        self._pickle_args = (template, record, meta, container)
        self._tensors: dict[str, torch.Tensor] = {}
        self._fh: BinaryIO | None = None
        self._st: SafetensorsWriter | None = None
        if fmt == "safetensors":
            self._fh = open(path, "wb")
            self._st = SafetensorsWriter(self._fh, infos, safetensors_metadata(template, record, meta))

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Add the next tensor (in the order of the ``infos`` given)."""
        if self._st is not None:
            self._st.write(key, tensor)
        else:
            self._tensors[key] = tensor

    def finish(self) -> None:
        """Complete the file: check that every tensor came (safetensors) or write the pickle."""
        if self._st is not None and self._fh is not None:
            self._st.finish()
            self._fh.close()
            self._fh = None
        else:
            write_pickle(_pickle_object(self._tensors, *self._pickle_args), self.path)
            self._tensors.clear()

    def close(self) -> None:
        """Close the file without completing it (on an error)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _check_container(path: str | os.PathLike[str], container: str, meta: Mapping[str, Any] | None,
                     record: Mapping[str, Any] | None) -> str:
    if container not in CONTAINERS:
        raise ValueError(f"container {container!r}: unknown; use one of {', '.join(CONTAINERS)}")
    fmt = output_format(path)
    if fmt == "pickle" and container == "plain" and (meta is not None or record is not None):
        raise ValueError("container='plain' writes a bare state dict, which cannot hold meta or record; "
                         "use container='mmseg' or 'auto'")
    return fmt


@contextlib.contextmanager
def checkpoint_writer(path: str | os.PathLike[str], infos: Mapping[str, TensorInfo], *,
                      template: Checkpoint | None = None, record: Mapping[str, Any] | None = None,
                      meta: Mapping[str, Any] | None = None, container: str = "auto",
                      replace: bool | None = None) -> Iterator[CheckpointWriter]:
    """Write one checkpoint atomically, tensor by tensor: every output of domainmerge goes
    through here (:func:`save_checkpoint`, the streamed merge).

    ``infos``: every tensor's shape and dtype, in the order they will be written; the format
    follows the file name; ``template``, ``record``, ``meta`` and ``container`` as in
    :func:`save_checkpoint`; ``replace`` as in :func:`domainmerge.fsutil.atomic_path`. The file
    appears complete when the block ends without an error, else not at all.
    """
    fmt = _check_container(path, container, meta, record)
    with atomic_path(path, replace=replace) as tmp:
        writer = CheckpointWriter(Path(tmp), fmt, infos, template=template, record=record, meta=meta,
                                  container=container)
        try:
            yield writer
            writer.finish()
        finally:
            writer.close()


def save_checkpoint(path: str | os.PathLike[str], state_dict: Mapping[str, torch.Tensor], *,
                    template: Checkpoint | None = None, record: Mapping[str, Any] | None = None,
                    meta: Mapping[str, Any] | None = None, container: str = "auto",
                    force: bool = False, inputs: tuple[str | os.PathLike[str], ...] = ()) -> Path:
    """Write a state dict atomically; the format follows the file name.

    ``template``: the checkpoint whose container to reuse. ``record``: the merge record, put in
    ``meta['domainmerge']`` or the safetensors metadata. ``container='mmseg'`` with ``meta``
    writes ``{'meta': meta, 'state_dict': ...}`` (what DA training code writes); ``'plain'``
    writes the bare state dict.

    Args:
        path: the output file; ``.safetensors`` or a pickle suffix (``.pth`` ...).
        state_dict: tensor name -> tensor to write.
        template: the checkpoint whose container to reuse (optimizer entries dropped).
        record: the merge record (JSON-ready dict) kept with the weights.
        meta: the ``meta`` entry of an mmseg container (or safetensors metadata, as JSON).
        container: ``'auto'``, ``'mmseg'`` or ``'plain'`` (pickle outputs).
        force: replace an existing file (else an existing output is a UserError).
        inputs: the input files, which the output must not be (they are never overwritten).

    Returns:
        The path written.

    Example:
        >>> import os, tempfile, torch
        >>> from domainmerge.checkpoint import load_state_dict, open_checkpoint, save_checkpoint
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     out = save_checkpoint(os.path.join(folder, "merged.pth"), {"w": torch.ones(2)}, meta={"iter": 1})
        ...     with open_checkpoint(out) as ck:
        ...         print(out.name, ck.container_key, ck.extras)
        ...     st = save_checkpoint(os.path.join(folder, "merged.safetensors"), {"w": torch.ones(2)})
        ...     load_state_dict(st)
        merged.pth state_dict {'meta': {'iter': 1}}
        {'w': tensor([1., 1.])}
    """
    from domainmerge.fsutil import check_output_path

    _check_container(path, container, meta, record)
    out = check_output_path(path, force=force, inputs=inputs)
    infos = {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in state_dict.items()}
    with checkpoint_writer(out, infos, template=template, record=record, meta=meta, container=container,
                           replace=force) as writer:
        for k, v in state_dict.items():
            writer.write(k, v)
    return out


def updated_record(ck: Checkpoint, **entries: Any) -> dict[str, Any]:
    """The checkpoint's domainmerge record (a merge's, say) with ``entries`` added, so writing a
    derived checkpoint keeps the history instead of replacing it."""
    previous: Any = None
    meta = ck.extras.get("meta")
    if isinstance(meta, dict):
        previous = meta.get("domainmerge")
    elif "domainmerge" in ck.metadata:
        try:
            previous = json.loads(ck.metadata["domainmerge"])
        except json.JSONDecodeError:
            previous = None
    return {**(previous if isinstance(previous, dict) else {}), **entries}

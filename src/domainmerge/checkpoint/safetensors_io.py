"""The safetensors format: a fully validated header parser (:func:`_open_safetensors`) and a
streaming writer (:class:`SafetensorsWriter`)."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from domainmerge.checkpoint.core import Checkpoint, TensorInfo
from domainmerge.errors import CheckpointError, DamagedCheckpoint, UserError

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


# Every dtype name the safetensors format defines, with its item size; the ones in _ST_DTYPES
# are read here, the others are valid files domainmerge does not handle.
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F4": 1,
                "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
                "I64": 8, "U64": 8, "F64": 8, "C64": 8}


def _damaged(path: Path, what: str) -> UserError:
    return DamagedCheckpoint(path, f"damaged safetensors file ({what})", fix="re-download or re-export it")


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

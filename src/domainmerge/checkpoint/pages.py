"""Dropping the clean pages of a mapped tensor (Linux ``madvise``), so that a merge's resident memory
stays near one model while it reads K."""

from __future__ import annotations

import ctypes
import mmap
import struct
from typing import Any

import torch


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

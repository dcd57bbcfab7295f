"""An opened checkpoint (:class:`Checkpoint`: names, shapes, tensors read on demand, container kept),
the formats by file suffix and the container vocabulary shared by reading and writing."""

from __future__ import annotations

import mmap
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from domainmerge.checkpoint.pages import _drop_pages
from domainmerge.errors import CheckpointError

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl")
# Container entries that may hold the state dict, most specific first.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
DROPPED_ENTRIES = ("optimizer", "optimizer_states", "lr_schedulers", "scheduler")
CONTAINERS = ("auto", "mmseg", "plain")


def _fmt_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in PICKLE_SUFFIXES:
        return "pickle"
    raise CheckpointError(path, f"unknown checkpoint suffix {suffix!r}; use .safetensors or one of "
                    f"{', '.join(PICKLE_SUFFIXES)}")


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

"""Merge inputs as *sources*: named tensors read one at a time (an opened checkpoint, a state dict,
either seen without its wrapper prefix), so a merge of K large checkpoints holds a handful of
tensors, not K models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

from domainmerge.errors import INSPECT, MergeError


class Source(Protocol):
    """Anything with named tensors readable one at a time (a Checkpoint, a DictSource)."""

    def keys(self) -> list[str]: ...
    def get(self, key: str) -> torch.Tensor: ...


class DictSource:
    """A state dict seen as a source."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], name: str = "<state dict>"):
        self._sd = state_dict
        self.path = name

    def keys(self) -> list[str]:
        return list(self._sd)

    def get(self, key: str) -> torch.Tensor:
        return self._sd[key]


class StrippedSource:
    """A source seen without a wrapper prefix ('model.', 'module.' ...): only its keys under the
    prefix, renamed without it (``'auto'``: 'model.' when present, else 'module.', else none)."""

    def __init__(self, source: Source, prefix: str = "auto"):
        keys = source.keys()
        if prefix == "auto":
            self.names = strip_keys(keys)
        else:
            self.names = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
        name = getattr(source, "path", "<state dict>")
        if not self.names:
            raise MergeError(f"{name}: no tensor key starts with {prefix!r}; check the prefixes with ", INSPECT,
                             input=name)
        self.source, self.path = source, name
        infos = getattr(source, "infos", None)
        if infos is not None:
            self.infos = {k: infos[full] for k, full in self.names.items()}

    def keys(self) -> list[str]:
        return list(self.names)

    def get(self, key: str) -> torch.Tensor:
        return self.source.get(self.names[key])

    def release(self, key: str) -> None:
        release = getattr(self.source, "release", None)
        if release is not None:
            release(self.names[key])


def source_name(src: object, i: int) -> str:
    """A source's file name, else 'input i+1'."""
    return str(getattr(src, "path", f"input {i + 1}"))


def infos_of(src: Source) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key -> (shape, dtype) of every tensor of a source (from its headers when it has them)."""
    infos = getattr(src, "infos", None)
    if infos is not None:
        return {k: (tuple(v.shape), v.dtype) for k, v in infos.items()}
    return {k: (tuple(src.get(k).shape), src.get(k).dtype) for k in src.keys()}


def strip_keys(keys: Sequence[str]) -> dict[str, str]:
    """Key without its wrapper prefix -> key, with the prefix ``strip_model_prefix('auto')`` takes."""
    from domainmerge.checkpoint import network_prefix

    prefix = network_prefix(keys)
    return {k[len(prefix):]: k for k in keys if k.startswith(prefix)}

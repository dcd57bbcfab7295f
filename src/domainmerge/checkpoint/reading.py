"""Opening a checkpoint file of either format (:func:`open_checkpoint`, :func:`load_state_dict`)."""

from __future__ import annotations

import os
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from domainmerge.checkpoint.core import Checkpoint, TensorInfo, _fmt_of
from domainmerge.checkpoint.pickles import _find_state_dict, _torch_load
from domainmerge.checkpoint.safetensors_io import _open_safetensors
from domainmerge.errors import CheckpointError


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

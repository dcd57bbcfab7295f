"""Writing checkpoints atomically in the input's format: the container to keep, the record added,
safetensors streamed tensor by tensor (:func:`checkpoint_writer`, :func:`save_checkpoint`)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from domainmerge.checkpoint.core import CONTAINERS, DROPPED_ENTRIES, Checkpoint, TensorInfo, _fmt_of
from domainmerge.checkpoint.pickles import write_pickle
from domainmerge.checkpoint.safetensors_io import SafetensorsWriter
from domainmerge.fsutil import atomic_path


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

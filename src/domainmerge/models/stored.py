"""A network in a checkpoint file (:class:`StoredNetwork`): the one way to read the network out of
a container, build it, and write a changed network back into the same container.

The container (``checkpoint`` package) may hold more than the network: a DA training
checkpoint holds the student under ``model.``, its EMA teacher and the ImageNet copy
(:data:`domainmerge.checkpoint.DA_TRAINING`), plus ``meta`` and an optimizer. The prefix picks
the network; writing back replaces only its tensors, keeping every other key, the container's
entries (optimizer dropped) and the record (extended).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from domainmerge.checkpoint import (
    Checkpoint,
    network_prefix,
    open_checkpoint,
    save_checkpoint,
    strip_model_prefix,
    updated_record,
)
from domainmerge.errors import UserError
from domainmerge.models.detect import model_from_state_dict, resolve_spec
from domainmerge.models.spec import ModelSpec


class StoredNetwork:
    """An opened checkpoint and the wrapper prefix of the network in it (a context manager).

    Args:
        checkpoint: the opened container (:func:`domainmerge.checkpoint.open_checkpoint`).
        prefix: the network's wrapper prefix; ``'auto'``: ``model.`` when present (the student of a
            DA training checkpoint), else ``module.``, else none
            (:func:`domainmerge.checkpoint.network_prefix`).

    Example:
        >>> import os, tempfile, torch
        >>> from domainmerge.checkpoint import DA_TRAINING, load_state_dict, save_checkpoint
        >>> from domainmerge.models import build_model
        >>> from domainmerge.models.stored import StoredNetwork
        >>> net = build_model("tiny_daformer_r").state_dict()
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = os.path.join(folder, "run.pth")
        ...     _ = save_checkpoint(path, DA_TRAINING.wrap(student=net, teacher=net), meta={"iter": 5})
        ...     with StoredNetwork.open(path) as stored:
        ...         model = stored.build()
        ...         model.decode_head.conv_seg.bias.data += 1
        ...         out = stored.save(os.path.join(folder, "edited.pth"), model.state_dict(),
        ...                           record=stored.updated_record(edited=True))
        ...     edited = load_state_dict(out)
        >>> stored.prefix, type(model).__name__
        ('model.', 'EncoderDecoder')
        >>> bool((edited["model.decode_head.conv_seg.bias"] == net["decode_head.conv_seg.bias"] + 1).all())
        True
        >>> torch.equal(edited["ema_model.decode_head.conv_seg.bias"], net["decode_head.conv_seg.bias"])
        True
    """

    def __init__(self, checkpoint: Checkpoint, prefix: str = "auto", *, name: str | None = None) -> None:
        self.checkpoint = checkpoint
        self.prefix = network_prefix(checkpoint.keys()) if prefix == "auto" else prefix
        self.name = str(checkpoint.path) if name is None else name   # the file as the user named it, for messages

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, prefix: str = "auto", trust_pickle: bool = False
             ) -> StoredNetwork:
        """Open ``path`` (:func:`domainmerge.checkpoint.open_checkpoint`) and pick the network by ``prefix``."""
        return cls(open_checkpoint(path, trust_pickle=trust_pickle), prefix, name=str(path))

    @property
    def path(self) -> Path:
        return self.checkpoint.path

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The network's tensors, keys without the prefix (a UserError when no key has it)."""
        return strip_model_prefix(self.checkpoint.state_dict(), self.prefix)

    def spec(self, arch: str = "auto", state_dict: Mapping[str, torch.Tensor] | None = None,
             **config: Any) -> ModelSpec:
        """The network's :class:`ModelSpec` (of ``state_dict`` when given, as :meth:`build`), detected
        (``arch='auto'``) or named (:func:`domainmerge.models.resolve_spec`); errors start with the
        file's name."""
        try:
            return resolve_spec(self.state_dict() if state_dict is None else state_dict, arch, **config)
        except UserError as exc:
            raise exc.prefixed(f"{self.name}: ") from None

    def build(self, arch: str = "auto", state_dict: Mapping[str, torch.Tensor] | None = None,
              **config: Any) -> nn.Module:
        """The network holding the stored tensors (or ``state_dict``, e.g. the stored ones checked
        first), in eval mode (:func:`domainmerge.models.model_from_state_dict`); errors start with
        the file's name."""
        try:
            return model_from_state_dict(self.state_dict() if state_dict is None else state_dict, arch, **config)
        except UserError as exc:
            raise exc.prefixed(f"{self.name}: ") from None

    def full_state_dict(self, network: Mapping[str, torch.Tensor], *, stored_dtypes: bool = True
                        ) -> dict[str, torch.Tensor]:
        """Every stored tensor, with the network's replaced by ``network`` (keys without the prefix;
        with ``stored_dtypes`` each value is moved to the CPU in its stored dtype, else taken as it
        is). Keys outside the prefix are kept."""
        full = self.checkpoint.state_dict()
        out = dict(full)
        for key, value in network.items():
            out[self.prefix + key] = (value.detach().to("cpu", full[self.prefix + key].dtype) if stored_dtypes
                                      else value)
        return out

    def updated_record(self, **entries: Any) -> dict[str, Any]:
        """The stored domainmerge record with ``entries`` added
        (:func:`domainmerge.checkpoint.updated_record`)."""
        return updated_record(self.checkpoint, **entries)

    def save(self, output: str | os.PathLike[str], network: Mapping[str, torch.Tensor], *,
             record: Mapping[str, Any] | None = None, stored_dtypes: bool = True, force: bool = False,
             inputs: Sequence[str | os.PathLike[str]] = ()) -> Path:
        """Write the checkpoint with the network replaced by ``network`` (:meth:`full_state_dict`) to
        ``output``, atomically, in its container (optimizer dropped) with ``record`` as its
        domainmerge record (:meth:`updated_record` extends the stored one); neither this file nor
        ``inputs`` is ever overwritten. Returns the path written."""
        return save_checkpoint(output, self.full_state_dict(network, stored_dtypes=stored_dtypes),
                               template=self.checkpoint, record=record, force=force,
                               inputs=(self.path, *inputs))

    def close(self) -> None:
        self.checkpoint.close()

    def __enter__(self) -> StoredNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

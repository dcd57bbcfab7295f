"""domainmerge: training-free merging of domain-adapted networks, and their evaluation.

The method of "Training-Free Model Merging for Multi-target Domain Adaptation" (Li et al., ECCV
2024, arXiv 2407.13771): parameters are averaged, BatchNorm statistics are merged as pooled
Gaussians. The functions a researcher uses are importable from here (each is documented, with
an example, in its own module):

- checkpoints: :func:`load_state_dict`, :func:`open_checkpoint`, :func:`save_checkpoint`,
  :func:`strip_model_prefix`
- merging: :func:`merge_state_dicts`, :func:`interpolate`, :func:`merge_state_dicts_per_head`,
  :func:`merge_files` (checkpoint files, as ``domainmerge merge``) and :class:`MergeSpec` (what
  a merge does: the method and its knobs, weights, buffer rule, per-module rules)
- alignment: :func:`align_state_dicts` (Git Re-Basin weight matching)
- networks: :func:`build_model`, :func:`model_from_state_dict`
- data and evaluation: :func:`build_dataset`, :func:`evaluate_model` (one dataset),
  :func:`evaluate_domains` (per-domain mIoU and H), :func:`harmonic_mean`

The names are loaded on first use, so ``import domainmerge`` (and the command line) stays fast.

Example:
    >>> import torch
    >>> import domainmerge
    >>> a = {"w": torch.tensor([0., 2.])}
    >>> b = {"w": torch.tensor([2., 4.])}
    >>> domainmerge.merge_state_dicts([a, b])["w"]
    tensor([1., 3.])
    >>> domainmerge.interpolate(a, b, 0.25)["w"]
    tensor([0.5000, 2.5000])
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "merged.pth")
    >>> _ = domainmerge.save_checkpoint(path, domainmerge.merge_state_dicts([a, b]), meta={"note": "demo"})
    >>> domainmerge.load_state_dict(path)
    {'w': tensor([1., 3.])}
    >>> with domainmerge.open_checkpoint(path) as ck:
    ...     ck.extras["meta"]
    {'note': 'demo'}
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from domainmerge.errors import UserError
from domainmerge.version import __version__

if TYPE_CHECKING:  # the names below, for type checkers and editors (loaded lazily at run time)
    from domainmerge.alignment.matching import align_state_dicts
    from domainmerge.checkpoint import load_state_dict, open_checkpoint, save_checkpoint, strip_model_prefix
    from domainmerge.data.readers import build_dataset
    from domainmerge.evaluation.inference import DomainScores, evaluate_domains, evaluate_model
    from domainmerge.merging import interpolate, merge_state_dicts, merge_state_dicts_per_head
    from domainmerge.merging.files import MergeReport, merge_files
    from domainmerge.merging.spec import MergeSpec
    from domainmerge.models import build_model, model_from_state_dict
    from domainmerge.tensors import harmonic_mean

# Public name -> the module that defines it.
_API = {
    "load_state_dict": "domainmerge.checkpoint",
    "open_checkpoint": "domainmerge.checkpoint",
    "save_checkpoint": "domainmerge.checkpoint",
    "strip_model_prefix": "domainmerge.checkpoint",
    "merge_state_dicts": "domainmerge.merging",
    "merge_state_dicts_per_head": "domainmerge.merging",
    "interpolate": "domainmerge.merging",
    "merge_files": "domainmerge.merging.files",
    "MergeReport": "domainmerge.merging.files",
    "MergeSpec": "domainmerge.merging.spec",
    "align_state_dicts": "domainmerge.alignment.matching",
    "build_model": "domainmerge.models",
    "model_from_state_dict": "domainmerge.models",
    "build_dataset": "domainmerge.data.readers",
    "evaluate_model": "domainmerge.evaluation.inference",
    "evaluate_domains": "domainmerge.evaluation.inference",
    "DomainScores": "domainmerge.evaluation.inference",
    "harmonic_mean": "domainmerge.tensors",
}


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'domainmerge' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = [
    "DomainScores", "MergeReport", "MergeSpec", "UserError", "__version__", "align_state_dicts", "build_dataset",
    "build_model", "evaluate_domains", "evaluate_model", "harmonic_mean", "interpolate",
    "load_state_dict", "merge_files", "merge_state_dicts", "merge_state_dicts_per_head",
    "model_from_state_dict", "open_checkpoint", "save_checkpoint", "strip_model_prefix",
]

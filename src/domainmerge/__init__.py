"""domainmerge: training-free merging of domain-adapted networks, and their evaluation.

The method of "Training-Free Model Merging for Multi-target Domain Adaptation" (Li et al., ECCV
2024, arXiv 2407.13771): parameters are averaged, BatchNorm statistics are merged as pooled
Gaussians. The functions a researcher uses are importable from here (each is documented, with
an example, in its own module):

- checkpoints: :func:`load_state_dict`, :func:`open_checkpoint`, :func:`save_checkpoint`,
  :func:`strip_model_prefix`, :class:`StoredNetwork` (the network in a checkpoint file: read,
  build, write back)
- merging: :func:`merge_state_dicts`, :func:`interpolate`, :func:`merge_state_dicts_per_head`,
  :func:`merge_files` (checkpoint files, as ``domainmerge merge``) and :class:`MergeSpec` (what
  a merge does: the method and its knobs, weights, buffer rule, per-module rules),
  :func:`merge_recipe_files` (a YAML recipe), :func:`inspect_files`
- alignment: :func:`align_state_dicts`, :func:`align_files` (Git Re-Basin weight matching)
- networks: :func:`build_model`, :func:`model_from_state_dict`
- data and evaluation: :func:`build_dataset`, :func:`convert_labels`, :func:`evaluate_model` (one
  dataset), :func:`evaluate_domains` (per-domain mIoU and H), :func:`evaluate_checkpoints`
  (files), :func:`score_folders` (saved predictions), :func:`harmonic_mean`
- training (phase 1): :func:`adapt` with :class:`AdaptConfig` and :func:`get_recipe`
- analysis: :func:`interpolate_checkpoints` (linear mode connectivity), :func:`recalibrate_file`
  (BatchNorm recalibration)
- the paper end to end on a synthetic world: :func:`run_demo`

Every command of the command line is one of these functions (``domainmerge evaluate`` is
:func:`evaluate_checkpoints`, ``lmc`` :func:`interpolate_checkpoints` ...).

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
    from domainmerge.alignment.matching import align_files, align_state_dicts
    from domainmerge.analysis.interpolation import interpolate_checkpoints
    from domainmerge.analysis.recalibrate import recalibrate_file
    from domainmerge.checkpoint import load_state_dict, open_checkpoint, save_checkpoint, strip_model_prefix
    from domainmerge.data.convert import convert_labels
    from domainmerge.data.readers import build_dataset
    from domainmerge.demo.pipeline import run_demo
    from domainmerge.evaluation.checkpoints import evaluate_checkpoints
    from domainmerge.evaluation.folders import score_folders
    from domainmerge.evaluation.inference import DomainScores, evaluate_domains, evaluate_model
    from domainmerge.merging import interpolate, merge_state_dicts, merge_state_dicts_per_head
    from domainmerge.merging.files import MergeReport, merge_files, merge_recipe_files
    from domainmerge.merging.inspection import inspect_files
    from domainmerge.merging.spec import MergeSpec
    from domainmerge.models import StoredNetwork, build_model, model_from_state_dict
    from domainmerge.tensors import harmonic_mean
    from domainmerge.training.adapt import AdaptConfig, adapt
    from domainmerge.training.recipe import get_recipe

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
    "merge_recipe_files": "domainmerge.merging.files",
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
    # Every command's back end (commands/ only parse, call one of these and print).
    "StoredNetwork": "domainmerge.models",
    "adapt": "domainmerge.training.adapt",
    "AdaptConfig": "domainmerge.training.adapt",
    "get_recipe": "domainmerge.training.recipe",
    "evaluate_checkpoints": "domainmerge.evaluation.checkpoints",
    "score_folders": "domainmerge.evaluation.folders",
    "interpolate_checkpoints": "domainmerge.analysis.interpolation",
    "recalibrate_file": "domainmerge.analysis.recalibrate",
    "align_files": "domainmerge.alignment.matching",
    "inspect_files": "domainmerge.merging.inspection",
    "convert_labels": "domainmerge.data.convert",
    "run_demo": "domainmerge.demo.pipeline",
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
    "AdaptConfig", "DomainScores", "MergeReport", "MergeSpec", "StoredNetwork", "UserError", "__version__", "adapt",
    "align_files", "align_state_dicts", "build_dataset", "build_model", "convert_labels", "evaluate_checkpoints",
    "evaluate_domains", "evaluate_model", "get_recipe", "harmonic_mean", "inspect_files", "interpolate",
    "interpolate_checkpoints", "load_state_dict", "merge_files", "merge_recipe_files", "merge_state_dicts",
    "merge_state_dicts_per_head",
    "model_from_state_dict", "open_checkpoint", "recalibrate_file", "run_demo", "save_checkpoint",
    "score_folders", "strip_model_prefix",
]

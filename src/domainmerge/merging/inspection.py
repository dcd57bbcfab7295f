"""What checkpoints hold and whether they can be merged (the library behind ``domainmerge
inspect``): per file its format, prefixes, tensors and parameters per top-level module, dtypes,
BatchNorm layers and non-finite tensors; for several files, whether the merge engine accepts
them and how far apart they are per module."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from domainmerge.checkpoint import Checkpoint, detect_prefixes, open_checkpoint
from domainmerge.errors import UserError
from domainmerge.merging.plan import plan_merge
from domainmerge.merging.roles import COUNT_SUFFIX, Role, assign_roles, layer_of
from domainmerge.tensors import all_finite


def module_group(key: str, wrappers: list[str]) -> str:
    """Top-level module of a key: 'model.backbone.x.y' -> 'model.backbone', 'backbone.x' -> 'backbone'."""
    for w in wrappers:
        if key.startswith(w):
            rest = key[len(w):]
            return w + rest.split(".", 1)[0] if "." in rest else w.rstrip(".")
    return key.split(".", 1)[0] if "." in key else "(top level)"


def summarize(ck: Checkpoint) -> dict[str, Any]:
    """Facts about one opened checkpoint; parameter data is read only to find NaN/inf values."""
    from collections import Counter

    keys = ck.keys()
    prefixes = detect_prefixes(keys)
    roles = assign_roles({k: ck.infos[k].dtype for k in keys})
    modules: dict[str, dict[str, int]] = {}
    for k in keys:
        group = modules.setdefault(module_group(k, prefixes), {"tensors": 0, "parameters": 0})
        group["tensors"] += 1
        if roles[k] == Role.PARAM:
            group["parameters"] += ck.infos[k].numel
    bn = {}
    for k in keys:
        if roles[k] == Role.BN_MEAN:
            layer = layer_of(k)
            count_key = f"{layer}.{COUNT_SUFFIX}"
            bn[layer] = int(ck.get(count_key).item()) if count_key in ck else None
    counts = sorted({c for c in bn.values() if c is not None})
    nonfinite = []
    for k in keys:
        if ck.infos[k].dtype.is_floating_point and not all_finite(ck.get(k)):
            nonfinite.append(k)
        ck.release(k)
    return {
        "file": str(ck.path),
        "format": ck.format if ck.container_key is None else f"{ck.format} container '{ck.container_key}'",
        "extras": sorted(str(k) for k in ck.extras),
        "prefixes": prefixes,
        "tensors": len(keys),
        "parameters": sum(m["parameters"] for m in modules.values()),
        "dtypes": dict(Counter(str(ck.infos[k].dtype).replace("torch.", "") for k in keys)),
        "modules": modules,
        "bn_layers": len(bn),
        "bn_counts": counts if len(counts) <= 6 else [counts[0], "...", counts[-1]],
        "bn_layers_without_count": sum(c is None for c in bn.values()),
        "nonfinite": nonfinite,
    }


def compare(cks: Sequence[Checkpoint]) -> dict[str, Any]:
    """Whether the checkpoints can be merged, and per module how far apart they are from the first
    (when they cannot: the reason, and the engine's error under 'error')."""

    try:
        plan = plan_merge(cks)
        verdict: dict[str, Any] = {"mergeable": True, "reason": "same keys and shapes"}
    except UserError as exc:
        return {"mergeable": False, "reason": str(exc), "distances": {}, "error": exc}
    ref, others = cks[0], cks[1:]
    keys = ref.keys()
    prefixes = detect_prefixes(keys)
    # per other file: module group -> [sum (a-b)^2, sum a^2, sum |mean a - mean b|, BN channels]
    acc: list[dict[str, list[float]]] = [{} for _ in others]
    for k in keys:
        role = plan.roles[k]
        if role not in (Role.PARAM, Role.BN_MEAN):
            for group_of in acc:
                group_of.setdefault(module_group(k, prefixes), [0.0, 0.0, 0.0, 0.0])
            continue
        a = ref.get(k).double()            # read and converted once for all the other files
        a_sq = float((a ** 2).sum()) if role == Role.PARAM else 0.0
        for other, group_of in zip(others, acc):
            group = group_of.setdefault(module_group(k, prefixes), [0.0, 0.0, 0.0, 0.0])
            b = other.get(k).double()
            if role == Role.PARAM:
                group[0] += float(((a - b) ** 2).sum())
                group[1] += a_sq
            else:
                group[2] += float((a - b).abs().sum())
                group[3] += a.numel()
            other.release(k)
        ref.release(k)
    distances = {str(other.path): {
        g: {"rel_l2": (v[0] ** 0.5) / (v[1] ** 0.5) if v[1] > 0 else None,
            "bn_mean_abs_diff": v[2] / v[3] if v[3] else None}
        for g, v in group_of.items()} for other, group_of in zip(others, acc)}
    verdict["distances"] = distances
    return verdict


def check_base(model: Checkpoint, base: Checkpoint) -> None:
    """Refuse a base the merge would refuse for ``model`` (another architecture: a shared tensor
    name with another shape, or no shared parameter), with the merge's one-line reason, rather
    than reporting a huge task vector."""
    from domainmerge.merging.spec import MergeSpec, TaskArithmetic

    plan_merge([model], MergeSpec(method=TaskArithmetic()), base=base)


@dataclass
class Inspection:
    """:func:`inspect_files`' result: one :func:`summarize` dict per file, the :func:`compare`
    dict (several files) and the task-vector diagnostics against a base
    (:func:`domainmerge.alignment.diagnostics.task_vector_report`), each JSON-ready."""

    summaries: list[dict[str, Any]]
    comparison: dict[str, Any] | None = None
    diagnostics: Any = None

    @property
    def merge_error(self) -> UserError | None:
        """Why the files cannot be merged (the engine's error), or None."""
        return self.comparison.get("error") if self.comparison else None

    def to_dict(self) -> dict[str, Any]:
        """JSON: ``checkpoints`` (the summaries), ``comparison`` (without the error object; its
        ``reason`` rendered now, so under the command line it names the flags) and
        ``diagnostics``."""
        comparison = self.comparison
        if comparison is not None and self.merge_error is not None:
            comparison = {k: v for k, v in comparison.items() if k != "error"}
            comparison["reason"] = str(self.merge_error)
        return {"checkpoints": self.summaries, "comparison": comparison, "diagnostics": self.diagnostics}


def inspect_files(paths: Sequence[str | os.PathLike[str]], *, base: str | os.PathLike[str] | None = None,
                  trust_pickle: bool = False) -> Inspection:
    """What the checkpoint files hold, whether they can be merged, and (with ``base``, the shared
    pretrained weights) how their task vectors relate (the library behind ``domainmerge inspect``).

    Args:
        paths: checkpoint files.
        base: the shared starting point of the models, for the task-vector diagnostics.
        trust_pickle: full unpickling (only for files you trust).

    Returns:
        An :class:`Inspection`: one summary per file, the comparison of several files
        (``merge_error``: why they cannot be merged, or None) and the diagnostics against ``base``.

    Example:
        >>> import os, tempfile, torch
        >>> from domainmerge import inspect_files, save_checkpoint
        >>> folder = tempfile.mkdtemp()
        >>> a = save_checkpoint(os.path.join(folder, "a.pth"), {"model.w": torch.ones(2)}, meta={"iter": 1})
        >>> b = save_checkpoint(os.path.join(folder, "b.safetensors"), {"model.w": torch.zeros(2)})
        >>> found = inspect_files([a, b])
        >>> [s["prefixes"] for s in found.summaries], found.merge_error is None
        ([['model.'], ['model.']], True)
    """
    with contextlib.ExitStack() as stack:
        cks = [stack.enter_context(open_checkpoint(p, trust_pickle=trust_pickle)) for p in paths]
        result = Inspection([summarize(ck) for ck in cks], compare(cks) if len(cks) > 1 else None)
        if base is not None:
            from domainmerge.alignment.diagnostics import task_vector_report

            with open_checkpoint(base, trust_pickle=trust_pickle) as b:
                check_base(cks[0], b)
                result.diagnostics = task_vector_report(b.state_dict(), {str(ck.path): ck.state_dict() for ck in cks})
    return result

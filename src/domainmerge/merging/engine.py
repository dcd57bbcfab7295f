"""The in-memory merge API: state dicts in, state dicts out, through the same plan and stream as
the file merges (:mod:`~domainmerge.merging.plan`, :mod:`~domainmerge.merging.stream`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from domainmerge.merging.plan import ALLOW_MISSING_ADVICE, MergePlan, plan_merge
from domainmerge.merging.roles import KeyRule
from domainmerge.merging.sources import DictSource, Source, StrippedSource
from domainmerge.merging.spec import BUFFER_RULES, METHODS, MergeSpec
from domainmerge.merging.stream import iter_merged

# The engine's parts, importable from here as before the split.
__all__ = [
    "ALLOW_MISSING_ADVICE", "BUFFER_RULES", "METHODS", "DictSource", "MergePlan", "MergeSpec", "Source",
    "StrippedSource", "interpolate", "iter_merged", "merge_state_dicts", "merge_state_dicts_per_head", "plan_merge",
]

def merge_state_dicts(state_dicts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None,
                      buffers: str = "gaussian", counts: Sequence[float] | None = None,
                      base: Mapping[str, torch.Tensor] | None = None, *, method: str = "linear",
                      lam: float | None = None, density: float | None = None, drop: float | None = None,
                      seed: int | None = None, rules: Sequence[KeyRule] = (), only: str | None = None,
                      allow_missing: bool = False, check_finite: bool = True, dtype: torch.dtype | None = None,
                      spec: MergeSpec | None = None) -> dict[str, torch.Tensor]:
    """Merge state dicts in memory with the paper's rules (see :class:`~domainmerge.merging.spec.MergeSpec`).

    Parameters are averaged with ``weights`` (uniform by default), or merged as task vectors
    from ``base`` with ``method='task_arithmetic'|'ties'|'dare_linear'|'dare_ties'`` (and
    ``lam``, ``density``, ``drop``, ``seed``); BatchNorm running statistics follow ``buffers``
    in every method: 'gaussian' (pooled Gaussians weighted by num_batches_tracked or
    ``counts``), 'mean' or 'first'.

    Args:
        state_dicts: the models to merge (tensor name -> tensor), all of one architecture.
        weights: one weight per model (normalised to sum 1); None: uniform.
        buffers: the BatchNorm statistics rule: ``'gaussian'``, ``'mean'`` or ``'first'``.
        counts: images behind each model's BatchNorm statistics (``'gaussian'``); None: the
            stored ``num_batches_tracked``.
        base: the weights the models were adapted from (the task-vector methods).
        method: ``'linear'`` (the paper) or one of the task-vector methods of ``METHODS``.
        lam: the task-vector scaling (default 1: the weighted average of the models).
        density: TIES, the share of each task vector kept (default 0.2).
        drop: DARE, the drop probability (default 0.9).
        seed: DARE, the seed of the drop masks (default 0). A knob the method does not read is
            refused.
        rules: per-module overrides (:class:`~domainmerge.merging.roles.KeyRule`), first match wins.
        only: merge only the keys under this prefix; the others are copied from the first model.
        allow_missing: merge the keys all models hold and copy the others, instead of an error.
        check_finite: raise (naming the input) when a merged tensor holds NaN or infinity.
        dtype: the floating dtype of the output; None: the widest of the inputs, per key.
        spec: the whole merge as a :class:`~domainmerge.merging.spec.MergeSpec`, instead of
            the options from ``weights`` to ``allow_missing``.

    Returns:
        The merged state dict, keys in the first model's order.

    Raises:
        MergeError: the models cannot be merged (keys, shapes or options); the message says why.

    Example:
        >>> import torch
        >>> base = {"w": torch.zeros(3)}
        >>> a, b = {"w": torch.tensor([1., 0., 2.])}, {"w": torch.tensor([3., 0., -2.])}
        >>> merge_state_dicts([a, b])["w"]
        tensor([2., 0., 0.])
        >>> merge_state_dicts([a, b], base=base, method="ties", density=1.0)["w"]
        tensor([2., 0., 0.])
        >>> merge_state_dicts([a, b], base=base, method="task_arithmetic", lam=2.0)["w"]
        tensor([4., 0., 0.])
    """
    flat: dict[str, Any] = dict(weights=weights, buffers=buffers, counts=counts, method=method, lam=lam,
                                density=density, drop=drop, seed=seed, rules=tuple(rules), only=only,
                                allow_missing=allow_missing)
    if spec is None:
        spec = MergeSpec.build(**flat)
    elif flat != dict(weights=None, buffers="gaussian", counts=None, method="linear", lam=None, density=None,
                      drop=None, seed=None, rules=(), only=None, allow_missing=False):
        raise TypeError("give either spec or the merge options, not both")
    if spec.per_model:
        raise ValueError("merge_state_dicts returns one model; use merge_state_dicts_per_head")
    sources = [DictSource(sd, f"input {i + 1}") for i, sd in enumerate(state_dicts)]
    plan = plan_merge(sources, spec, base=DictSource(base, "base") if base is not None else None,
                      dtype=dtype, check_finite=check_finite)
    return {k: ts[0] for k, ts in iter_merged(sources, plan)}


def merge_state_dicts_per_head(state_dicts: Sequence[Mapping[str, torch.Tensor]], keep_heads: str,
                               weights: Sequence[float] | None = None, buffers: str = "gaussian",
                               counts: Sequence[float] | None = None) -> list[dict[str, torch.Tensor]]:
    """Backbone-only merging (the paper's dagger variant): one model per input, each with the
    merged tensors outside ``keep_heads`` and its own tensors under it.

    Args:
        state_dicts: the models to merge (tensor name -> tensor), all of one architecture.
        keep_heads: the key prefix of the heads each output keeps from its own model
            (``'decode_head'``).
        weights, buffers, counts: as :func:`merge_state_dicts`.

    Returns:
        One state dict per input, in the order of ``state_dicts``.

    Example:
        >>> import torch
        >>> a = {"backbone.w": torch.tensor([0., 2.]), "head.w": torch.tensor([1.])}
        >>> b = {"backbone.w": torch.tensor([2., 4.]), "head.w": torch.tensor([5.])}
        >>> for model in merge_state_dicts_per_head([a, b], keep_heads="head"):
        ...     print(model["backbone.w"], model["head.w"])
        tensor([1., 3.]) tensor([1.])
        tensor([1., 3.]) tensor([5.])
    """
    sources = [DictSource(sd, f"input {i + 1}") for i, sd in enumerate(state_dicts)]
    plan = plan_merge(sources, MergeSpec(weights=weights, buffers=buffers, counts=counts,
                                         keep_heads=keep_heads))
    outs: list[dict[str, torch.Tensor]] = [{} for _ in state_dicts]
    for key, tensors in iter_merged(sources, plan):
        for out, t in zip(outs, tensors):
            out[key] = t
    return outs


def interpolate(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], lam: float,
                buffers: str = "gaussian") -> dict[str, torch.Tensor]:
    """(1 - lam) * a + lam * b with the merge rules; lam = 0 gives a, lam = 1 gives b.

    Args:
        a: the first model (tensor name -> tensor).
        b: the second model, of the same architecture.
        lam: the share of ``b``, in [0, 1].
        buffers: the BatchNorm statistics rule, as :func:`merge_state_dicts`.

    Returns:
        The interpolated state dict.

    Example:
        >>> import torch
        >>> a, b = {"w": torch.tensor([0., 4.])}, {"w": torch.tensor([4., 8.])}
        >>> interpolate(a, b, 0.25)["w"]
        tensor([1., 5.])
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")
    return merge_state_dicts([a, b], weights=[1.0 - lam, lam], buffers=buffers)

"""Interpolating between checkpoint files and scoring every point (the library behind
``domainmerge lmc``): the merge rules build each model, evaluation scores it on every domain."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from domainmerge.errors import Option, UserError
from domainmerge.evaluation.checkpoints import check_run_settings
from domainmerge.evaluation.inference import evaluate_with

PathLike = str | os.PathLike[str]


@dataclass
class Interpolation:
    """:func:`interpolate_checkpoints`' result: the models' ``names``, one row per point
    (``{'weights', 'scores': {domain: mIoU}, 'H'}``, :func:`domainmerge.analysis.lmc.scan`),
    the ``barriers`` per domain and for H (:func:`domainmerge.analysis.lmc.barriers`) and the
    test protocol used per domain."""

    names: list[str]
    rows: list[dict[str, Any]]
    barriers: dict[str, dict[str, Any]]
    protocols: dict[str, Any]


def checkpoint_names(ckpts: Sequence[PathLike]) -> list[str]:
    """Short names of checkpoint files: their stems, numbered ``1:stem`` when two clash."""
    names = [Path(c).stem for c in ckpts]
    return names if len(set(names)) == len(names) else [f"{i + 1}:{n}" for i, n in enumerate(names)]


def interpolate_checkpoints(ckpts: Sequence[PathLike], domains: Sequence[tuple[str, str, str, str]], *,
                            steps: int = 11, grid: int = 5, buffers: str = "gaussian", align: bool = False,
                            arch: str = "auto", prefix: str = "auto", trust_pickle: bool = False,
                            protocol: str | None = None, mode: str | None = None,
                            crop: tuple[int, int] | None = None, stride: tuple[int, int] | None = None,
                            img_scale: tuple[int, int] | None = None, max_windows: int | None = None,
                            device: str = "cpu", batch_size: int | None = None, num_classes: int = 19,
                            amp: str | None = None, workers: int | None = None, strict: bool = True,
                            progress: bool = False, log: Callable[[str], None] | None = None) -> Interpolation:
    """Evaluate the models between checkpoints on every domain: for two, ``(1 - lambda) A +
    lambda B`` at ``steps`` lambdas from 0 to 1; for three or more, a grid over their simplex with
    ``grid`` points per edge. Interpolation uses the merge rules (``buffers`` for BatchNorm
    statistics), so the mid-point is the model :func:`domainmerge.merging.files.merge_files`
    writes; ``align`` first permutes every model onto the first (weight matching).

    The other arguments are :func:`domainmerge.evaluation.checkpoints.evaluate_checkpoints`'; ``log``
    is told the protocol per domain and the alignment. Under torchrun each rank scores a shard.

    Returns:
        An :class:`Interpolation` (rows, barriers).
    """
    import torch
    from tqdm import tqdm

    from domainmerge.analysis import lmc
    from domainmerge.checkpoint import load_state_dict, strip_model_prefix
    from domainmerge.data import build_dataset
    from domainmerge.evaluation.protocols import family_of, resolve
    from domainmerge.merging import DictSource, MergeSpec, plan_merge
    from domainmerge.models import model_from_state_dict, resolve_spec
    from domainmerge.runtime import distributed
    from domainmerge.tensors import nonfinite_keys, nonfinite_message

    paths = [str(c) for c in ckpts]
    if len(paths) < 2:
        raise UserError("give at least two checkpoints to interpolate between")
    k = len(paths)
    points: list[tuple[float, ...]] = ([(1 - lam, lam) for lam in lmc.lambda_grid(steps)] if k == 2
                                       else lmc.simplex_grid(k, grid))
    check_run_settings(batch_size, workers, max_windows)
    names = checkpoint_names(paths)
    datasets = {name: build_dataset(kind, root, split, strict=strict) for name, kind, root, split in domains}
    state_dicts = [strip_model_prefix(load_state_dict(c, trust_pickle=trust_pickle), prefix) for c in paths]
    for c, sd in zip(paths, state_dicts):
        bad = nonfinite_keys(sd)
        if bad:
            raise UserError(nonfinite_message(c, bad))
    # The interpolation merges in memory; check first, naming the files and what to check.
    plan_merge([DictSource(sd, c) for sd, c in zip(state_dicts, paths)],
               MergeSpec(buffers=buffers), mismatch_advice=(
                   "lmc needs models of one architecture with the same keys; check ", Option("prefix"),
                   " and ", Option("arch")))
    if align:
        from domainmerge.alignment.matching import align_state_dicts

        for i in range(1, k):
            state_dicts[i], report = align_state_dicts(state_dicts[0], state_dicts[i])
            if log is not None:
                log(f"aligned {names[i]} to {names[0]}: {100 * report.overall:.1f}% of units in place")
    try:
        model = model_from_state_dict(state_dicts[0], arch)
        family = family_of(resolve_spec(state_dicts[0], arch))
    except UserError as exc:
        raise exc.prefixed(f"{paths[0]}: ") from None
    protos = {name: resolve(family, kind, protocol, mode=mode, crop=crop, stride=stride, img_scale=img_scale)
              for name, kind, _, _ in domains}
    if log is not None:
        for name, proto in protos.items():
            log(f"{name}: {proto.describe()}")

    def score(merged: dict[str, torch.Tensor]) -> dict[str, float]:
        model.load_state_dict(merged)
        return {name: evaluate_with(model, ds, protos[name], device=device, batch_size=batch_size,
                                    num_classes=num_classes, amp=amp, workers=workers, max_windows=max_windows,
                                    desc=name).miou
                for name, ds in datasets.items()}

    bar = tqdm(points, desc="lmc", unit="point", disable=not progress or not distributed.is_main_process())
    rows = lmc.scan(state_dicts, bar, score, buffers=buffers)
    return Interpolation(names, rows, lmc.barriers(rows), protos)

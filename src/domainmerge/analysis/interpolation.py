"""Interpolating between checkpoint files and scoring every point (the library behind
``domainmerge lmc``): the merge rules build each model, evaluation scores it on every domain."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from domainmerge.analysis.lmc import CurveSummary, ScanRow
from domainmerge.errors import Option, UserError
from domainmerge.evaluation.checkpoints import check_run_settings
from domainmerge.evaluation.inference import evaluate_with
from domainmerge.evaluation.protocols import Protocol

PathLike = str | os.PathLike[str]


@dataclass
class Interpolation:
    """:func:`interpolate_checkpoints`' result: the models' ``names``, one row per point
    (:class:`~domainmerge.analysis.lmc.ScanRow`: weights, mIoU per domain, H), the ``barriers``
    per domain and for H (:class:`~domainmerge.analysis.lmc.CurveSummary`) and the test protocol
    used per domain; what was scanned (``checkpoints``, ``buffers``, ``aligned``, ``domains``).
    :meth:`to_dict` is ``domainmerge lmc``'s lmc.json."""

    names: list[str]
    rows: list[ScanRow]
    barriers: dict[str, CurveSummary]
    protocols: dict[str, Protocol]
    checkpoints: list[str] = field(default_factory=list)
    buffers: str = "gaussian"
    aligned: bool = False
    domains: list[tuple[str, str, str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the inputs and settings, every point and the barriers."""
        return {"checkpoints": list(self.checkpoints), "names": self.names, "buffers": self.buffers,
                "aligned": self.aligned,
                "domains": {d[0]: {"dataset": d[1], "root": d[2], "split": d[3]} for d in self.domains},
                "protocol": {name: proto.to_dict() for name, proto in self.protocols.items()},
                "points": self.rows, "barriers": self.barriers}


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

    Under torchrun each rank scores a shard.

    Args:
        ckpts: two or more checkpoint files of one architecture.
        domains: ``(name, dataset kind, root, split)`` of the labelled splits to score on.
        steps: lambdas from 0 to 1 (two models); grid: points per edge of the simplex (three or more).
        buffers: the BatchNorm statistics rule of the merge (``gaussian``, ``mean``, ``first``).
        align: permute every model onto the first (Git Re-Basin weight matching) first.
        arch, prefix, trust_pickle, protocol, mode, crop, stride, img_scale, max_windows, device,
            batch_size, num_classes, amp, workers, strict: as
            :func:`domainmerge.evaluation.checkpoints.evaluate_checkpoints` takes them.
        progress: a progress bar over the points; log: told the protocol per domain and the alignment.

    Returns:
        An :class:`Interpolation`: one row per point, the barriers, :meth:`Interpolation.to_dict`
        the lmc.json of ``domainmerge lmc``.

    Example:
        >>> import os, tempfile, torch
        >>> from domainmerge import build_model, interpolate_checkpoints, save_checkpoint
        >>> folder = tempfile.mkdtemp()
        >>> paths = []
        >>> for seed in (0, 1):
        ...     _ = torch.manual_seed(seed)
        ...     paths.append(save_checkpoint(os.path.join(folder, f"m{seed}.pth"),
        ...                                  build_model("tiny_daformer_r").state_dict()))
        >>> from domainmerge.data import register_dataset
        >>> from domainmerge.data.synthetic import SyntheticDataset
        >>> register_dataset("small", lambda root, split, strict=True: SyntheticDataset(root, split, 4, size=(32, 64)),
        ...                  overwrite=True)   # a dataset kind for the example: 4 synthetic scenes of 32x64
        >>> found = interpolate_checkpoints(paths, [("city", "small", "city", "val")], steps=3)
        >>> [row["weights"] for row in found.rows]
        [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
        >>> sorted(found.barriers["city"])[:3]
        ['argmax', 'argmin', 'barrier']
    """
    import torch
    from tqdm import tqdm

    from domainmerge.analysis import lmc
    from domainmerge.data import build_dataset
    from domainmerge.evaluation.protocols import family_of, resolve
    from domainmerge.merging import DictSource, MergeSpec, plan_merge
    from domainmerge.models import StoredNetwork
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
    stored = [StoredNetwork.open(c, prefix=prefix, trust_pickle=trust_pickle) for c in paths]
    state_dicts: list[dict[str, torch.Tensor]] = []
    for s in stored:
        with s:   # the state dicts read stay valid after closing
            state_dicts.append(s.state_dict())
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
    model = stored[0].build(arch, state_dicts[0])
    family = family_of(stored[0].spec(arch, state_dicts[0]))
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
    return Interpolation(names, rows, lmc.barriers(rows), protos, paths, buffers, align,
                         [(n, k, str(r), sp) for n, k, r, sp in domains])

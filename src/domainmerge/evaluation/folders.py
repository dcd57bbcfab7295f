"""Scoring folders of predicted label maps against ground truth (the library behind
``domainmerge score``): predictions written by any framework, paired with the ground truth by
:func:`domainmerge.data.pair_files`, read by :func:`domainmerge.data.read_label_map`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from domainmerge.data import pair_files, read_label_map
from domainmerge.errors import Option, UserError
from domainmerge.evaluation.metrics import SegMetric, SegScores

PathLike = str | os.PathLike[str]


@dataclass
class FolderScores:
    """The scores of one prediction folder against its ground-truth folder."""

    pred: Path
    gt: Path
    images: int
    scores: SegScores

    def to_dict(self) -> dict[str, Any]:
        """JSON: the folders, the image count and :meth:`SegScores.to_dict`."""
        return {"pred": str(self.pred), "gt": str(self.gt), "images": self.images, **self.scores.to_dict()}


def check_label_settings(num_classes: int, ignore_index: int) -> None:
    """A class count of at least 1 and an ignore label at or above it (below 65536)."""
    if num_classes < 1:
        raise UserError(Option("num_classes", num_classes), ": must be at least 1")
    if not num_classes <= ignore_index < 65536:
        raise UserError(Option("ignore_index", ignore_index), ": must be >= ", Option("num_classes"),
                        " and < 65536")


def score_folder(pred_dir: PathLike, gt_dir: PathLike, *, pred_suffix: str = ".png",
                 gt_suffix: str = "_labelTrainIds.png", num_classes: int = 19, ignore_index: int = 255,
                 workers: int = 4, progress: bool = False, desc: str = "score") -> FolderScores:
    """Score every ground-truth label map in ``gt_dir`` against its prediction in ``pred_dir``.

    Args:
        pred_dir, gt_dir: the folders (searched recursively).
        pred_suffix, gt_suffix: the file endings; files pair by their path without it (or, for a
            flat prediction folder, by name).
        num_classes, ignore_index: the label set (train ids 0..C-1; ignored pixels).
        workers: threads decoding PNGs. progress, desc: a progress bar and its label.

    Returns:
        :class:`FolderScores` (``.scores`` is a :class:`SegScores`).

    Example:
        >>> import tempfile, numpy as np
        >>> from PIL import Image
        >>> root = Path(tempfile.mkdtemp())
        >>> for sub, ids in (("pred", [[0, 1], [1, 1]]), ("gt", [[0, 1], [0, 255]])):
        ...     (root / sub).mkdir()
        ...     Image.fromarray(np.array(ids, np.uint8)).save(root / sub / "a.png")
        >>> result = score_folder(root / "pred", root / "gt", gt_suffix=".png", num_classes=2)
        >>> result.images, [round(float(x), 1) for x in result.scores.iou]
        (1, [50.0, 50.0])
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    check_label_settings(num_classes, ignore_index)
    pairs = pair_files(pred_dir, gt_dir, pred_suffix, gt_suffix)
    metric = SegMetric(num_classes, ignore_index)

    def load(pair: tuple[Path, Path]) -> tuple[Any, Any]:
        return read_label_map(pair[0]), read_label_map(pair[1])

    # PNG decoding releases the GIL, so threads overlap it; updates stay in this thread, in order.
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for (pred_path, gt_path), (pred, gt) in tqdm(zip(pairs, pool.map(load, pairs)), total=len(pairs),
                                                     desc=desc, unit="img", disable=None if progress else True):
            if pred.shape != gt.shape:
                raise UserError(f"{pred_path}: size {pred.shape[::-1]} differs from ground truth "
                                f"{gt_path} {gt.shape[::-1]}; predictions must be at label resolution")
            try:
                metric.update(torch.from_numpy(pred), torch.from_numpy(gt))
            except UserError as exc:
                raise exc.prefixed(f"{gt_path} / {pred_path}: ") from None
    return FolderScores(Path(pred_dir), Path(gt_dir), len(pairs), metric.compute())


def scores_json(results: Mapping[str, FolderScores], num_classes: int) -> dict[str, Any]:
    """:func:`score_folders`' result as JSON (what ``domainmerge score --json`` writes): the class
    count, per domain :meth:`FolderScores.to_dict`, and with several domains the summary of
    their mIoUs (:func:`domainmerge.reporting.summarize`: mean and harmonic mean H)."""
    from domainmerge.reporting import summarize

    result: dict[str, Any] = {"num_classes": num_classes, "domains": {n: r.to_dict() for n, r in results.items()}}
    if len(results) > 1:
        result["summary"] = summarize({n: r.scores.miou for n, r in results.items()})
    return result


def score_folders(domains: Sequence[tuple[str, PathLike, PathLike]], *, pred_suffix: str = ".png",
                  gt_suffix: str = "_labelTrainIds.png", num_classes: int = 19, ignore_index: int = 255,
                  workers: int = 4, progress: bool = False) -> dict[str, FolderScores]:
    """:func:`score_folder` for every ``(name, pred_dir, gt_dir)`` (the library behind
    ``domainmerge score``); names must differ.

    Args:
        domains: ``(name, folder of predicted train-id PNGs, folder of ground-truth label maps)``.
        pred_suffix, gt_suffix: the file name endings that pair a prediction with its label.
        num_classes, ignore_index: the classes scored and the label value that is not.
        workers: reading threads; progress: progress bars.

    Returns:
        ``{name: FolderScores}`` (images paired, :class:`SegScores`). The harmonic mean over
        domains: ``harmonic_mean([s.scores.miou for s in result.values()])``.

    Example:
        >>> import tempfile, numpy as np
        >>> from PIL import Image
        >>> from domainmerge import harmonic_mean, score_folders
        >>> root = Path(tempfile.mkdtemp())
        >>> for domain, pred in (("city", [[0, 1]]), ("night", [[1, 1]])):
        ...     for sub, ids in (("pred", pred), ("gt", [[0, 1]])):
        ...         (root / domain / sub).mkdir(parents=True)
        ...         Image.fromarray(np.array(ids, np.uint8)).save(root / domain / sub / "a.png")
        >>> result = score_folders([(d, root / d / "pred", root / d / "gt") for d in ("city", "night")],
        ...                        gt_suffix=".png", num_classes=2)
        >>> {d: s.scores.miou for d, s in result.items()}, harmonic_mean([s.scores.miou for s in result.values()])
        ({'city': 100.0, 'night': 25.0}, 40.0)
    """
    names = [d[0] for d in domains]
    if len(set(names)) != len(names):
        raise UserError(f"domain names must differ, got {names}")
    check_label_settings(num_classes, ignore_index)
    return {name: score_folder(pred, gt, pred_suffix=pred_suffix, gt_suffix=gt_suffix, num_classes=num_classes,
                               ignore_index=ignore_index, workers=workers, progress=progress, desc=name)
            for name, pred, gt in domains}

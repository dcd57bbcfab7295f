"""Semantic segmentation scores as the field computes them, and means over domains.

The metric accumulates one C x C int64 confusion matrix over a whole split (rows = ground
truth, columns = prediction), so mIoU is computed from dataset-level counts, not averaged over
images. Per-class IoU is NaN for a class absent from both ground truth and prediction, and
mIoU is the mean over the other classes (mmseg's nanmean; torchmetrics' macro average with
ignore_index gives the same classes zero weight).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from domainmerge.data.classes import CLASSES
from domainmerge.errors import CONVERT_LABELS, Option, UserError
from domainmerge.runtime import distributed
from domainmerge.tensors import arithmetic_mean as arithmetic_mean  # re-exported: the means H is built from
from domainmerge.tensors import harmonic_mean as harmonic_mean


@dataclass(frozen=True, eq=False)
class ImageStats:
    """Per-image sufficient statistics of the split-level metric, in dataset order.

    Row i holds image i's per-class counts (int64 arrays [N, C]): ``intersection`` (true
    positives), ``union`` (TP + FP + FN) and ``target`` (ground-truth pixels). Each is additive
    over images, so any multiset of images (a bootstrap resample: a count per image) has the
    split-level mIoU ``counts @ intersection / counts @ union`` without re-running the network.
    """

    intersection: np.ndarray
    union: np.ndarray
    target: np.ndarray

    @classmethod
    def from_confusions(cls, confusions: torch.Tensor | np.ndarray) -> ImageStats:
        """From per-image confusion matrices [N, C, C] (rows = ground truth)."""
        conf = (confusions.detach().cpu().numpy() if isinstance(confusions, torch.Tensor)
                else np.asarray(confusions)).astype(np.int64)
        if conf.ndim != 3 or conf.shape[1] != conf.shape[2]:
            raise ValueError(f"per-image confusion matrices must be [N, C, C], got shape {conf.shape}")
        tp = np.diagonal(conf, axis1=1, axis2=2).copy()
        gt = conf.sum(axis=2)
        return cls(intersection=tp, union=gt + conf.sum(axis=1) - tp, target=gt)

    @classmethod
    def from_rows(cls, rows: torch.Tensor | np.ndarray) -> ImageStats:
        """From the stacked form [N, 3, C] (intersection, union, target), see :meth:`rows`."""
        arr = rows.detach().cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
        return cls(intersection=arr[:, 0].astype(np.int64), union=arr[:, 1].astype(np.int64),
                   target=arr[:, 2].astype(np.int64))

    def rows(self) -> np.ndarray:
        """The stacked form [N, 3, C] int64 (what ranks sum to gather images in dataset order)."""
        return np.stack([self.intersection, self.union, self.target], axis=1)

    def __len__(self) -> int:
        return int(self.intersection.shape[0])

    @property
    def num_classes(self) -> int:
        """C."""
        return int(self.intersection.shape[1])

    def miou(self) -> float:
        """mIoU (percent) of all images together: equals ``scores_from_confusion`` of their summed
        confusion matrices."""
        inter, union = self.intersection.sum(0).astype(np.float64), self.union.sum(0).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, inter / union, np.nan) * 100.0
        return _nanmean(iou)


@dataclass(frozen=True)
class SegScores:
    """Scores of one model on one split, in percent (0-100); NaN where undefined."""

    iou: tuple[float, ...]
    acc: tuple[float, ...]
    miou: float
    macc: float
    aacc: float
    class_names: tuple[str, ...] = field(default=CLASSES)
    pixels: int = 0                 # labelled (not ignored) pixels scored
    # Per-image counts, when the evaluation was asked to keep them (for bootstrap intervals).
    per_image: ImageStats | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: NaN becomes None, per-class values are keyed by class name."""
        return {
            "miou": _json_float(self.miou),
            "macc": _json_float(self.macc),
            "aacc": _json_float(self.aacc),
            "pixels": self.pixels,
            "iou": {n: _json_float(v) for n, v in zip(self.class_names, self.iou)},
            "acc": {n: _json_float(v) for n, v in zip(self.class_names, self.acc)},
        }


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def default_class_names(num_classes: int) -> tuple[str, ...]:
    """The Cityscapes names for 19 classes, else 'class0', 'class1', ..."""
    return CLASSES if num_classes == len(CLASSES) else tuple(f"class{i}" for i in range(num_classes))


def _nanmean(values: np.ndarray) -> float:
    """Mean of the non-NaN entries; NaN (without a warning) when there are none."""
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def scores_from_confusion(confusion: torch.Tensor | np.ndarray,
                          class_names: Sequence[str] | None = None) -> SegScores:
    """Per-class IoU and accuracy, mIoU, mAcc and overall accuracy from a confusion matrix.

    ``confusion[t, p]`` counts pixels of ground-truth class t predicted as p. IoU of class c is
    TP / (TP + FP + FN), NaN when that union is 0; accuracy of c is TP / (TP + FN), NaN when c
    is absent from the ground truth.
    """
    conf = (confusion.detach().cpu().numpy() if isinstance(confusion, torch.Tensor)
            else np.asarray(confusion)).astype(np.float64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {conf.shape}")
    num_classes = conf.shape[0]
    names = tuple(class_names) if class_names is not None else default_class_names(num_classes)
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    tp = np.diag(conf)
    gt = conf.sum(axis=1)
    union = gt + conf.sum(axis=0) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan) * 100.0
        acc = np.where(gt > 0, tp / gt, np.nan) * 100.0
    total = conf.sum()
    aacc = float(tp.sum() / total * 100.0) if total > 0 else math.nan
    return SegScores(iou=tuple(float(v) for v in iou), acc=tuple(float(v) for v in acc),
                     miou=_nanmean(iou), macc=_nanmean(acc), aacc=aacc, class_names=names, pixels=int(total))


def _check_maps(pred: torch.Tensor, target: torch.Tensor) -> None:
    """Prediction and label maps must be integer tensors of one shape."""
    if pred.shape != target.shape:
        raise UserError(f"prediction shape {tuple(pred.shape)} differs from label shape "
                        f"{tuple(target.shape)}; resize predictions to the label size")
    if pred.is_floating_point() or target.is_floating_point():
        raise TypeError("SegMetric.update takes integer label maps; apply argmax to logits first")


class SegMetric:
    """Confusion-matrix metric over ``num_classes`` classes with one ignored label.

    ``update`` takes integer label maps of any shape (prediction and ground truth alike) on any
    device; ground-truth values must be in [0, num_classes) or ``ignore_index``, predictions in
    [0, num_classes) wherever the ground truth is not ignored. ``sync`` sums the counts over
    torch.distributed ranks; ``compute`` turns them into :class:`SegScores`.
    """

    def __init__(self, num_classes: int = len(CLASSES), ignore_index: int = 255,
                 class_names: Sequence[str] | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if not num_classes <= ignore_index < 65536:
            # An ignore label inside [0, C) would make a real class unscorable.
            raise ValueError(f"ignore_index must be in [num_classes, 65536), got {ignore_index}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = (tuple(class_names) if class_names is not None
                            else default_class_names(num_classes))
        self._counts = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self._synced: torch.Tensor | None = None

    @property
    def confusion(self) -> torch.Tensor:
        """The C x C int64 counts (rows = ground truth): all ranks' after ``sync``, else local."""
        return self._synced if self._synced is not None else self._counts

    def reset(self) -> None:
        """Forget all counts."""
        self._counts = torch.zeros_like(self._counts)
        self._synced = None

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predicted and ground-truth label maps (same shape) to the counts."""
        _check_maps(pred, target)
        self._counts = self._counts.to(target.device)
        self._counts += self._batch_confusion(pred.reshape(-1), target.reshape(-1))
        self._synced = None

    def update_per_image(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Like :meth:`update` for a batch of label maps [B, ...]; also returns each image's
        confusion matrix [B, C, C] (int64, on the labels' device)."""
        _check_maps(pred, target)
        confs = torch.stack([self._batch_confusion(p.reshape(-1), t.reshape(-1)) for p, t in zip(pred, target)])
        self._counts = self._counts.to(target.device)
        self._counts += confs.sum(0)
        self._synced = None
        return confs

    def _batch_confusion(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        c, ign = self.num_classes, self.ignore_index
        if target.numel() == 0:
            return torch.zeros(c, c, dtype=torch.int64, device=target.device)
        t_min, t_max = torch.aminmax(target)
        if int(t_min) < 0 or int(t_max) > ign:
            bad = int(t_min) if int(t_min) < 0 else int(t_max)
            raise UserError(f"label value {bad} outside [0, {c}) and not the ignore label {ign}; "
                            "convert labels to train ids (", CONVERT_LABELS, ")")
        p_min, p_max = torch.aminmax(pred)
        if int(p_min) < 0 or int(p_max) >= c:
            # Out-of-range predictions are harmless only on ignored pixels: drop those first.
            keep = target != ign
            pred, target = pred[keep], target[keep]
            if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= c):
                bad = int(pred.min()) if int(pred.min()) < 0 else int(pred.max())
                raise UserError(f"predicted value {bad} outside [0, {c}) on a labelled pixel; check ",
                                Option("num_classes", c), " and the prediction files")
        # One bincount over target * C + pred: ignored pixels land in the bins from ign * C on,
        # and any ground-truth value in [C, ign) lands between C * C and ign * C.
        # The narrowest integer type that holds every key keeps this pass memory-light.
        key_type = torch.int16 if (ign + 1) * c <= torch.iinfo(torch.int16).max else torch.int32
        key = target.to(key_type) * c + pred.to(key_type)
        bins = torch.bincount(key, minlength=(ign + 1) * c)
        if bool(bins[c * c:ign * c].any()):
            stray = int(torch.nonzero(bins[c * c:ign * c])[0]) // c + c
            raise UserError(f"label value {stray} outside [0, {c}) and not the ignore label {ign}; "
                            "convert labels to train ids (", CONVERT_LABELS, ")")
        return bins[:c * c].reshape(c, c)

    def sync(self) -> SegMetric:
        """Sum the counts over all torch.distributed ranks (a collective: call it on every rank).

        Without a process group the counts stay local. Safe to call more than once: it always
        sums the local counts, never an already summed matrix.
        """
        self._synced = distributed.all_reduce_sum(self._counts) if distributed.is_dist() else None
        return self

    def compute(self) -> SegScores:
        """Scores from the current counts (call ``sync`` first under torch.distributed)."""
        return scores_from_confusion(self.confusion, self.class_names)

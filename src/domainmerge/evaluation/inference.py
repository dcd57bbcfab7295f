"""Inference as mmseg-based DA code evaluates: normalisation, whole-image or sliding-window
logits, resizing to the label before argmax, and a dataset loop sharded over ranks.

- whole: logits of the full image, resized (bilinear) to the image size;
- slide: windows of ``crop`` every ``stride`` (the last window of a row/column moved back to
  end at the border), each window's logits resized to the window, summed, and divided by the
  number of windows covering each pixel.
Optionally the uint8 image is first rescaled like mmseg's ``Resize(img_scale, keep_ratio=True)``
(OpenCV's fixed-point bilinear, :mod:`domainmerge.data.resize`) and then normalised; the
logits are resized to the label's size before the argmax.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from domainmerge.data.readers import Sample, SegDataset
from domainmerge.data.resize import rescale_size, resize_to_scale
from domainmerge.errors import Option, UserError, loader_errors
from domainmerge.evaluation.metrics import ImageStats, SegMetric, SegScores
from domainmerge.runtime import distributed
from domainmerge.runtime.precision import autocast, cast_once
from domainmerge.tensors import crop_boxes, equal_size_batches, harmonic_mean, normalize

if TYPE_CHECKING:
    from domainmerge.evaluation.protocols import Protocol

MODES = ("whole", "slide")
def _forward(model: nn.Module, x: Tensor, size: Sequence[int], amp: str | None) -> Tensor:
    """Float32 logits of ``model`` on ``x``, resized (bilinear) to ``size``."""
    with autocast(x.device, amp):
        logits = model(x)
    logits = logits.float()
    if tuple(logits.shape[2:]) != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    return logits


def slide_logits(model: nn.Module, x: Tensor, crop: tuple[int, int], stride: tuple[int, int], *,
                 max_batch: int | None = None, amp: str | None = None) -> Tensor:
    """Sliding-window logits [B, C, H, W]: window logits averaged where windows overlap.

    All windows of the batch go through the model in one forward, as the authors'
    ``batched_slide`` does (HRDA test configs); ``max_batch`` bounds how many windows (times
    images) one forward takes, to cap memory. The sum is accumulated window by window in the
    same order either way, so chunking does not change the result.
    """
    n, _, height, width = x.shape
    crop = (min(crop[0], height), min(crop[1], width))
    if stride[0] < 1 or stride[1] < 1:
        raise UserError(Option("stride", stride), ": both values must be positive")
    boxes = crop_boxes(height, width, crop, stride)
    total: Tensor | None = None
    count = x.new_zeros(1, 1, height, width)
    per_call = len(boxes) if max_batch is None else max(1, max_batch // n)
    for start in range(0, len(boxes), per_call):
        chunk = boxes[start:start + per_call]
        windows = torch.cat([x[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
        logits = _forward(model, windows, crop, amp)
        if total is None:
            total = logits.new_zeros(n, logits.shape[1], height, width)
        for k, (y1, y2, x1, x2) in enumerate(chunk):
            total[:, :, y1:y2, x1:x2] += logits[k * n:(k + 1) * n]
            count[:, :, y1:y2, x1:x2] += 1
    assert total is not None
    return total / count


@torch.no_grad()
def predict(model: nn.Module, image: Tensor, mode: str = "whole", crop: tuple[int, int] = (1024, 1024),
            stride: tuple[int, int] = (512, 512), num_classes: int | None = None, *, max_batch: int | None = None,
            amp: str | None = None) -> Tensor:
    """Logits [B, C, H, W] (float32) at the image's size.

    ``image``: [B, 3, H, W] or [3, H, W]; uint8 is normalised with the dataset MEAN/STD, a
    float tensor is taken as already normalised. It must be on the model's device.
    ``max_batch``: at most this many windows per forward in slide mode (None: all of them).
    """
    if mode not in MODES:
        raise UserError(Option("mode", mode), f": unknown; use one of {', '.join(MODES)}")
    x = image.unsqueeze(0) if image.dim() == 3 else image
    if not x.is_floating_point():
        x = normalize(x)
    if mode == "whole":
        logits = _forward(model, x, x.shape[2:], amp)
    else:
        logits = slide_logits(model, x, tuple(crop), tuple(stride), max_batch=max_batch, amp=amp)  # type: ignore
    if num_classes is not None and logits.shape[1] != num_classes:
        raise UserError(f"the network predicts {logits.shape[1]} classes, not {num_classes}; "
                        "set ", Option("num_classes"), " to match the checkpoint")
    return logits


# Pixels per forward pass the default batch size aims at: a CPU is busy with about a
# megapixel (larger batches only cost memory); a GPU wants more to be kept busy.
PIXELS_PER_BATCH = {"cpu": 1 << 20, "cuda": 4 << 20}
MAX_AUTO_BATCH = 64


def default_workers(dataset: SegDataset) -> int:
    """Data loading processes: none for a dataset held in memory (``in_memory = True``, e.g.
    synthetic), where worker start-up and transfer cost more than indexing; else 2."""
    return 0 if getattr(dataset, "in_memory", False) else min(2, os.cpu_count() or 1)


def default_batch_size(dataset: SegDataset, device: torch.device, *, mode: str = "whole",
                       crop: tuple[int, int] = (1024, 1024), stride: tuple[int, int] = (512, 512),
                       img_scale: tuple[int, int] | None = None) -> int:
    """Images per forward pass: about PIXELS_PER_BATCH of the device, from the first image's size
    as the network sees it (rescaled). In slide mode an image costs all its windows, since a
    batch's windows go through the network together: a 2048x1024 image in 1024 windows at stride
    512 is 3 megapixels, so a GPU takes one image per forward, as the authors test (HRDA MiT then
    runs 30 images of 512x512 through the backbone in one call: 3 context views, 27 detail crops)."""
    if len(dataset) == 0:
        return 1
    height, width = dataset[0][0].shape[-2:]
    height, width = rescale_size(int(height), int(width), img_scale)
    pixels = height * width
    if mode == "slide":
        window = (min(crop[0], height), min(crop[1], width))
        step = (max(1, stride[0]), max(1, stride[1]))
        pixels = len(crop_boxes(height, width, window, step)) * window[0] * window[1]
    budget = PIXELS_PER_BATCH.get(device.type, PIXELS_PER_BATCH["cpu"])
    return max(1, min(MAX_AUTO_BATCH, budget // max(1, pixels)))


def evaluate_model(model: nn.Module, dataset: SegDataset, *, mode: str = "whole", crop: tuple[int, int] = (1024, 1024),
                   stride: tuple[int, int] = (512, 512), device: str | torch.device = "cpu",
                   batch_size: int | None = None, num_classes: int = 19, ignore_index: int = 255,
                   img_scale: tuple[int, int] | None = None, amp: str | None = None, workers: int | None = None,
                   progress: bool = True, desc: str = "evaluate",
                   on_prediction: Callable[[str, Tensor], None] | None = None,
                   max_windows: int | None = None, per_image: bool = False) -> SegScores:
    """Scores of ``model`` on ``dataset`` (items ``(image uint8 [3,H,W], label int64 [H,W], name)``).

    Under torch.distributed each rank takes the indices rank, rank + W, ... and the confusion
    matrices are summed, so every rank returns the scores of the whole dataset.
    ``on_prediction(name, label_map)`` receives each predicted train-id map (int64, CPU) at
    label size, e.g. to save it. In slide mode all windows of a batch run in one forward unless
    ``max_windows`` caps them. ``per_image=True`` also keeps each image's counts in
    ``scores.per_image`` (:class:`ImageStats`, rows in dataset order, gathered from every rank),
    from which ``domainmerge.evaluation.bootstrap`` computes confidence intervals.
    ``batch_size``/``workers`` None: :func:`default_batch_size`, :func:`default_workers`.

    Args:
        model: a network whose ``forward`` maps a normalised batch [B, 3, H, W] to logits.
        dataset: items ``(image uint8 [3,H,W], label int64 [H,W], name)``
            (``domainmerge.build_dataset``, or any such ``torch.utils.data.Dataset``).
        mode: ``'whole'`` or ``'slide'`` (sliding windows of ``crop`` every ``stride``).
        crop: the slide window (height, width).
        stride: the slide step (height, width).
        device: where the model runs (``'cpu'``, ``'cuda'``, ``'cuda:1'`` ...).
        batch_size: images (slide: windows) per forward; None: :func:`default_batch_size`.
        num_classes: classes scored (the label's train ids 0..num_classes-1).
        ignore_index: the label value that is not scored.
        img_scale: mmseg ``Resize(img_scale, keep_ratio=True)`` before inference; None: native size.
        amp: ``'fp16'`` or ``'bf16'`` autocast, None: float32.
        workers: data loading processes; None: :func:`default_workers`.
        progress: show a progress bar (on the main rank).
        desc: the progress bar's label.
        on_prediction: called with ``(name, label_map)`` for every image.
        max_windows: at most this many slide windows per forward; None: all of a batch.
        per_image: also keep each image's counts in ``scores.per_image``.

    Returns:
        :class:`~domainmerge.evaluation.metrics.SegScores`: ``iou``/``acc`` per class, ``miou``,
        ``macc``, ``aacc`` (percent) and ``pixels`` scored.

    Example:
        >>> import torch
        >>> from domainmerge import build_dataset, build_model, evaluate_model
        >>> _ = torch.manual_seed(0)
        >>> model = build_model("tiny_daformer_r", num_classes=19)
        >>> val = build_dataset("synthetic", "city", "val", length=2, size=(32, 64))
        >>> names = []
        >>> scores = evaluate_model(model, val, progress=False, on_prediction=lambda name, pred: names.append(name))
        >>> len(scores.iou), len(names), 0 <= scores.miou <= 100
        (19, 2, True)
    """
    dev = torch.device(device)
    if batch_size is None:
        batch_size = default_batch_size(dataset, dev, mode=mode, crop=crop, stride=stride, img_scale=img_scale)
    if workers is None:
        workers = default_workers(dataset)
    if batch_size < 1:
        raise UserError(Option("batch_size", batch_size), ": must be at least 1")
    model = model.to(dev).eval()
    metric = SegMetric(num_classes, ignore_index)
    shard = distributed.shard_indices(len(dataset))
    # A SegDataset is a map-style dataset by shape; torch's types want the class.
    items = cast("torch.utils.data.Dataset[Sample]", dataset)
    subset: torch.utils.data.Dataset[Sample] = torch.utils.data.Subset(items, list(shard))
    loader = torch.utils.data.DataLoader(subset, batch_size=None, num_workers=workers)
    from tqdm import tqdm

    bar = tqdm(total=len(shard), desc=desc, unit="img", disable=not progress or not distributed.is_main_process())
    # Each rank fills its own images' rows; the sum over ranks is every image in dataset order.
    rows = torch.zeros(len(dataset), 3, num_classes, dtype=torch.int64) if per_image else None
    done = 0
    with cast_once(dev, amp):   # the weights' casts of the first forward serve every batch
        for batch in equal_size_batches(loader_errors(loader), batch_size, lambda s: (s[0].shape, s[1].shape)):
            images = torch.stack([s[0] for s in batch]).to(dev)
            labels = torch.stack([s[1] for s in batch]).to(dev)
            # mmseg order: resize the uint8 image (OpenCV bilinear, rounded), then normalise.
            x = normalize(resize_to_scale(images, img_scale))
            logits = predict(model, x, mode, crop, stride, num_classes, max_batch=max_windows, amp=amp)
            if logits.shape[2:] != labels.shape[1:]:
                logits = F.interpolate(logits, size=labels.shape[1:], mode="bilinear", align_corners=False)
            pred = logits.argmax(dim=1)
            if rows is None:
                metric.update(pred, labels)
            else:
                stats = ImageStats.from_confusions(metric.update_per_image(pred, labels))
                rows[list(shard[done:done + len(batch)])] = torch.from_numpy(stats.rows())
            done += len(batch)
            if on_prediction is not None:
                for (_, _, name), p in zip(batch, pred.cpu()):
                    on_prediction(name, p)
            bar.update(len(batch))
    bar.close()
    scores = metric.sync().compute()
    if rows is not None:
        scores = replace(scores, per_image=ImageStats.from_rows(distributed.all_reduce_sum(rows)))
    return scores


@dataclass(frozen=True)
class DomainScores:
    """One model's scores on several domains: ``scores[domain]`` (:class:`SegScores`), and the
    paper's summary, the per-domain mIoU (``miou``) and their harmonic mean ``h``.

    Example:
        >>> from domainmerge.evaluation.inference import DomainScores
        >>> from domainmerge.evaluation.metrics import SegScores
        >>> def one(miou):
        ...     return SegScores(iou=(miou,), acc=(miou,), miou=miou, macc=miou, aacc=miou, class_names=("road",))
        >>> result = DomainScores({"city": one(30.0), "night": one(60.0)})
        >>> result.miou, result.h
        ({'city': 30.0, 'night': 60.0}, 40.0)
    """

    scores: dict[str, SegScores]

    @property
    def miou(self) -> dict[str, float]:
        """mIoU (percent) per domain, in the order the domains were given."""
        return {d: s.miou for d, s in self.scores.items()}

    @property
    def h(self) -> float:
        """H = K / sum_k 1 / mIoU_k over the domains (arXiv 2407.13771, the primary metric)."""
        return harmonic_mean(self.miou.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every domain's ``SegScores.to_dict()`` and H."""
        return {"domains": {d: s.to_dict() for d, s in self.scores.items()}, "H": self.h}


def evaluate_with(model: nn.Module, dataset: SegDataset, protocol: Protocol | None, *,
                  device: str | torch.device = "cpu",
                  batch_size: int | None = None, num_classes: int = 19, amp: str | None = None,
                  workers: int | None = None, max_windows: int | None = None, progress: bool = False,
                  desc: str = "evaluate", on_prediction: Callable[[str, Any], None] | None = None,
                  per_image: bool = False) -> SegScores:
    """:func:`evaluate_model` under a test :class:`~domainmerge.evaluation.protocols.Protocol`
    (mode, windows, image scale); ``protocol=None``: whole images at native resolution."""
    return evaluate_model(model, dataset, mode=protocol.mode if protocol else "whole",
                          crop=(protocol.crop if protocol else None) or (1024, 1024),
                          stride=(protocol.stride if protocol else None) or (512, 512), device=device,
                          batch_size=batch_size, num_classes=num_classes,
                          img_scale=protocol.img_scale if protocol else None, amp=amp, workers=workers,
                          progress=progress, desc=desc, on_prediction=on_prediction, per_image=per_image,
                          max_windows=max_windows)


def evaluate_domains(model: nn.Module, datasets: Mapping[str, SegDataset], *,
                     protocols: Mapping[str, Protocol] | None = None, device: str | torch.device = "cpu",
                     batch_size: int | None = None, num_classes: int = 19, amp: str | None = None,
                     workers: int | None = None, progress: bool = False, per_image: bool = False,
                     max_windows: int | None = None) -> DomainScores:
    """Evaluate ``model`` on every labelled dataset of ``datasets`` (one per domain).

    Each domain goes through :func:`evaluate_model` with its protocol, so the numbers are those
    of ``domainmerge evaluate``.

    Args:
        model: a network whose ``forward`` maps a normalised batch to logits (e.g. from
            ``domainmerge.model_from_state_dict``).
        datasets: domain name -> dataset of ``(image uint8 [3,H,W], label int64 [H,W], name)``
            items (``domainmerge.build_dataset``, or any such ``torch.utils.data.Dataset``).
        protocols: domain name -> :class:`domainmerge.evaluation.protocols.Protocol` (mode,
            windows, resize); a domain without one is evaluated whole at native resolution.
            ``protocols.resolve(family, kind)`` gives the authors' settings.
        device, batch_size, num_classes, amp, workers, progress, per_image, max_windows: as
            :func:`evaluate_model`.

    Returns:
        :class:`DomainScores`: ``.scores[domain]`` (SegScores), ``.miou`` per domain, ``.h``.

    Example:
        >>> import torch
        >>> from domainmerge import build_dataset, build_model, evaluate_domains, harmonic_mean
        >>> _ = torch.manual_seed(0)
        >>> model = build_model("tiny_daformer_r")
        >>> val = {d: build_dataset("synthetic", d, "val", length=4, size=(32, 64)) for d in ("city", "night")}
        >>> result = evaluate_domains(model, val)
        >>> list(result.miou)
        ['city', 'night']
        >>> result.h == harmonic_mean(result.miou.values()) and 0 <= result.h <= 100
        True
    """
    protocols = protocols or {}
    return DomainScores({
        name: evaluate_with(model, dataset, protocols.get(name), device=device, batch_size=batch_size,
                            num_classes=num_classes, amp=amp, workers=workers, progress=progress, desc=name,
                            per_image=per_image, max_windows=max_windows)
        for name, dataset in datasets.items()})


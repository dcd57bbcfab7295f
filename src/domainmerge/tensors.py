"""Low-level helpers shared by models, evaluation, training, reporting and the demo.

One home for each: the network's input normalisation (:func:`normalize`, any device), the
sliding-window boxes of mmseg/HRDA (:func:`crop_boxes`), grouping images of equal size into
batches (:func:`equal_size_batches`), and the means over domains every table shows (:func:`harmonic_mean`,
the paper's H, and :func:`arithmetic_mean`), and the non-finite checks of merging, evaluation and
inspection (:func:`all_finite`, :func:`nonfinite_keys`, :func:`nonfinite_message`). This module
imports nothing of domainmerge but the datasets' MEAN/STD, so every layer above may use it
(docs/CONTRACTS.md, "Layers").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

from domainmerge.data.classes import MEAN, STD

T = TypeVar("T")


def normalize(images: Tensor) -> Tensor:
    """uint8 RGB images [..., 3, H, W] (0-255) -> float32 ``(x - MEAN) / STD`` on their device.

    Args:
        images: uint8 (or float, 0-255 scale) RGB images, channels third from last.

    Returns:
        float32 tensor of the same shape and device, normalised with ``domainmerge.data.MEAN``/``STD``.

    Example:
        >>> import torch
        >>> from domainmerge.tensors import normalize
        >>> white = normalize(torch.full((3, 1, 1), 255, dtype=torch.uint8))
        >>> [round(v, 3) for v in white.flatten().tolist()]     # (255 - MEAN) / STD per channel
        [2.249, 2.429, 2.64]
    """
    mean, std = _mean_std(images.device)
    return (images.float() - mean) / std


_MEAN_STD: dict[torch.device, tuple[Tensor, Tensor]] = {}


def _mean_std(device: torch.device) -> tuple[Tensor, Tensor]:
    """MEAN and STD [3, 1, 1] on ``device``, made once per device: building them from the Python
    lists on a GPU is a copy from pageable memory, which waits for the queued kernels."""
    pair = _MEAN_STD.get(device)
    if pair is None:
        pair = _MEAN_STD[device] = (
            to_device(torch.tensor(MEAN, dtype=torch.float32).view(3, 1, 1), device),
            to_device(torch.tensor(STD, dtype=torch.float32).view(3, 1, 1), device))
    return pair


def to_device(t: Tensor, device: torch.device | str) -> Tensor:
    """A small host tensor (random draws, constants) on ``device`` without waiting for the GPU:
    on CUDA it goes through page-locked memory with a non-blocking copy (a copy from pageable
    memory synchronises the host with the device); elsewhere a plain ``.to``."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def crop_boxes(height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]
               ) -> list[tuple[int, int, int, int]]:
    """Sliding-window boxes (y1, y2, x1, x2) covering an image, as mmseg/HRDA place them: a
    regular grid with the last window shifted back to end at the border; windows larger than
    the image are clipped to it (mmseg ``EncoderDecoder.slide_inference``)."""
    ch, cw = crop
    sh, sw = stride
    rows = max(height - ch + sh - 1, 0) // sh + 1
    cols = max(width - cw + sw - 1, 0) // sw + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, height), min(c * sw + cw, width)
            boxes.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return boxes


def equal_size_batches(items: Iterable[T], batch_size: int, size: Callable[[T], Any]) -> Iterator[list[T]]:
    """Consecutive ``items`` grouped up to ``batch_size``, only items of equal ``size(item)``
    together (a change of size starts a new batch): how evaluation and BN recalibration batch
    images of a dataset whose images may differ in size."""
    batch: list[T] = []
    for item in items:
        if batch and (len(batch) == batch_size or size(item) != size(batch[0])):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def harmonic_mean(values: Iterable[float]) -> float:
    """K / sum(1 / v_k): the paper's H over per-domain mIoUs (0 if any is 0, NaN if any is NaN).

    Args:
        values: the per-domain scores (non-negative, e.g. mIoU in percent).

    Returns:
        The harmonic mean; it rewards a model good on every domain over one that trades one
        domain for another (H of 30 and 60 is 40, below their mean 45).

    Raises:
        ValueError: no values, or a negative one.

    Example:
        >>> from domainmerge.tensors import harmonic_mean
        >>> harmonic_mean([30.0, 60.0])
        40.0
        >>> harmonic_mean([50.0, 0.0])
        0.0
    """
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("harmonic mean of no values")
    if any(math.isnan(v) for v in vals):
        return math.nan
    if any(v < 0 for v in vals):
        raise ValueError(f"harmonic mean needs non-negative values, got {vals}")
    if any(v == 0 for v in vals):
        return 0.0
    return len(vals) / sum(1.0 / v for v in vals)


def arithmetic_mean(values: Iterable[float]) -> float:
    """Plain mean of the values (NaN if any is NaN)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("arithmetic mean of no values")
    return sum(vals) / len(vals)


__all__ = ["arithmetic_mean", "crop_boxes", "equal_size_batches", "harmonic_mean", "normalize", "to_device"]


def all_finite(t: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN or infinity.

    Fast path: one sum, into which NaN and inf propagate; only when the sum is not finite (a
    bad value, or an overflow of the sum itself) is every element checked.
    """
    if not t.dtype.is_floating_point or t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def nonfinite_keys(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of the floating tensors that hold a NaN or an infinity."""
    return [k for k, t in tensors.items() if not all_finite(t)]


def nonfinite_message(name: str, bad: Sequence[str]) -> str:
    """The one line that says a checkpoint holds ``bad`` non-finite tensors (from
    :func:`nonfinite_keys`)."""
    return (f"{name}: {len(bad)} tensors hold NaN or infinite values (e.g. {bad[0]!r}); the checkpoint is damaged "
            "or diverged")

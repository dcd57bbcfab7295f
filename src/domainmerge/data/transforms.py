"""Train-time transforms of the DAFormer/HRDA pipelines as pure tensor functions.

The authors' mmseg pipelines (lhoyer/DAFormer ``configs/_base_/datasets/uda_gta_to_cityscapes_512x512.py``,
lhoyer/HRDA ``uda_gtaHR_to_cityscapesHR_1024x1024.py``) run ``Resize(img_scale, keep_ratio=True)``,
``RandomCrop(crop_size, cat_max_ratio=0.75)``, ``RandomFlip(prob=0.5)``, then normalise and pad.
Here every random choice comes from a caller-supplied ``numpy.random.Generator``, so a sample
is a pure function of the generator's seed. Images are uint8 [3, H, W], labels int64 [H, W].
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from domainmerge.data.classes import IGNORE_INDEX, MEAN
from domainmerge.data.resize import rescale_size

Box = tuple[int, int, int, int]   # (y1, y2, x1, x2), end-exclusive


def resize(image: torch.Tensor, label: torch.Tensor | None, size: tuple[int, int]
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Image bilinear (half-pixel centres, no antialiasing: cv2.INTER_LINEAR as mmcv uses), label
    nearest (torch 'nearest' picks floor(dst * in / out) like cv2.INTER_NEAREST); ``size`` (h, w)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image, label
    if image.dtype == torch.uint8:
        # torch's uint8 kernel (fixed-point weights, like cv2's): 6x faster than via float, within 1 level
        out = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    else:
        img = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
        out = img.round_().clamp_(0, 255).to(torch.uint8)
    return out, (None if label is None else resize_nearest(label, size))


def resize_nearest(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A label map (or mask) [H, W] resized to ``size`` (h, w) by nearest neighbour, dtype kept."""
    if tuple(label.shape[-2:]) == tuple(size):
        return label
    # Interpolated as a uint8 copy (train ids, 255 and masks fit): exact for nearest, and fast.
    out = F.interpolate(label[None, None].to(torch.uint8), size=size, mode="nearest")[0, 0]
    return out.to(label.dtype)


def margin_mask(height: int, width: int, margins: tuple[int, int, int, int]) -> torch.Tensor:
    """bool [H, W]: False within (top, bottom, left, right) pixels of the border, as HRDA's
    ``crop_pseudo_margins`` marks the image regions whose pseudo-labels are not trusted."""
    mask = torch.ones(height, width, dtype=torch.bool)
    top, bottom, left, right = margins
    mask[:top] = False
    mask[:, :left] = False
    if bottom > 0:   # a slice from -0 would cover everything
        mask[height - bottom:] = False
    if right > 0:
        mask[:, width - right:] = False
    return mask


def resize_keep_ratio(image: torch.Tensor, label: torch.Tensor | None, scale: tuple[int, int]
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """mmseg ``Resize(img_scale=scale, keep_ratio=True)``: ``scale`` is (W, H) as in mmseg configs."""
    height, width = image.shape[-2:]
    return resize(image, label, rescale_size(int(height), int(width), scale))


def random_crop_box(height: int, width: int, crop: tuple[int, int], rng: np.random.Generator) -> Box:
    """A uniformly placed (y1, y2, x1, x2) of size ``crop`` (h, w), clipped to smaller images."""
    margin_h, margin_w = max(height - crop[0], 0), max(width - crop[1], 0)
    y1 = int(rng.integers(0, margin_h + 1))
    x1 = int(rng.integers(0, margin_w + 1))
    return y1, min(y1 + crop[0], height), x1, min(x1 + crop[1], width)


def crop_accepted(label: torch.Tensor, cat_max_ratio: float, ignore_index: int = IGNORE_INDEX) -> bool:
    """mmseg's cat_max_ratio test: at least two non-ignored classes, the largest below the ratio."""
    counts = torch.bincount(label.reshape(-1).to(torch.int64), minlength=ignore_index + 1)
    counts = counts[torch.arange(len(counts)) != ignore_index]
    counts = counts[counts > 0]
    return len(counts) > 1 and float(counts.max()) / float(counts.sum()) < cat_max_ratio


def cat_max_ratio_box(label: torch.Tensor, crop: tuple[int, int], cat_max_ratio: float,
                      rng: np.random.Generator, tries: int = 10) -> Box:
    """mmseg RandomCrop's box: up to ``tries`` boxes are tested with :func:`crop_accepted`; when
    none passes, one more box is drawn and used unchecked (as mmseg's loop does). With
    ``cat_max_ratio >= 1`` the first box is used."""
    height, width = label.shape
    box = random_crop_box(height, width, crop, rng)
    if cat_max_ratio >= 1.0:
        return box
    for _ in range(tries):
        if crop_accepted(label[box[0]:box[1], box[2]:box[3]], cat_max_ratio):
            break
        box = random_crop_box(height, width, crop, rng)
    return box


def apply_box(tensor: torch.Tensor, box: Box) -> torch.Tensor:
    """``tensor[..., y1:y2, x1:x2]``."""
    return tensor[..., box[0]:box[1], box[2]:box[3]]


def pad_to(image: torch.Tensor, label: torch.Tensor, size: tuple[int, int]
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad bottom/right to ``size`` (h, w) as mmseg's Pad after Normalize: the image with the
    mean colour (0 once normalised, rounded to uint8 here) and the label with 255."""
    h, w = image.shape[-2:]
    if h >= size[0] and w >= size[1]:
        return image, label
    out = torch.empty((image.shape[0], max(h, size[0]), max(w, size[1])), dtype=image.dtype)
    out[:] = torch.tensor([round(m) for m in MEAN], dtype=image.dtype).view(-1, 1, 1)
    out[:, :h, :w] = image
    lab = torch.full(out.shape[1:], IGNORE_INDEX, dtype=label.dtype)
    lab[:h, :w] = label
    return out, lab


def hflip(image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror left-right."""
    return image.flip(-1), label.flip(-1)

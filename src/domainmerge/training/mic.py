"""MIC's masked image consistency: random block masks (lhoyer/MIC ``seg/mmseg/models/utils/masking_transforms.py``,
``BlockMaskGenerator``): a grid of ``round(H / block) x round(W / block)`` cells, each kept when a
uniform draw exceeds ``mask_ratio``, enlarged to the image by nearest-neighbour resizing. The
mask multiplies the strongly augmented, **normalised** target image (``separatetrgaug``), so
hidden pixels are 0, the mean colour; the masked image is trained against the teacher's
pseudo-labels of the unmasked image with the same pixel weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from domainmerge.tensors import to_device


def block_masks(height: int, width: int, block: int, ratio: float, generators: Sequence[torch.Generator],
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Float {0, 1} masks [B, 1, H, W] (1 = visible) on ``device``, one image per generator (the
    cells are drawn on the CPU, the enlargement runs on ``device``)."""
    grid = (max(1, round(height / block)), max(1, round(width / block)))
    cells = torch.stack([torch.rand((1, *grid), generator=g) for g in generators])
    keep = to_device((cells > ratio).float(), device)
    return F.interpolate(keep, size=(height, width), mode="nearest")


def mask_image(normalised: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``BlockMaskGenerator.mask_image``: the normalised images [B, 3, H, W] times the masks [B, 1, H, W]."""
    return normalised * masks

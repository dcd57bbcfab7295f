"""MIC's masked image consistency: random block masks (lhoyer/MIC ``seg/mmseg/models/utils/masking_transforms.py``,
``BlockMaskGenerator``): a grid of ``round(H / block) x round(W / block)`` cells, each kept when a
uniform draw exceeds ``mask_ratio``, enlarged to the image by nearest-neighbour resizing. The
masked image is the strongly augmented target image times the mask (``separatetrgaug``); it is
trained against the teacher's pseudo-labels of the unmasked image with the same pixel weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def block_mask(height: int, width: int, block: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """A float {0, 1} mask [H, W] (1 = visible) for one image."""
    cells = torch.rand((1, 1, max(1, round(height / block)), max(1, round(width / block))), generator=generator)
    keep = (cells > ratio).float()
    return F.interpolate(keep, size=(height, width), mode="nearest")[0, 0]

"""HRDA's multi-resolution network for inference (keys ``decode_head.head.*`` and
``decode_head.scale_attention.*``; the wrapper itself holds no ``conv_seg``).

A low-resolution *context* view of the whole input (scaled by ``lr_scale``, 0.5 in HRDA)
gives context logits and a per-class scale attention ``a = sigmoid(scale_attention(.))``; the
full-resolution *detail* logits come from overlapping crops (``hr_crop_size``, stride half the
crop) run through the same backbone and head and averaged where crops overlap. The output is
``a * detail + (1 - a) * context`` with both attention and context upsampled to the detail grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from domainmerge.tensors import crop_boxes


def backbone_views(backbone: nn.Module, views: list[Tensor]) -> list[list[Tensor]]:
    """The backbone's features of each view (HRDA's context and detail crops), from one call on
    the views stacked where that computes the same as a call per view, else from a call each.

    The same: views of one shape (HRDA's 1024 crop at scale 0.5 and its 512 detail crops) through
    a backbone whose output for an image does not depend on the rest of the batch: no BatchNorm in
    training mode (MiT: LayerNorm, attention and convolutions act per image; ResNet in eval mode,
    its BatchNorm using the running statistics). MiT's stochastic depth is drawn per view as the
    separate calls draw it (the k-th view's rows from the k-th draw of ``path_noise``). One call
    launches one backbone's kernels instead of one per view, with the batch dimension larger (the
    same products and sums per image; on this CPU the features are equal to the bit).
    Training-mode BatchNorm normalises over the batch, so a training ResNet's views go one by
    one, as HRDA runs them."""
    from domainmerge.models.mit import MixVisionTransformer

    mit = backbone if isinstance(backbone, MixVisionTransformer) else None
    if len(views) == 1 or any(v.shape[1:] != views[0].shape[1:] for v in views) or (
            mit is None   # (MiT has no BatchNorm: no walk over its modules)
            and any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in backbone.modules())):
        return [backbone(v) for v in views]
    sizes = [v.shape[0] for v in views]
    noise = mit.path_noise if mit is not None else None
    if mit is not None and noise is not None:   # the draws of a call per view, in the views' order
        mit.path_noise = lambda n: torch.cat([noise(k) for k in sizes])
    try:
        feats = backbone(torch.cat(views))
    finally:
        if mit is not None:
            mit.path_noise = noise
    return [list(parts) for parts in zip(*(f.split(sizes) for f in feats))]


class HRDAHead(nn.Module):
    """Container for the shared segmentation head and the scale-attention head."""

    def __init__(self, head: nn.Module, scale_attention: nn.Module) -> None:
        super().__init__()
        self.head = head
        self.scale_attention = scale_attention


class HRDAEncoderDecoder(nn.Module):
    """Backbone plus :class:`HRDAHead`; ``forward`` returns fused logits on the detail grid
    (about a quarter of the input size for the DAFormer head)."""

    def __init__(self, backbone: nn.Module, decode_head: HRDAHead, *, lr_scale: float = 0.5,
                 hr_crop_size: tuple[int, int] = (512, 512), hr_overlap: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.lr_scale = lr_scale
        self.hr_crop_size = tuple(hr_crop_size)
        self.hr_overlap = hr_overlap

    def _detail_crops(self, x: Tensor) -> tuple[Tensor, list[tuple[int, int, int, int]], tuple[int, int]]:
        """The (overlapping) detail crops of ``x`` stacked crop-major, their boxes and the crop size."""
        _, _, height, width = x.shape
        crop = (min(self.hr_crop_size[0], height), min(self.hr_crop_size[1], width))
        stride = (crop[0] // 2, crop[1] // 2) if self.hr_overlap else crop
        boxes = crop_boxes(height, width, crop, stride)
        # All crops go through the network as one batch, as HRDA's batched slide does.
        return torch.cat([x[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes]), boxes, crop

    @staticmethod
    def _paste(logits: Tensor, n: int, boxes: list[tuple[int, int, int, int]], crop: tuple[int, int]) -> Tensor:
        """Detail logits of the crops pasted onto one grid and averaged where crops overlap."""
        oh, ow = logits.shape[2:]
        # Output stride of the head, from the first crop (HRDA hard-codes 4 or 8).
        sy, sx = crop[0] / oh, crop[1] / ow
        placed = [(round(y1 / sy), round(x1 / sx)) for y1, _, x1, _ in boxes]
        grid_h = max(py + oh for py, _ in placed)
        grid_w = max(px + ow for _, px in placed)
        total = logits.new_zeros(n, logits.shape[1], grid_h, grid_w)
        count = logits.new_zeros(1, 1, grid_h, grid_w)
        for k, (py, px) in enumerate(placed):
            total[:, :, py:py + oh, px:px + ow] += logits[k * n:(k + 1) * n]
            count[:, :, py:py + oh, px:px + ow] += 1
        return total / count

    def forward(self, x: Tensor) -> Tensor:
        lr = F.interpolate(x, scale_factor=self.lr_scale, mode="bilinear", align_corners=False)
        crops, boxes, crop = self._detail_crops(x)
        lr_feats, crop_feats = backbone_views(self.backbone, [lr, crops])
        context = self.decode_head.head(lr_feats)
        att = torch.sigmoid(self.decode_head.scale_attention(lr_feats))
        detail = self._paste(self.decode_head.head(crop_feats), x.shape[0], boxes, crop)
        size = detail.shape[2:]
        context = F.interpolate((1 - att) * context, size=size, mode="bilinear", align_corners=False)
        att = F.interpolate(att, size=size, mode="bilinear", align_corners=False)
        return att * detail + context

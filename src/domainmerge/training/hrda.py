"""HRDA's multi-resolution training forward (lhoyer/HRDA ``mmseg/models/segmentors/hrda_encoder_decoder.py``
and ``mmseg/models/decode_heads/hrda_head.py``), using the submodules of
:class:`domainmerge.models.hrda.HRDAEncoderDecoder`.

The whole training crop is seen at ``lr_scale`` (0.5) as *context*; a *detail* crop of
``hr_crop_size`` (512) is cut from it at full resolution, its box coordinates divisible by 8 (the
head's output stride 4 over the context scale 0.5) so that both grids align. The scale attention
``a = sigmoid(scale_attention(context features))`` is zeroed outside the detail box; the fused
logits on the full-resolution grid are ``a * detail (inside the box, 0 elsewhere) + up((1 - a) *
context)`` with ``a`` upsampled. The loss is ``HRDAHead.losses``: ``(1 - lr_loss_weight -
hr_loss_weight) x CE(fused) + hr_loss_weight x CE(detail, labels in the box)``, i.e. 0.9 x fused
+ 0.1 x detail with HRDA's weights (lr_loss_weight 0, hr_loss_weight 0.1); see :func:`hrda_loss`.
HRDA draws one box per batch, and so does the trainer by default (``Recipe.detail_boxes``
'batch', drawn from seed and iteration, so all ranks agree); 'image' draws one per image (from
seed, iteration and slot).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from domainmerge.models.hrda import HRDAEncoderDecoder, backbone_views

Box = tuple[int, int, int, int]   # (y1, y2, x1, x2)


def detail_box(height: int, width: int, crop: tuple[int, int], divisible: int, generator: torch.Generator) -> Box:
    """HRDA's ``get_crop_bbox``: offsets uniform in ``{0, d, 2d, ...} < (margin + 1)`` (d = divisible)."""
    if (height, width) == tuple(crop):
        return 0, height, 0, width
    choices_y = max((max(height - crop[0], 0) + 1) // divisible, 1)
    choices_x = max((max(width - crop[1], 0) + 1) // divisible, 1)
    y1 = int(torch.randint(choices_y, (1,), generator=generator)) * divisible
    x1 = int(torch.randint(choices_x, (1,), generator=generator)) * divisible
    return y1, y1 + crop[0], x1, x1 + crop[1]


def fuse(context: Tensor, attention: Tensor, detail: Tensor, boxes: list[Box], output_stride: int,
         lr_scale: float) -> Tensor:
    """Fused logits on the full-resolution grid (see the module docstring).

    ``context``/``attention``: [B, C, h, w] at the context scale; ``detail``: [B, C, dh, dw] of the
    detail crops; ``boxes`` in full-resolution pixels.
    """
    ctx_stride = round(output_stride / lr_scale)
    mask = torch.zeros_like(attention[:, :1])
    for i, (y1, y2, x1, x2) in enumerate(boxes):
        mask[i, :, y1 // ctx_stride:y2 // ctx_stride, x1 // ctx_stride:x2 // ctx_stride] = 1
    attention = attention * mask
    up = 1.0 / lr_scale
    context = F.interpolate((1 - attention) * context, scale_factor=up, mode="bilinear", align_corners=False)
    attention = F.interpolate(attention, scale_factor=up, mode="bilinear", align_corners=False)
    inserted = torch.zeros_like(context)
    for i, (y1, y2, x1, x2) in enumerate(boxes):
        inserted[i, :, y1 // output_stride:y2 // output_stride, x1 // output_stride:x2 // output_stride] = detail[i]
    return attention * inserted + context


def train_forward(model: HRDAEncoderDecoder, views: list[Tensor], boxes: list[list[Box]]
                  ) -> list[tuple[Tensor, Tensor, list[Tensor]]]:
    """(fused logits, detail logits, context-view backbone features) per normalised batch of
    ``views`` (one forward's, or several forwards' views in one: their context views and detail
    crops go through the backbone together where :func:`backbone_views` can stack them), each
    with its detail ``boxes``; the heads run per view, in the views' order."""
    inputs = []
    for x, bx in zip(views, boxes, strict=True):
        inputs.append(F.interpolate(x, scale_factor=model.lr_scale, mode="bilinear", align_corners=False))
        inputs.append(torch.cat([x[i:i + 1, :, y1:y2, x1:x2] for i, (y1, y2, x1, x2) in enumerate(bx)]))
    feats = backbone_views(model.backbone, inputs)
    out = []
    for v, bx in enumerate(boxes):
        context_feats, crop_feats = feats[2 * v], feats[2 * v + 1]
        context = model.decode_head.head(context_feats)
        attention = torch.sigmoid(model.decode_head.scale_attention(context_feats))
        detail = model.decode_head.head(crop_feats)
        output_stride = round(inputs[2 * v + 1].shape[-1] / detail.shape[-1])
        out.append((fuse(context, attention, detail, bx, output_stride, model.lr_scale), detail, context_feats))
    return out


def hrda_loss(fused: Tensor, detail: Tensor | None, detail_weight: float) -> Tensor:
    """``HRDAHead.losses`` from the per-view losses with lr_loss_weight 0 (every HRDA/MIC/MTDA
    config): ``(1 - detail_weight) x fused + detail_weight x detail``; the fused loss alone when
    the weight is 0 or there is no detail loss."""
    if detail is None or detail_weight == 0:
        return fused
    return (1.0 - detail_weight) * fused + detail_weight * detail


def crop_to(t: Tensor, boxes: list[Box]) -> Tensor:
    """The ``boxes`` of a [B, H, W] (or [B, C, H, W]) tensor stacked."""
    return torch.stack([t[i, ..., y1:y2, x1:x2] for i, (y1, y2, x1, x2) in enumerate(boxes)])

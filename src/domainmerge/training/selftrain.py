"""DACS self-training pieces as DAFormer computes them (lhoyer/DAFormer ``mmseg/models/uda/dacs.py``).

- Pseudo-labels: arg-max of the teacher's softmax; every pixel of the batch gets the same weight,
  the share of the batch's pixels whose confidence reaches the threshold; the top and bottom rows
  of each crop get weight 0 (``pseudo_weight_ignore_top/bottom``). The share is counted over the
  global batch (summed over ranks), so a run on several processes weighs as one process would.
- Losses: mmseg 0.x cross-entropy, pixel losses times their weight averaged over all pixels
  (ignored pixels count as 0), logits bilinearly resized to the label size.
- Feature distance: L2 distance between the student's and the frozen ImageNet model's deepest
  backbone features, averaged over the feature pixels whose downscaled source label is a thing
  class (a label cell counts when one class covers at least ``min_ratio`` of it), times lambda.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from domainmerge.data.classes import IGNORE_INDEX
from domainmerge.runtime.distributed import all_reduce_sum
from domainmerge.tensors import to_device


def resized_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``logits`` bilinearly resized to ``size`` (h, w), as mmseg's decode-head loss does."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def weighted_ce(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """mmseg 0.x ``CrossEntropyLoss``: per-pixel CE (0 at ignored pixels) times ``weight``, mean over
    all pixels; ``logits`` are resized to the labels first."""
    ce = F.cross_entropy(resized_logits(logits, labels.shape[-2:]).float(), labels, ignore_index=IGNORE_INDEX,
                         reduction="none")
    if weight is not None:
        ce = ce * weight
    return ce.mean()


@torch.no_grad()
def pseudo_labels(logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(arg-max labels [B, H, W], confident-pixel count of the batch as a float tensor)."""
    conf, labels = torch.softmax(logits.float(), dim=1).max(dim=1)
    return labels, (conf >= threshold).sum().to(torch.float64)


@torch.no_grad()
def pseudo_weight(confident: torch.Tensor, labels: torch.Tensor, ignore_top: int = 0,
                  ignore_bottom: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel weights [B, H, W] of the pseudo-labels ``labels`` and the scalar weight (a 0-dim
    float64 tensor on the labels' device: reading it would stall the GPU, so the trainer reads
    it only when it logs).

    The scalar is the confident share of the global batch: ``confident`` and the pixel count are
    summed over ranks. Rows ``[:ignore_top]`` and ``[-ignore_bottom:]`` of every crop get 0.
    """
    numel = torch.full((), float(labels.numel()), dtype=torch.float64, device=labels.device)
    counts = all_reduce_sum(torch.stack([confident.to(torch.float64).reshape(()), numel]))
    share = counts[0] / counts[1]
    # float64 share rounded to float32 once, as torch.full(shape, python float) does
    weight = share.to(torch.float32).expand(labels.shape).clone()
    if ignore_top > 0:
        weight[:, :ignore_top, :] = 0
    if ignore_bottom > 0:
        weight[:, -ignore_bottom:, :] = 0
    return weight, share


@torch.no_grad()
def downscale_label_ratio(labels: torch.Tensor, factor: int, min_ratio: float, num_classes: int,
                          ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Labels [B, H, W] -> [B, H/factor, W/factor]: the majority class of each factor x factor cell,
    or ``ignore_index`` when it covers less than ``min_ratio`` of the cell (ignored pixels count as
    a class of their own)."""
    # masked_fill rather than boolean-index assignment: no host round trip on CUDA
    lab = labels.masked_fill(labels == ignore_index, num_classes)
    onehot = F.one_hot(lab, num_classes + 1).permute(0, 3, 1, 2).float()
    ratio, out = F.avg_pool2d(onehot, kernel_size=factor).max(dim=1)
    return out.masked_fill((out == num_classes) | (ratio < min_ratio), ignore_index)


def feature_distance(student: torch.Tensor, imnet: torch.Tensor, labels: torch.Tensor, classes: Sequence[int],
                     min_ratio: float, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of per-pixel L2 feature distances over the thing-class mask, mask size as float).

    ``student``/``imnet``: [B, C, h, w] deepest features; ``labels`` [B, H, W] source labels with
    H / h = W / w an integer. The caller divides by the mask size summed over ranks.
    """
    factor = labels.shape[-1] // student.shape[-1]
    small = downscale_label_ratio(labels, factor, min_ratio, num_classes)
    # the class list is made on the host and copied without blocking (a plain copy of pageable
    # memory to the GPU would wait for the queued kernels)
    wanted = torch.tensor(list(classes), dtype=small.dtype)
    mask = torch.isin(small, to_device(wanted, small.device))
    dist = torch.norm(student.float() - imnet.float().detach(), p=2, dim=1)
    # On CUDA a masked sum: boolean indexing would wait for the mask's size (a host round trip).
    # On CPU the selected elements are summed, the order (and rounding) of the original recipe.
    total = dist.masked_fill(~mask, 0).sum() if dist.is_cuda else dist[mask].sum()
    return total, mask.sum().to(torch.float64)

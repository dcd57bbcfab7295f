"""BatchNorm recalibration: re-estimate running statistics from unlabeled images.

The data-driven baseline the paper avoids (REPAIR's "reset"): every BN layer's running
statistics are reset and re-accumulated as a cumulative average (``momentum=None``) over the
given batches, forwarded with the BN layers in training mode and everything else in eval mode
(dropout off), without gradients. PyTorch's rule then gives, for B batches,
running_mean = mean_b(batch mean_b), running_var = mean_b(unbiased batch var_b),
num_batches_tracked = B. Only BN buffers change.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from domainmerge.errors import UserError

_BatchNorm = nn.modules.batchnorm._BatchNorm


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The model's BN layers that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[Tensor], *, device: str | torch.device = "cpu",
                   progress: bool = False, total: int | None = None) -> int:
    """Reset and re-estimate ``model``'s BN running statistics from normalised float batches
    [B, 3, H, W]; returns the number of batches. The model is left in eval mode. ``total``: the
    number of images the batches hold, for the progress bar (counted in images)."""
    layers = batchnorm_layers(model)
    if not layers:
        raise UserError("the model has no BatchNorm layer with running statistics; nothing to recalibrate")
    model.to(device).eval()
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches, not an exponential one
        m.train()
    from tqdm import tqdm

    count = 0
    bar = tqdm(total=total, desc="recalibrate BN", unit="img", disable=not progress)
    try:
        for x in batches:
            try:
                model(x.to(device))
            except ValueError as exc:  # BN after global pooling cannot normalise a batch of one
                raise UserError(f"BatchNorm in training mode failed on a batch of {len(x)}: {exc}; "
                                "use --batch-size 2 or more") from None
            count += 1
            bar.update(len(x))
    finally:
        bar.close()
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.eval()
    if count == 0:
        raise UserError("no image to recalibrate on; check the --domain folders and --images")
    return count


def spread_indices(lengths: Mapping[str, int], n: int) -> dict[str, list[int]]:
    """``n`` image indices spread over domains: an equal share each (the first ``n % K`` get one
    more), evenly spaced within each dataset; a domain with fewer images gives all it has."""
    if n < 1:
        raise UserError(f"--images {n}: must be at least 1")
    names = list(lengths)
    out: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        share = min(n // len(names) + (1 if i < n % len(names) else 0), lengths[name])
        out[name] = sorted({int(j) for j in np.linspace(0, lengths[name] - 1, share).round()}) if share else []
    return out


def image_batches(datasets: Mapping[str, Any], indices: Mapping[str, Sequence[int]], *, batch_size: int = 1,
                  img_scale: tuple[int, int] | None | Mapping[str, tuple[int, int] | None] = None
                  ) -> Iterable[Tensor]:
    """Normalised batches [B, 3, H, W] of ``datasets[d][i]`` (items whose first element is a uint8
    RGB image), optionally rescaled as evaluation rescales them (``img_scale`` one for all
    domains or a mapping domain -> scale); consecutive images of equal size are stacked up to
    ``batch_size``, a change of size starts a new batch."""
    from domainmerge.evaluation.inference import normalize
    from domainmerge.evaluation.resize import resize_to_scale

    pending: list[Tensor] = []
    for name, idx in indices.items():
        for i in idx:
            scale = img_scale.get(name) if isinstance(img_scale, Mapping) else img_scale
            x = normalize(resize_to_scale(datasets[name][i][0].unsqueeze(0), scale))
            if pending and (len(pending) == batch_size or pending[0].shape != x.shape):
                yield torch.cat(pending)
                pending = []
            pending.append(x)
    if pending:
        yield torch.cat(pending)

"""Which images a data-using step reads, and in which batches: ``spread_indices`` picks ``n`` images
spread evenly over domains, ``image_batches`` yields them normalised (and rescaled as evaluation
rescales them). Shared by BN recalibration, the learned merges and the demo."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from domainmerge.data.readers import SegDataset
from domainmerge.data.resize import resize_to_scale
from domainmerge.errors import Option, UserError
from domainmerge.tensors import equal_size_batches, normalize


def spread_indices(lengths: Mapping[str, int], n: int) -> dict[str, list[int]]:
    """``n`` image indices spread over domains: an equal share each (the first ``n % K`` get one
    more), evenly spaced within each dataset; a domain with fewer images gives all it has."""
    if n < 1:
        raise UserError(Option("images", n), ": must be at least 1")
    names = list(lengths)
    out: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        share = min(n // len(names) + (1 if i < n % len(names) else 0), lengths[name])
        out[name] = sorted({int(j) for j in np.linspace(0, lengths[name] - 1, share).round()}) if share else []
    return out


def image_batches(datasets: Mapping[str, SegDataset], indices: Mapping[str, Sequence[int]], *, batch_size: int = 1,
                  img_scale: tuple[int, int] | None | Mapping[str, tuple[int, int] | None] = None
                  ) -> Iterable[Tensor]:
    """Normalised batches [B, 3, H, W] of ``datasets[d][i]`` (items whose first element is a uint8
    RGB image), optionally rescaled as evaluation rescales them (``img_scale`` one for all
    domains or a mapping domain -> scale); consecutive images of equal size are stacked up to
    ``batch_size``, a change of size starts a new batch."""
    def images() -> Iterator[Tensor]:
        for name, idx in indices.items():
            scale = img_scale.get(name) if isinstance(img_scale, Mapping) else img_scale
            for i in idx:
                yield normalize(resize_to_scale(datasets[name][i][0].unsqueeze(0), scale))

    for batch in equal_size_batches(images(), batch_size, lambda x: x.shape):
        yield torch.cat(batch)

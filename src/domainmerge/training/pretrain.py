"""The pretraining stage that stands in for ImageNet weights, and the head re-initialisation."""

from __future__ import annotations

import torch
from torch import nn

from domainmerge.training.loop import TrainConfig, train_supervised


def pretrain(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, config: TrainConfig,
             generator: torch.Generator) -> list[float]:
    """Train ``model`` (in place) on the generic pretraining task; returns the per-iteration loss.

    Only the backbone is meant to be kept: call :func:`reset_head` before adaptation.
    """
    return train_supervised(model, images, labels, config, generator, desc="pretrain")


def reset_head(model: nn.Module, seed: int, head: str = "decode_head") -> None:
    """Re-initialise every layer of the decode head from ``seed`` (same seed -> same head).

    Every run that starts from the shared pretrained backbone also starts from the same head, as
    a seeded mmseg run does.
    """
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for module in getattr(model, head).modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    finally:
        torch.random.set_rng_state(state)

"""Initial weights of a run: re-initialising a decode head from a seed."""

from __future__ import annotations

import torch
from torch import nn


def reset_head(model: nn.Module, seed: int, head: str = "decode_head") -> None:
    """Re-initialise every layer of the decode head from ``seed`` (same seed -> same head).

    Every run that starts from a shared pretrained backbone also starts from the same head, as
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

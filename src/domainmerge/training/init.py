"""Initial weights of a run: re-initialising a decode head from a seed."""

from __future__ import annotations

import torch
from torch import nn


def reset_head(model: nn.Module, seed: int, head: str = "decode_head") -> None:
    """Re-initialise every layer of the decode head from ``seed`` (same seed -> same head), as
    the network builds it (torch defaults, then the heads' ``init_weights``).

    Every run that starts from a shared pretrained backbone also starts from the same head, as
    a seeded mmseg run does.
    """
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        modules = list(getattr(model, head).modules())
        for module in modules:
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
        for module in modules:   # then mmcv/mmseg's own schemes (ConvModule Kaiming, conv_seg Normal(0, 0.01))
            init = getattr(module, "init_weights", None)
            if callable(init):
                init()
    finally:
        torch.random.set_rng_state(state)

"""The mean teacher: an exponential moving average of the student's parameters (DAFormer's
``DACS._update_ema``; buffers such as BatchNorm statistics are not averaged)."""

from __future__ import annotations

import torch
from torch import nn


def ema_alpha(it: int, alpha: float) -> float:
    """DAFormer's ramp: ``min(1 - 1 / (it + 1), alpha)``, so early teachers follow the student."""
    return min(1.0 - 1.0 / (it + 1), alpha)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, alpha: float, it: int) -> float:
    """``teacher <- a * teacher + (1 - a) * student`` over parameters with a = :func:`ema_alpha`;
    returns a."""
    a = ema_alpha(it, alpha)
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(a).add_(s.detach(), alpha=1.0 - a)
    return a


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters take no gradient."""
    import copy

    out = copy.deepcopy(model)
    for p in out.parameters():
        p.requires_grad_(False)
    return out

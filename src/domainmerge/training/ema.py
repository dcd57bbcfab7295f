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
    returns a.

    One multi-tensor (foreach) multiply and add over all parameters: on CUDA a few kernels
    instead of two per parameter. The same two operations as a per-tensor ``mul_``/``add_`` loop,
    so the result is that loop's (bit-identical on CPU, where foreach falls back to the loop);
    ``_foreach_lerp_`` would round differently."""
    a = ema_alpha(it, alpha)
    teach: list[torch.Tensor] = list(teacher.parameters())
    stud = [s.detach() for s in student.parameters()]
    if len(teach) != len(stud):
        raise ValueError(f"EMA: the teacher has {len(teach)} parameters, the student {len(stud)}")
    torch._foreach_mul_(teach, a)
    torch._foreach_add_(teach, stud, alpha=1.0 - a)
    return a


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters take no gradient."""
    import copy

    out = copy.deepcopy(model)
    for p in out.parameters():
        p.requires_grad_(False)
    return out

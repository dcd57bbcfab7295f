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


class CastShadow:
    """A copy of ``net`` for forward passes under autocast to ``dtype`` (the teacher, the frozen
    ImageNet copy): the weights and biases of its convolutions and linear layers held in
    ``dtype``, every other parameter (norms) and every buffer shared with ``net``.

    Autocast casts a parameter that takes no gradient at every forward (it caches only the casts
    of leaf tensors that require one), a kernel per tensor; the shadow makes those casts once,
    and :meth:`refresh` redoes them after the teacher's EMA with one multi-tensor copy. The
    outputs are autocast's to the bit (the same rounding of the same values); BatchNorm running
    statistics that a training-mode forward updates land in ``net``'s buffers. ``net`` keeps
    its float32 parameters: the EMA, the checkpoints and resuming use them.
    """

    def __init__(self, net: nn.Module, dtype: torch.dtype) -> None:
        import copy

        self.module = copy.deepcopy(net)
        self.sources: list[torch.Tensor] = []
        self.casts: list[torch.Tensor] = []
        for m, s in zip(net.modules(), self.module.modules()):
            cast = isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
            for name, p in m._parameters.items():
                if p is None:
                    continue
                if cast:
                    low = p.detach().to(dtype)
                    s._parameters[name] = nn.Parameter(low, requires_grad=False)
                    self.sources.append(p)
                    self.casts.append(low)
                else:
                    s._parameters[name] = p
            for name, b in m._buffers.items():
                s._buffers[name] = b

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-cast the shadowed tensors from ``net``'s current values."""
        if self.casts:
            torch._foreach_copy_(self.casts, [p.detach() for p in self.sources])

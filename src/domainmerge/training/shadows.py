"""Low-precision copies of a network's convolution and linear weights, made once instead of by
autocast at every use: :class:`CastShadow` for the networks that only run forward (the teacher,
the ImageNet copy), :class:`GradShadow` for the student, whose gradients flow back into its own
float32 parameters."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from functools import partial

import torch
from torch import nn

# the modules whose weights and biases autocast casts (norms run in float32 under autocast)
CAST_MODULES = (nn.Linear, nn.modules.conv._ConvNd)


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
        self.module = copy.deepcopy(net)
        self.sources: list[torch.Tensor] = []
        self.casts: list[torch.Tensor] = []
        for m, s in zip(net.modules(), self.module.modules()):
            cast = isinstance(m, CAST_MODULES)
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


def _accumulate(master: torch.Tensor, low: torch.Tensor) -> None:
    """Adds the gradient a backward pass left on ``low`` to ``master.grad`` in float32 and clears
    it: what autograd does with the gradient of autocast's cast (a cast to float32, then an add),
    with the cast done by the add (a float32 sum with exactly converted bf16/fp16 values)."""
    g = low.grad
    assert g is not None
    low.grad = None
    if master.grad is None:   # in the parameter's own layout, as autograd keeps a first gradient
        master.grad = torch.empty_like(master).copy_(g)
    else:
        master.grad.add_(g)


class GradShadow:
    """Low-precision leaves standing in for the student's convolution and linear weights and
    biases during an iteration (:meth:`swapped`), their gradients accumulated into the float32
    parameters by a hook after each backward pass.

    Under autocast with the iteration's forwards in one :func:`~domainmerge.runtime.precision.cast_once`
    region, each such weight costs a cast in the first forward, then per backward pass a cast of
    its gradient to float32 and (from the second pass) an add into ``.grad``: 4 kernels per
    weight for DAFormer's 2 passes, 6 for MIC's 3. Here the casts of all weights are one
    multi-tensor copy per iteration and each pass costs one kernel per weight (a copy into a new
    float32 ``.grad``, then adds of the bf16 gradient). The numbers are the same to the bit: the
    leaves hold autocast's casts, a pass sums the uses of a leaf in its dtype as it sums the uses
    of a cached cast, and float32 ``.grad`` receives the same exactly converted values in the same
    order.

    Not for DistributedDataParallel (its reducer waits for gradients of the parameters it was
    given) nor compiled modules (their guards hold the parameters): the trainer uses it for an
    eager single-process student under autocast.
    """

    def __init__(self, net: nn.Module, dtype: torch.dtype) -> None:
        self.slots: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]] = []
        for m in net.modules():
            if not isinstance(m, CAST_MODULES):
                continue
            for name, p in m._parameters.items():
                if p is None or not p.requires_grad:
                    continue
                low = nn.Parameter(p.detach().to(dtype))   # the parameter's strides (preserve_format)
                low.register_post_accumulate_grad_hook(partial(_accumulate, p))
                self.slots.append((m, name, p, low))

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The modules hold the leaves, cast afresh from the parameters (one multi-tensor copy),
        until the block ends; then the parameters again (the optimiser, the EMA and the
        checkpoints only see those). The parameters must not change inside the block."""
        if not self.slots:
            yield
            return
        with torch.no_grad():
            torch._foreach_copy_([s[3] for s in self.slots], [s[2].detach() for s in self.slots])
        for m, name, _, low in self.slots:
            m._parameters[name] = low
        try:
            yield
        finally:
            for m, name, p, low in self.slots:
                m._parameters[name] = p
                low.grad = None   # a pass interrupted before its hook ran

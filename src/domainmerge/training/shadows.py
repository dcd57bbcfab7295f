"""Low-precision copies of a network's convolution and linear weights, made once instead of by
autocast at every use: :class:`CastShadow` for the networks that only run forward (the teacher,
the ImageNet copy), :class:`GradShadow` for the student, whose gradients flow back into its own
float32 parameters."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

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


class GradShadow:
    """Low-precision leaves standing in for the student's convolution and linear weights and
    biases during an iteration (:meth:`swapped`); after each backward pass :meth:`collect` moves
    the gradients they received into the float32 parameters' ``.grad``.

    With autocast's cast cached for the iteration (:func:`~domainmerge.runtime.precision.cast_once`),
    each such weight costs a cast in the first forward, then per backward pass a cast of its
    gradient to float32 and, from the second pass, an add into ``.grad``: per weight 4 kernels
    for DAFormer's 2 passes, 6 for MIC's 3 (MiT-B5 with its head has about 724 such tensors).
    Here the iteration's casts are one multi-tensor copy, and a pass's gradients reach ``.grad``
    by one multi-tensor copy (first pass) or a copy into float32 scratch and a multi-tensor add
    (later passes): on CUDA a few launches per pass instead of one or two per weight. The
    numbers are the same to the bit: the leaves hold autocast's casts, a pass sums the uses of a
    leaf in its dtype as it sums the uses of a cached cast, and ``.grad`` receives the same
    exactly converted values in the same order. The scratch costs one float32 copy of the
    weights (340 MB for MiT-B5) when an iteration has several backward passes.

    Compiled parts (``torch.compile``) trace the leaves once, as the same tensors every
    iteration, and lose their casts: a compiled graph has no cast cache, so without the shadow
    each compiled forward casts every weight again and its backward casts every gradient.
    Not for DistributedDataParallel (its reducer waits for gradients of the parameters it was
    given): the trainer uses it for a single-process student under autocast.
    """

    def __init__(self, net: nn.Module, dtype: torch.dtype) -> None:
        self.slots: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]] = []
        for m in net.modules():
            if not isinstance(m, CAST_MODULES):
                continue
            for name, p in m._parameters.items():
                if p is not None and p.requires_grad:   # the leaf in the parameter's strides
                    self.slots.append((m, name, p, nn.Parameter(p.detach().to(dtype))))
        # float32 gradient buffers, made once: .grad of the first pass, the later passes' scratch
        self.buffers: dict[int, torch.Tensor] = {}
        self.scratch: dict[int, torch.Tensor] = {}

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The modules hold the leaves, cast afresh from the parameters (one multi-tensor copy),
        until the block ends; then the parameters again (the optimiser, the EMA and the
        checkpoints only see those). The parameters must not change inside the block. A pass's
        gradients not yet collected are collected when the block ends without an error."""
        if not self.slots:
            yield
            return
        with torch.no_grad():
            torch._foreach_copy_([s[3] for s in self.slots], [s[2].detach() for s in self.slots])
        for m, name, _, low in self.slots:
            m._parameters[name] = low
        try:
            yield
            self.collect()
        finally:
            for m, name, p, low in self.slots:
                m._parameters[name] = p
                low.grad = None

    @torch.no_grad()
    def collect(self) -> None:
        """Adds the gradients the last backward pass left on the leaves to the parameters'
        float32 ``.grad`` (a parameter without one gets it) and clears the leaves'."""
        first: list[tuple[torch.Tensor, torch.Tensor]] = []
        later: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for _, _, p, low in self.slots:
            g = low.grad
            if g is None:
                continue
            low.grad = None
            if p.grad is None:
                buf = self.buffers.get(id(p))
                if buf is None:
                    buf = self.buffers[id(p)] = torch.empty_like(p)
                p.grad = buf
                first.append((buf, g))
            else:
                scratch = self.scratch.get(id(p))
                if scratch is None:
                    scratch = self.scratch[id(p)] = torch.empty_like(p)
                later.append((p.grad, scratch, g))
        if first:
            torch._foreach_copy_([b for b, _ in first], [g for _, g in first])
        if later:   # bf16 -> float32 scratch, then a float32 add (a multi-tensor add takes one dtype)
            torch._foreach_copy_([s for _, s, _ in later], [g for _, _, g in later])
            torch._foreach_add_([d for d, _, _ in later], [s for _, s, _ in later])

"""Low-precision copies of a network's convolution and linear weights, made once instead of by
autocast at every use: :class:`CastShadow` for the networks that only run forward (the teacher,
the ImageNet copy), :class:`GradShadow` for the student, whose gradients flow back into its own
float32 parameters."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import cast

import torch
from torch import nn

# the modules whose weights and biases autocast casts (norms run in float32 under autocast)
CAST_MODULES = (nn.Linear, nn.modules.conv._ConvNd)
SCRATCH_ELEMENTS = 1 << 24   # float32 scratch of GradShadow (64 MB), reused chunk by chunk


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
    biases during an iteration (:meth:`swapped`), float32 ones on the memory of its other
    parameters (norms); after each backward pass :meth:`collect` moves the gradients they
    received into the float32 parameters' ``.grad``.

    With autocast's cast cached for the iteration (:func:`~domainmerge.runtime.precision.cast_once`),
    each such weight costs a cast in the first forward, then per backward pass a cast of its
    gradient to float32 and, from the second pass, an add into ``.grad``: per weight 4 kernels
    for DAFormer's 2 passes, 6 for MIC's 3 (MiT-B5 with its head has about 724 such tensors).
    Here the iteration's casts are one multi-tensor copy, and a pass's gradients reach ``.grad``
    by one multi-tensor copy (first pass) or a copy into float32 scratch and a multi-tensor add
    (later passes): on CUDA a few launches per pass instead of one or two per weight. The
    numbers are the same to the bit: the leaves hold autocast's casts, a pass sums the uses of a
    leaf in its dtype as it sums the uses of a cached cast, and ``.grad`` receives the same
    exactly converted values in the same order. The scratch is one float32 buffer of
    ``SCRATCH_ELEMENTS`` (64 MB), reused chunk by chunk. The other parameters' gradients are
    kept as autograd keeps them (the first pass's tensor, then adds), by multi-tensor adds.

    Compiled parts (``torch.compile``) trace the leaves once, as the same tensors every
    iteration, and lose their casts: a compiled graph has no cast cache, so without the shadow
    each compiled forward casts every weight again and its backward casts every gradient.
    DistributedDataParallel never sees these gradients (they reach ``.grad`` outside autograd):
    the trainer runs every backward pass under ``no_sync`` and averages the gradients after the
    last one (:func:`~domainmerge.runtime.distributed.average_gradients`).
    """

    def __init__(self, net: nn.Module, dtype: torch.dtype) -> None:
        # (module, name, parameter, leaf): the cast weights and biases, then every other trainable
        # parameter (norms) as a float32 leaf on the parameter's own memory, so that its
        # gradients too reach .grad by multi-tensor adds instead of an add per tensor and pass
        self.slots: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]] = []
        self.same: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]] = []
        for m in net.modules():
            for name, p in m._parameters.items():
                if p is None or not p.requires_grad:
                    continue
                if isinstance(m, CAST_MODULES):   # the leaf in the parameter's strides
                    self.slots.append((m, name, p, nn.Parameter(p.detach().to(dtype))))
                else:
                    self.same.append((m, name, p, nn.Parameter(p.detach())))
        self.buffers: dict[int, torch.Tensor] = {}   # float32 .grad of the first pass, made once
        self.scratch: torch.Tensor | None = None

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The modules hold the leaves, cast afresh from the parameters (one multi-tensor copy),
        until the block ends; then the parameters again (the optimiser, the EMA and the
        checkpoints only see those). The parameters must not change inside the block. A pass's
        gradients not yet collected are collected when the block ends without an error."""
        if self.slots:
            with torch.no_grad():
                torch._foreach_copy_([s[3] for s in self.slots], [s[2].detach() for s in self.slots])
        for m, name, _, leaf in (*self.slots, *self.same):
            m._parameters[name] = leaf
        try:
            yield
            self.collect()
        finally:
            for m, name, p, leaf in (*self.slots, *self.same):
                m._parameters[name] = p
                leaf.grad = None

    @torch.no_grad()
    def collect(self) -> None:
        """Adds the gradients the last backward pass left on the leaves to the parameters'
        float32 ``.grad`` (a parameter without one gets it) and clears the leaves'."""
        first, later = _taken(self.slots)
        if first:   # into float32 buffers made once
            for p, _ in first:
                p.grad = self._buffer(p)
            torch._foreach_copy_([cast(torch.Tensor, p.grad) for p, _ in first], [g for _, g in first])
        if later:
            self._add([(cast(torch.Tensor, p.grad), g) for p, g in later])
        first, later = _taken(self.same)
        for p, g in first:   # as autograd keeps a first gradient: that tensor itself
            p.grad = g
        if later:
            torch._foreach_add_([cast(torch.Tensor, p.grad) for p, _ in later], [g for _, g in later])

    def _buffer(self, p: nn.Parameter) -> torch.Tensor:
        buf = self.buffers.get(id(p))
        if buf is None:
            buf = self.buffers[id(p)] = torch.empty_like(p)
        return buf

    def _add(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """``dst += src`` for float32 ``dst`` and low-precision ``src`` of the same strides: a
        multi-tensor add takes one dtype, so each chunk of ``src`` is first copied to float32 in
        views of the scratch buffer laid out as ``dst`` (the views must share ``dst``'s strides
        for the multi-tensor kernels)."""
        size = max(SCRATCH_ELEMENTS, max(d.numel() for d, _ in pairs))
        if self.scratch is None or self.scratch.numel() < size or self.scratch.device != pairs[0][0].device:
            self.scratch = torch.empty(size, dtype=torch.float32, device=pairs[0][0].device)
        chunk: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        offset = 0
        for d, g in pairs:
            if offset + d.numel() > size:
                _add_chunk(chunk)
                chunk, offset = [], 0
            chunk.append((d, self.scratch.as_strided(d.shape, d.stride(), offset), g))
            offset += d.numel()
        _add_chunk(chunk)


def _taken(slots: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]]
           ) -> tuple[list[tuple[nn.Parameter, torch.Tensor]], list[tuple[nn.Parameter, torch.Tensor]]]:
    """The gradients the leaves of ``slots`` hold, cleared from them: (parameter, gradient) of the
    parameters that have no ``.grad`` yet (a parameter's first leaf only), and of the others."""
    first: list[tuple[nn.Parameter, torch.Tensor]] = []
    later: list[tuple[nn.Parameter, torch.Tensor]] = []
    fresh: set[int] = set()
    for _, _, p, leaf in slots:
        g = leaf.grad
        if g is None:
            continue
        leaf.grad = None
        if p.grad is None and id(p) not in fresh:
            fresh.add(id(p))
            first.append((p, g))
        else:
            later.append((p, g))
    return first, later


def _add_chunk(chunk: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """(dst, float32 scratch view, src): the copies to float32, then the float32 adds."""
    torch._foreach_copy_([t for _, t, _ in chunk], [g for _, _, g in chunk])
    torch._foreach_add_([d for d, _, _ in chunk], [t for _, t, _ in chunk])

"""Mixed precision: the one vocabulary of the ``amp`` option and the autocast context built from it.

``amp`` is None or 'none' (full precision), 'bf16' or 'fp16' everywhere in the library (training,
evaluation, interpolation); :func:`amp_mode` turns any accepted value into None/'bf16'/'fp16'.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from domainmerge.errors import Option, UserError

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
AMP_CHOICES = ("none", *AMP_DTYPES)   # the values a command line offers; None means 'none'


def amp_mode(amp: str | None) -> str | None:
    """None for no mixed precision (None or 'none'), else the validated name ('bf16', 'fp16')."""
    if amp is None or amp == "none":
        return None
    if amp not in AMP_DTYPES:
        raise UserError(Option("amp", amp), f": unknown; use one of {', '.join(AMP_DTYPES)}")
    return amp


def autocast(device: torch.device, amp: str | None) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision for the forward pass: 'fp16'/'bf16' on CUDA (bf16 also on CPU), else off."""
    amp = amp_mode(amp)
    if amp is None:
        return contextlib.nullcontext()
    if device.type != "cuda" and amp == "fp16":
        raise UserError(Option("amp", "fp16"), " needs a CUDA device; use ", Option("amp", "bf16"), " or no ",
                        Option("amp"), " on CPU")
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def cast_once(device: torch.device, amp: str | None) -> contextlib.AbstractContextManager[Any]:
    """A region in which the :func:`autocast` forwards inside it cast each weight once.

    Autocast keeps its casts of leaf tensors that require grad (a network's weights) until its
    outermost region ends; when each forward is a region of its own, every forward casts every
    weight again (MiT-B5: about 750 casts, as many kernels, per forward). This region is autocast
    turned off: what runs in it outside the forwards stays in float32, and the forwards' regions
    nest in it. The weights must not change inside it (an optimiser step, an EMA): a forward
    after the change would use the old casts. Nor may a forward without gradients (``no_grad``)
    precede one with gradients of the same weights: the second would get the first's casts,
    which are not linked to the weights. The same values are cast, so the outputs, and the
    gradients (each backward turns its own gradient of the cast into float32), are the same."""
    amp = amp_mode(amp)
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp], enabled=False)

"""DACS' strong augmentation as the authors run it (lhoyer/DAFormer ``mmseg/models/utils/dacs_transforms.py``
and ``mmseg/models/uda/dacs.py``; lhoyer/MIC ``seg/mmseg/models/uda/masking_consistency_module.py``),
batched on the training device: ClassMix masks, kornia 0.5's ColorJitter, Gaussian blur.

The authors' semantics, kept here:

- ClassMix (``get_class_masks``): every image pastes ``ceil(n / 2)`` classes drawn from the ``n``
  values of ``torch.unique`` over the labels of the **whole batch**, the ignore label included;
  classes absent from the image paste nothing. The union is taken over the global batch (the
  ranks' presence vectors are summed), so a batch split over torchrun ranks draws as one process.
- Colour jitter (``color_jitter``): one uniform draw per iteration, shared by the batch; the jitter
  runs when it exceeds ``jitter_skip`` (0.2: on about 80 % of iterations). It is kornia 0.5's
  ``ColorJitter(brightness=s, contrast=s, saturation=s, hue=s)`` on 0-1 images: brightness
  **adds** ``U(-s, s)``, contrast multiplies by ``U(1 - s, 1 + s)``, saturation scales S in HSV
  by ``U(1 - s, 1 + s)``, hue shifts H by ``U(-s, s)`` turns, each clamped to [0, 1], the four in a
  random order (a permutation per kornia call). Per-image factors.
- Gaussian blur (``gaussian_blur``): one uniform draw per iteration; blur when it exceeds 0.5;
  sigma ``U(0.15, 1.15)`` per kornia call; kernel ``ceil(0.1 x side)`` made odd (51 taps at 512,
  103 at 1024), reflect padding.
- DACS calls the transform once per mixed image (its own jitter order and sigma per image); MIC
  calls it once on the batch of target images (order and sigma shared by the batch).

The operations are kornia's functional ops (``kornia.enhance.adjust_*``,
``kornia.filters.gaussian_blur2d``), whose definitions equal kornia 0.5's; their random
parameters are small CPU tensors drawn from :func:`sample_generator`, a pure function of (seed,
iteration, global sample slot, stream); decisions shared by the batch use slot -1. A resumed run
or a run split over ranks therefore draws the same numbers.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from kornia.enhance import adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation
from kornia.filters import gaussian_blur2d
from torch import Tensor, nn

from domainmerge.data.classes import IGNORE_INDEX, NUM_CLASSES
from domainmerge.data.rcs import rng_for
from domainmerge.runtime.distributed import all_reduce_sum
from domainmerge.tensors import normalize, to_device

# Random streams of the trainer, numbered after the data pipeline's (TrainSet 0, RCS 1).
STREAMS = {name: 100 + i for i, name in enumerate(
    ("classmix", "jitter_mix", "jitter_mic", "mic_mask", "hrda_source", "hrda_mix", "hrda_mic", "dropout",
     "drop_source", "drop_mix", "drop_mic"))}
SHARED = -1                    # the slot of draws shared by the whole (global) batch of an iteration
BLUR_SIGMA = (0.15, 1.15)      # dacs_transforms.gaussian_blur
BLUR_SKIP = 0.5                # blur when U(0, 1) > 0.5


def sample_generator(seed: int, iteration: int, slot: int, stream: str, sub: int | None = None) -> torch.Generator:
    """A CPU torch generator that is a pure function of (seed, iteration, slot, stream[, sub])."""
    if sub is None:
        rng = rng_for(seed, iteration, slot, STREAMS[stream])
    else:
        mask = (1 << 64) - 1
        rng = np.random.default_rng([seed & mask, iteration & mask, slot & mask, STREAMS[stream], sub & mask])
    return torch.Generator().manual_seed(int(rng.integers(2**62)))


# -- ClassMix ---------------------------------------------------------------------------------------

def classmix_masks(labels: Tensor, generators: Sequence[torch.Generator], num_classes: int = NUM_CLASSES,
                   ignore_index: int = IGNORE_INDEX) -> Tensor:
    """ClassMix masks [B, H, W] (bool) of source label maps ``labels`` [B, H, W] (any device).

    The classes are the values present in the global batch (0..num_classes-1 and the ignore
    label; other values count as the ignore label); image b takes ``ceil(n / 2)`` of the ``n``
    present ones, a uniform random subset from ``generators[b]``. No host synchronisation: the
    presence vector, the subset and the mask are computed on the labels' device.
    """
    slots = num_classes + 1                         # class values, then the ignore label
    idx = torch.where((labels >= 0) & (labels < num_classes), labels, num_classes).long()
    present = torch.zeros(slots, device=labels.device).index_fill_(0, idx.flatten(), 1.0)
    present = all_reduce_sum(present) > 0           # union over the ranks' images
    k = (present.sum() + 1) // 2
    scores = to_device(torch.stack([torch.rand(slots, generator=g) for g in generators]), labels.device)
    scores = scores.masked_fill(~present, 2.0)      # absent values sort last
    rank = scores.argsort(dim=1).argsort(dim=1)     # each value's place in the image's random order
    chosen = (rank < k) & present                   # [B, slots]
    return torch.gather(chosen, 1, idx.flatten(1)).view_as(labels)


def mix(mask: Tensor, pasted: Tensor, background: Tensor) -> Tensor:
    """Where ``mask`` ([B, H, W]) is True take ``pasted``, elsewhere ``background`` (any channels)."""
    m = mask if pasted.dim() == mask.dim() else mask.unsqueeze(1)
    return torch.where(m, pasted, background)


# -- colour jitter ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Jitter:
    """Parameters of kornia 0.5's ColorJitter for a batch (CPU tensors): per image an additive
    brightness shift, contrast and saturation factors, a hue shift in radians, and the order of
    the four operations (0 brightness, 1 contrast, 2 saturation, 3 hue)."""

    brightness: Tensor   # [B]
    contrast: Tensor     # [B]
    saturation: Tensor   # [B]
    hue: Tensor          # [B]
    order: Tensor        # [B, 4] int64

    def factors(self) -> Tensor:
        """[B, 4] in operation order (brightness, contrast, saturation, hue)."""
        return torch.stack([self.brightness, self.contrast, self.saturation, self.hue], dim=1)


def draw_jitter(generators: Sequence[torch.Generator], strength: float, order: Tensor | None = None) -> Jitter:
    """kornia 0.5 ``ColorJitter(s, s, s, s)``'s parameters, one image per generator: brightness
    factor ``U(max(0, 1 - s), min(2, 1 + s))`` (applied as factor - 1), contrast and saturation
    ``U(max(0, 1 - s), 1 + s)``, hue ``U(-min(s, 0.5), min(s, 0.5))`` turns; a random order per
    image unless ``order`` (4) is given for the whole batch. Each generator gives 4 uniforms then
    a permutation of 4."""
    s = float(strength)
    lo = torch.tensor([max(0.0, 1 - s), max(0.0, 1 - s), max(0.0, 1 - s), -min(s, 0.5)], dtype=torch.float64)
    hi = torch.tensor([min(2.0, 1 + s), 1 + s, 1 + s, min(s, 0.5)], dtype=torch.float64)
    rows, orders = [], []
    for g in generators:
        rows.append(lo + (hi - lo) * torch.rand(4, generator=g, dtype=torch.float64))
        orders.append(torch.randperm(4, generator=g))
    f = torch.stack(rows).float()
    perm = torch.stack(orders) if order is None else order.view(1, 4).expand(len(rows), 4)
    return Jitter(brightness=f[:, 0] - 1, contrast=f[:, 1], saturation=f[:, 2], hue=f[:, 3] * (2 * math.pi),
                  order=perm.clone())


_JITTER_OPS: tuple[Callable[[Tensor, Tensor], Tensor], ...] = (
    adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def colour_jitter(images: Tensor, params: Jitter) -> Tensor:
    """kornia 0.5 ColorJitter on 0-1 float images [B, 3, H, W] with ``params`` (on the images'
    device). Step k applies each image's k-th operation; when the batch shares an order this is
    one kornia call per step, otherwise one per distinct operation, selected per image."""
    factors = to_device(params.factors().to(images.dtype), images.device)
    out = images
    for k in range(4):
        col = params.order[:, k]
        ops = sorted(set(col.tolist()))
        if len(ops) == 1:
            out = _JITTER_OPS[ops[0]](out, factors[:, ops[0]])
            continue
        new = out
        for op in ops:
            sel = to_device(col == op, images.device).view(-1, 1, 1, 1)
            new = torch.where(sel, _JITTER_OPS[op](out, factors[:, op]), new)
        out = new
    return out


# -- Gaussian blur --------------------------------------------------------------------------------------

def blur_kernel_size(height: int, width: int) -> tuple[int, int]:
    """DACS' kernel: ``ceil(0.1 x side)`` made odd (rounded down), per side: 51 at 512, 103 at 1024."""
    def odd(side: int) -> int:
        c = math.ceil(0.1 * side)
        return int(math.floor(c - 0.5 + c % 2))
    return odd(height), odd(width)


def gaussian_blur(images: Tensor, sigma: Tensor) -> Tensor:
    """kornia ``gaussian_blur2d`` (reflect padding) of [B, C, H, W] with ``sigma`` [B] (CPU) per image."""
    size = blur_kernel_size(images.shape[-2], images.shape[-1])
    # sigma stays on the CPU: kornia checks its sign there and moves it without waiting for the device
    s = sigma.to(images.dtype).view(-1, 1).expand(-1, 2).contiguous()
    return gaussian_blur2d(images, size, s, border_type="reflect")


# -- the strong transform -------------------------------------------------------------------------------

def strong_augment(images: Tensor, *, seed: int, iteration: int, slots: Sequence[int], stream: str,
                   strength: float, jitter_skip: float, blur: bool, per_image: bool) -> Tensor:
    """DACS' ``strong_transform`` of 0-255 images [B, 3, H, W] (uint8 or float, on the training
    device) -> **normalised** float32 images, as the authors' network input.

    Decisions from the shared draw of (seed, iteration, stream): jitter when U > ``jitter_skip``,
    blur (if ``blur``) when U > 0.5. ``per_image``: every image is its own kornia call (DACS'
    mixed images: own jitter order and sigma); otherwise the batch is one call (MIC: shared order
    and sigma). Factors are per image from the slots' generators.
    """
    shared = shared_draws(seed, iteration, stream)
    gens = [sample_generator(seed, iteration, slot, stream) for slot in slots]
    params = draw_jitter(gens, strength, None if per_image else shared.order)
    x = images.float() / 255.0
    if shared.jitter > jitter_skip:
        x = colour_jitter(x, params)
    x = normalize(x * 255.0)
    if blur and shared.blur > BLUR_SKIP:
        lo, hi = BLUR_SIGMA
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in gens]) if per_image \
            else torch.full((len(gens),), shared.sigma_u, dtype=torch.float64)
        x = gaussian_blur(x, (lo + (hi - lo) * u).float())
    return x


@dataclass(frozen=True)
class SharedDraws:
    """The draws of one iteration and stream that the whole global batch shares: DACS' jitter and
    blur decisions (uniforms), and for a one-call batch (MIC) the jitter order and blur sigma's
    uniform."""

    jitter: float
    blur: float
    order: Tensor
    sigma_u: float


def shared_draws(seed: int, iteration: int, stream: str) -> SharedDraws:
    """:class:`SharedDraws` of (seed, iteration, stream), independent of rank and slot."""
    g = sample_generator(seed, iteration, SHARED, stream)
    jitter_u, blur_u = torch.rand(2, generator=g, dtype=torch.float64).tolist()
    order = torch.randperm(4, generator=g)
    return SharedDraws(jitter_u, blur_u, order, float(torch.rand(1, generator=g, dtype=torch.float64)))


# -- stochastic depth ------------------------------------------------------------------------------------

@contextlib.contextmanager
def drop_path_noise(model: nn.Module, seed: int, iteration: int, slots: Sequence[int], stream: str | Sequence[str],
                    calls_per_stream: int = 1) -> Iterator[None]:
    """Within the block, the MiT backbone of ``model`` (if any) draws its stochastic depth from
    (seed, iteration, slot, stream, k) for the k-th backbone call (HRDA calls it for the context
    and the detail views), one row per image, so ranks and resumed runs draw as one process.

    ``stream`` a sequence: the views of several forwards in one (``AdaptConfig.one_pass``), the
    i-th call drawing from ``stream[i // calls_per_stream]`` with k = ``i % calls_per_stream``,
    as each forward's own block would have drawn."""
    from domainmerge.models.mit import MixVisionTransformer

    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, MixVisionTransformer):
        yield
        return
    keys = ((stream, k) for k in itertools.count()) if isinstance(stream, str) else \
        ((s, k) for s in stream for k in range(calls_per_stream))
    blocks = backbone.num_blocks
    device = next(backbone.parameters()).device

    def draw(n: int) -> Tensor:
        name, k = next(keys)
        if n % len(slots):
            raise ValueError(f"stochastic depth: a batch of {n} for {len(slots)} slots")
        per = n // len(slots)   # images of one slot in this call (its crops), slot-major
        rows = [torch.rand(per, blocks, 2, generator=sample_generator(seed, iteration, slot, name, k))
                for slot in slots]
        return to_device(torch.cat(rows), device)

    backbone.path_noise = draw
    try:
        yield
    finally:
        backbone.path_noise = None

"""Strong augmentation for self-training, as small torch functions: ClassMix, colour jitter, blur.

Every random draw comes from :func:`sample_generator`, a pure function of (seed, iteration,
global sample slot, stream): a resumed run or a run split over ranks draws the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from domainmerge.data.rcs import rng_for

# Random streams of the trainer, numbered after the data pipeline's (TrainSet 0, RCS 1).
STREAMS = {name: 100 + i for i, name in enumerate(
    ("classmix", "jitter_mix", "jitter_mic", "mic_mask", "hrda_source", "hrda_mix", "hrda_mic", "dropout"))}


def sample_generator(seed: int, iteration: int, slot: int, stream: str) -> torch.Generator:
    """A CPU torch generator that is a pure function of (seed, iteration, slot, stream)."""
    return torch.Generator().manual_seed(int(rng_for(seed, iteration, slot, STREAMS[stream]).integers(2**62)))


def classmix_mask(labels: torch.Tensor, generator: torch.Generator, ignore_index: int = 255) -> torch.Tensor:
    """ClassMix masks [B, H, W] (bool): per image, the pixels of a random half of its classes.

    For each source label map, ``ceil(n / 2)`` of its ``n`` present classes (ignore excluded) are
    chosen at random; the mask is True where the label is one of them.
    """
    masks = []
    for lab in labels:
        classes = torch.unique(lab)
        classes = classes[classes != ignore_index]
        order = torch.randperm(len(classes), generator=generator)
        chosen = classes[order[: (len(classes) + 1) // 2]]
        masks.append(torch.isin(lab, chosen))
    return torch.stack(masks)


def mix(mask: torch.Tensor, pasted: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Where ``mask`` ([B, H, W]) is True take ``pasted``, elsewhere ``background`` (any channels)."""
    m = mask if pasted.dim() == mask.dim() else mask.unsqueeze(1)
    return torch.where(m, pasted, background)


def colour_jitter(images: torch.Tensor, generator: torch.Generator, strength: float = 0.2,
                  p: float = 0.5) -> torch.Tensor:
    """Random brightness, contrast and saturation on 0-255 float images [B, 3, H, W], per image."""
    b = len(images)
    apply = (torch.rand(b, generator=generator) < p).view(b, 1, 1, 1)

    def factor() -> torch.Tensor:
        return (1 + strength * (2 * torch.rand(b, generator=generator) - 1)).view(b, 1, 1, 1)

    out = images * factor()                                               # brightness
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = mean + (out - mean) * factor()                                  # contrast
    grey = out.mean(dim=1, keepdim=True)
    out = grey + (out - grey) * factor()                                  # saturation
    return torch.where(apply, out.clamp(0, 255), images)


def gaussian_kernel1d(sigma: float, radius: int) -> torch.Tensor:
    """Normalised 1-D Gaussian taps at offsets -radius..radius."""
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def gaussian_blur(images: torch.Tensor, generator: torch.Generator, sigma_range: tuple[float, float] = (0.15, 1.15),
                  p: float = 0.5) -> torch.Tensor:
    """Separable Gaussian blur with a random sigma per image (reflect padding), applied with prob. p."""
    out = []
    for img in images:
        if float(torch.rand(1, generator=generator)) >= p:
            out.append(img)
            continue
        lo, hi = sigma_range
        sigma = lo + (hi - lo) * float(torch.rand(1, generator=generator))
        radius = max(1, int(round(2 * sigma)))
        k = gaussian_kernel1d(sigma, radius)
        c = img.shape[0]
        x = F.pad(img.unsqueeze(0), (radius, radius, radius, radius), mode="reflect")
        x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        x = F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
        out.append(x[0])
    return torch.stack(out)


def strong_transform(image: torch.Tensor, generator: torch.Generator, *, jitter_strength: float, jitter_p: float,
                     blur: bool) -> torch.Tensor:
    """DACS' strong augmentation of one 0-255 float image [3, H, W]: colour jitter, then blur."""
    out = colour_jitter(image[None], generator, strength=jitter_strength, p=jitter_p)
    if blur:
        out = gaussian_blur(out, generator)
    return out[0]

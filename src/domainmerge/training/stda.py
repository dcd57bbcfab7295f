"""Single-target domain adaptation by self-training: DAFormer's recipe at a small scale.

Per iteration: cross-entropy on a labeled source batch; the EMA mean teacher predicts
pseudo-labels on clean target images, each pixel weighted by the share of pixels whose
confidence reaches ``threshold``; ClassMix pastes half of each source image's classes onto a
target image; the mixed image gets colour jitter and Gaussian blur; the student learns the mixed
labels. AdamW with warm-up and poly decay, head at 10x the learning rate; optional rare-class
sampling of source images. Only the student is returned (it is the model that gets merged).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from domainmerge.training.augment import classmix_mask, colour_jitter, gaussian_blur, mix
from domainmerge.training.loop import (
    IGNORE,
    Batches,
    build_optimizer,
    logits_at,
    lr_factor,
    normalise,
    rare_class_weights,
    set_lr,
)


@dataclass
class STDAConfig:
    """Hyper-parameters of one self-training run (defaults tuned for the synthetic world)."""

    iters: int = 300
    batch_size: int = 4            # source images and target images per iteration, each
    lr: float = 6e-4
    head_lr_mult: float = 10.0
    weight_decay: float = 0.01
    warmup: int = 30
    ema_alpha: float = 0.99
    threshold: float = 0.968
    rare_class_sampling: bool = True
    rcs_temperature: float = 0.1
    jitter: float = 0.2
    blur: bool = True


@dataclass
class STDAStats:
    """What a run measured: losses and pseudo-label weights per iteration."""

    source_loss: list[float] = field(default_factory=list)
    target_loss: list[float] = field(default_factory=list)
    pseudo_weight: list[float] = field(default_factory=list)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, alpha: float, it: int) -> None:
    """teacher <- a * teacher + (1 - a) * student over parameters, a = min(1 - 1/(it + 1), alpha).

    The ramp (DAFormer's) makes the teacher follow the student closely in the first iterations.
    """
    a = min(1.0 - 1.0 / (it + 1), alpha)
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(a).add_(s.detach(), alpha=1.0 - a)


@torch.no_grad()
def pseudo_labels(logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Arg-max labels [B, H, W] and the scalar pixel weight: share of pixels with confidence >= threshold."""
    conf, labels = torch.softmax(logits, dim=1).max(dim=1)
    return labels, (conf >= threshold).float().mean()


def train_stda(model: nn.Module, source_images: torch.Tensor, source_labels: torch.Tensor,
               target_images: torch.Tensor, config: STDAConfig, generator: torch.Generator,
               desc: str = "stda") -> STDAStats:
    """Self-train ``model`` (in place) from labeled source images to unlabeled target images.

    Target labels are never seen: the target sampler carries an all-ignore label map.
    """
    from tqdm import tqdm

    teacher = copy.deepcopy(model)
    for p in teacher.parameters():
        p.requires_grad_(False)
    model.train()
    teacher.train()  # batch statistics of the target batch (AdaBN-like) for the pseudo-labels
    opt = build_optimizer(model, config.lr, config.head_lr_mult, config.weight_decay)
    weights = rare_class_weights(source_labels, temperature=config.rcs_temperature) \
        if config.rare_class_sampling else None
    source = Batches(source_images, source_labels, config.batch_size, generator, weights=weights)
    blank = torch.full((1, *target_images.shape[-2:]), IGNORE, dtype=torch.int64).expand(len(target_images), -1, -1)
    target = Batches(target_images, blank, config.batch_size, generator)
    stats = STDAStats()
    for it in tqdm(range(config.iters), desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0):
        set_lr(opt, lr_factor(it, config.iters, config.warmup))
        xs, ys = next(source)
        xt, _ = next(target)
        opt.zero_grad(set_to_none=True)
        loss_s = F.cross_entropy(logits_at(model, normalise(xs)), ys, ignore_index=IGNORE)
        loss_s.backward()

        with torch.no_grad():
            plabels, pweight = pseudo_labels(logits_at(teacher, normalise(xt)), config.threshold)
        mask = classmix_mask(ys, generator)
        mixed = mix(mask, xs.float(), xt.float())
        mixed = colour_jitter(mixed, generator, strength=config.jitter)
        if config.blur:
            mixed = gaussian_blur(mixed, generator)
        mixed_labels = mix(mask, ys, plabels)
        pixel_w = torch.where(mask, torch.ones_like(mask, dtype=torch.float32), pweight)
        ce = F.cross_entropy(logits_at(model, normalise(mixed)), mixed_labels, ignore_index=IGNORE,
                             reduction="none")
        loss_t = (ce * pixel_w).mean()
        loss_t.backward()
        opt.step()
        ema_update(teacher, model, config.ema_alpha, it)

        stats.source_loss.append(float(loss_s.detach()))
        stats.target_loss.append(float(loss_t.detach()))
        stats.pseudo_weight.append(float(pweight))
        if not math.isfinite(stats.source_loss[-1] + stats.target_loss[-1]):
            raise FloatingPointError(f"{desc}: loss became non-finite at iteration {it}")
    return stats

"""Small training utilities shared by pretraining, source-only training and self-training."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from domainmerge.data.classes import IGNORE_INDEX as IGNORE
from domainmerge.data.classes import MEAN, STD


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch generator for data sampling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or 0-255 float) [B, 3, H, W] RGB -> normalised float batch for the network."""
    mean = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (images.float() - mean) / std


def logits_at(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's logits bilinearly resized to the input's height and width."""
    out = model(x)
    if out.shape[-2:] != x.shape[-2:]:
        out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return out


def lr_factor(it: int, total: int, warmup: int, power: float = 1.0) -> float:
    """Linear warm-up over ``warmup`` iterations, then polynomial decay to 0 at ``total``."""
    if warmup > 0 and it < warmup:
        return (it + 1) / warmup
    return max(0.0, 1.0 - (it - warmup) / max(1, total - warmup)) ** power


def build_optimizer(model: nn.Module, lr: float, head_lr_mult: float = 10.0,
                    weight_decay: float = 0.01, head_prefix: str = "decode_head.") -> torch.optim.AdamW:
    """AdamW with the decode head at ``lr * head_lr_mult`` (DAFormer's recipe)."""
    head = [p for n, p in model.named_parameters() if n.startswith(head_prefix)]
    rest = [p for n, p in model.named_parameters() if not n.startswith(head_prefix)]
    groups = [{"params": rest, "lr": lr, "base_lr": lr},
              {"params": head, "lr": lr * head_lr_mult, "base_lr": lr * head_lr_mult}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Scale every parameter group's base learning rate by ``factor``."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


class Batches:
    """Endless random mini-batches from in-memory image/label tensors, with optional weights.

    ``weights`` (one per sample) turns uniform sampling into weighted sampling with replacement
    (rare-class sampling). Random horizontal flips are applied when ``flip``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 generator: torch.Generator, weights: torch.Tensor | None = None, flip: bool = True) -> None:
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.generator, self.weights, self.flip = generator, weights, flip

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.images)
        if self.weights is None:
            idx = torch.randint(n, (self.batch_size,), generator=self.generator)
        else:
            idx = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=self.generator)
        images, labels = self.images[idx], self.labels[idx]
        if self.flip:
            flip = torch.rand(self.batch_size, generator=self.generator) < 0.5
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
            labels = torch.where(flip.view(-1, 1, 1), labels.flip(-1), labels)
        return images, labels


def rare_class_weights(labels: torch.Tensor, num_classes: int = 19, temperature: float = 0.1) -> torch.Tensor:
    """Per-image sampling weights of DAFormer's rare-class sampling.

    A class c is drawn with probability softmax((1 - f_c) / T) over its pixel frequency f_c; then
    an image containing c uniformly. The weight of an image is the resulting marginal probability.
    """
    flat = labels.reshape(len(labels), -1)
    present = torch.stack([(flat == c).any(1) for c in range(num_classes)], 1).float()    # [N, C]
    counts = torch.stack([(flat == c).sum() for c in range(num_classes)]).double()
    freq = counts / counts.sum()
    p_class = torch.softmax((1 - freq) / temperature, 0) * (counts > 0)
    p_class = p_class / p_class.sum()
    per_image = present.double() / present.double().sum(0).clamp(min=1)
    return (per_image @ p_class).float()


@dataclass
class TrainConfig:
    """Supervised training (pretraining, source-only): iterations, batch and optimiser."""

    iters: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    head_lr_mult: float = 10.0
    weight_decay: float = 0.01
    warmup: int = 30


def train_supervised(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, config: TrainConfig,
                     generator: torch.Generator, desc: str = "train") -> list[float]:
    """Cross-entropy training on labeled images; returns the loss per iteration."""
    from tqdm import tqdm

    model.train()
    opt = build_optimizer(model, config.lr, config.head_lr_mult, config.weight_decay)
    batches = Batches(images, labels, config.batch_size, generator)
    losses = []
    for it in tqdm(range(config.iters), desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0):
        set_lr(opt, lr_factor(it, config.iters, config.warmup))
        x, y = next(batches)
        loss = F.cross_entropy(logits_at(model, normalise(x)), y, ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{desc}: loss became {losses[-1]} at iteration {it}")
    return losses

"""AdamW parameter groups and the learning-rate schedule of DAFormer/HRDA (mmcv semantics).

Groups (mmcv ``DefaultOptimizerConstructor`` with ``paramwise_cfg.custom_keys``): the keys are
tried longest first (alphabetically among equal lengths) and the first that is a substring of
the parameter name applies: ``pos_block`` and ``norm`` drop weight decay, ``head`` multiplies
the learning rate by 10. Schedule (mmcv ``PolyLrUpdaterHook`` with linear warm-up): the regular
rate ``base * (1 - it / iters) ** power``; during the first ``warmup`` iterations it is scaled
by ``1 - (1 - it / warmup) * (1 - warmup_ratio)``.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from domainmerge.training.recipe import Recipe


def group_of(name: str, recipe: Recipe) -> tuple[float, float]:
    """(lr multiplier, weight-decay multiplier) of the parameter ``name``."""
    keys = {"head": (recipe.head_lr_mult, 1.0), **{k: (1.0, 0.0) for k in recipe.no_decay_keys}}
    for key in sorted(sorted(keys), key=len, reverse=True):
        if key in name:
            return keys[key]
    return 1.0, 1.0


def param_groups(model: nn.Module, recipe: Recipe) -> list[dict[str, object]]:
    """One AdamW group per (lr, weight decay) pair, each with ``initial_lr`` for the schedule."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(group_of(name, recipe), []).append(p)
    return [{"params": ps, "lr": recipe.lr * lr_mult, "initial_lr": recipe.lr * lr_mult,
             "weight_decay": recipe.weight_decay * decay_mult} for (lr_mult, decay_mult), ps in groups.items()]


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` with the recipe's betas.

    On CUDA the fused implementation (one kernel per group and dtype instead of several per
    parameter; the same update up to float rounding); on CPU torch's default per-parameter loop,
    whose results the CPU tests and resumed runs compare bit for bit."""
    groups = param_groups(model, recipe)
    on_cuda = all(p.is_cuda for g in groups for p in cast(list[nn.Parameter], g["params"]))
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay,
                             fused=True if on_cuda and groups else None)


def lr_factor(it: int, recipe: Recipe) -> float:
    """The factor on each group's initial rate at iteration ``it`` (0-based)."""
    factor = (1.0 - it / recipe.iters) ** recipe.power
    if it < recipe.warmup_iters:
        factor *= 1.0 - (1.0 - it / recipe.warmup_iters) * (1.0 - recipe.warmup_ratio)
    return factor


def set_lr(optimizer: torch.optim.Optimizer, it: int, recipe: Recipe) -> float:
    """Apply the schedule at ``it``; returns the base group's rate (for the log)."""
    factor = lr_factor(it, recipe)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    return recipe.lr * factor

"""Named architectures and ``build_model(arch, num_classes=19, **config)``."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from domainmerge.errors import UserError
from domainmerge.models.mit import MIT_SIZES, MiTConfig
from domainmerge.models.resnet import STAGE_BLOCKS, ResNetConfig
from domainmerge.models.spec import HRDAConfig, ModelSpec

# Tiny configurations of the same classes, for tests and the CPU demo (64x128 inputs).
TINY_RESNET = ResNetConfig(stage_blocks=(1, 1, 1, 1), stem_channels=16, base_channels=8)
TINY_MIT = MiTConfig(embed_dims=(16, 32, 80, 128), depths=(1, 1, 1, 1))
TINY_HEAD: dict[str, Any] = {"head_embed_dims": 32, "head_channels": 32}
TINY_HRDA = HRDAConfig(attention_embed_dims=16, hr_crop_size=(32, 64))


def _registry() -> dict[str, ModelSpec]:
    specs: dict[str, ModelSpec] = {}
    for size, cfg in MIT_SIZES.items():
        specs[f"daformer_mit{size}"] = ModelSpec(cfg)
        specs[f"hrda_mit{size}"] = ModelSpec(cfg, hrda=HRDAConfig())
    for depth, blocks in STAGE_BLOCKS.items():
        r = ResNetConfig(blocks)
        specs[f"daformer_r{depth}"] = ModelSpec(r)
        specs[f"hrda_r{depth}"] = ModelSpec(r, hrda=HRDAConfig())
        specs[f"deeplabv2_r{depth}"] = ModelSpec(r, head="dlv2")
        specs[f"hrda_deeplabv2_r{depth}"] = ModelSpec(r, head="dlv2", hrda=HRDAConfig())
    specs["tiny_daformer_r"] = ModelSpec(TINY_RESNET, **TINY_HEAD)
    specs["tiny_daformer_mit"] = ModelSpec(TINY_MIT, **TINY_HEAD)
    specs["tiny_hrda_r"] = ModelSpec(TINY_RESNET, hrda=TINY_HRDA, **TINY_HEAD)
    specs["tiny_hrda_mit"] = ModelSpec(TINY_MIT, hrda=TINY_HRDA, **TINY_HEAD)
    specs["tiny_deeplabv2_r"] = ModelSpec(TINY_RESNET, head="dlv2")
    return {name: dataclasses.replace(spec, arch=name) for name, spec in specs.items()}


ARCHS: dict[str, ModelSpec] = _registry()


def _fields(cls: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def get_spec(arch: str, num_classes: int = 19, **config: Any) -> ModelSpec:
    """The named spec with ``num_classes`` and overrides applied. ``config`` keys may be any
    field of ModelSpec (head_embed_dims, head_channels, fusion, dropout), of the backbone
    config (MiT: embed_dims, depths, ...; ResNet: stage_blocks, stem_channels, base_channels)
    or of HRDAConfig (hr_crop_size, lr_scale, hr_overlap, attention_embed_dims)."""
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r}; choose one of {', '.join(sorted(ARCHS))} or 'auto'")
    spec = dataclasses.replace(ARCHS[arch], num_classes=num_classes)
    top = {k: v for k, v in config.items() if k in _fields(ModelSpec) - {"backbone", "hrda", "arch"}}
    bb: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items()
                          if k in _fields(type(spec.backbone))}
    hr: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items()
                          if k in _fields(HRDAConfig)}
    unknown = set(config) - set(top) - set(bb) - set(hr)
    if hr and spec.hrda is None:
        unknown |= set(hr)
    if unknown:
        raise UserError(f"architecture {arch!r}: unknown option(s) {sorted(unknown)}")
    backbone: Any = spec.backbone
    spec = dataclasses.replace(spec, backbone=dataclasses.replace(backbone, **bb), **top)
    if hr and spec.hrda is not None:
        spec = dataclasses.replace(spec, hrda=dataclasses.replace(spec.hrda, **hr))
    return spec


def build_model(arch: str, num_classes: int = 19, **config: Any) -> nn.Module:
    """A freshly initialised network by name.

    Args:
        arch: a name of ``ARCHS``: ``daformer_mitb5``, ``hrda_r101``, ... and the tiny ones the
            tests and the demo use (``tiny_daformer_r``, ``tiny_hrda_r``, ...).
        num_classes: classes of the segmentation head (19: the Cityscapes train classes).
        config: options of the spec (see :func:`get_spec`), e.g. ``hr_crop_size`` for HRDA.

    Returns:
        The network (``nn.Module``); ``forward`` maps a normalised batch [B, 3, H, W] to logits
        [B, num_classes, h, w].

    Example:
        >>> import torch
        >>> from domainmerge import build_model
        >>> net = build_model("tiny_daformer_r").eval()
        >>> net(torch.zeros(1, 3, 32, 64)).shape[:2]
        torch.Size([1, 19])
    """
    return get_spec(arch, num_classes, **config).build()

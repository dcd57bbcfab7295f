"""ModelSpec: everything needed to build a network whose state_dict matches a checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from domainmerge.models.heads import DAFormerHead, DLV2Head
from domainmerge.models.hrda import HRDAEncoderDecoder, HRDAHead
from domainmerge.models.mit import MIT_SIZES, MiTConfig, MixVisionTransformer
from domainmerge.models.resnet import STAGE_BLOCKS, ResNetConfig
from domainmerge.models.segmentor import EncoderDecoder

HEADS = ("daformer", "dlv2")


@dataclass(frozen=True)
class HRDAConfig:
    """HRDA wrapper settings. Only the attention head's width and class count are stored in a
    checkpoint; the crop geometry is HRDA's default (context at half resolution, 512x512
    detail crops with half-crop stride) unless overridden."""

    attention_embed_dims: int = 256
    attention_classes: int | None = None  # None: one attention channel per class
    lr_scale: float = 0.5
    hr_crop_size: tuple[int, int] = (512, 512)
    hr_overlap: bool = True


@dataclass(frozen=True)
class ModelSpec:
    """A backbone (MiT or ResNetV1c), a decode head ('daformer' or 'dlv2'), optional HRDA."""

    backbone: MiTConfig | ResNetConfig
    head: str = "daformer"
    num_classes: int = 19
    head_embed_dims: int = 256
    head_channels: int = 256
    fusion: str = "aspp"  # DAFormer head fusion: 'aspp' (separable ASPP) or 'conv' (1x1)
    dropout: float = 0.1
    hrda: HRDAConfig | None = None
    arch: str = "custom"

    def _head(self, in_channels: list[int], num_classes: int, *, embed: int, channels: int,
              fusion: str) -> nn.Module:
        if self.head == "daformer":
            return DAFormerHead(in_channels, num_classes, embed_dims=embed, channels=channels, fusion=fusion,
                                dropout=self.dropout)
        if self.head == "dlv2":
            return DLV2Head(in_channels[-1], num_classes)
        raise ValueError(f"unknown head {self.head!r}; use one of {HEADS}")

    def build(self) -> nn.Module:
        """A freshly initialised network for this spec."""
        backbone: nn.Module
        if isinstance(self.backbone, MiTConfig):
            backbone = MixVisionTransformer(self.backbone)
            in_channels = list(self.backbone.embed_dims)
        else:
            backbone = self.backbone.build()
            in_channels = self.backbone.out_channels
        head = self._head(in_channels, self.num_classes, embed=self.head_embed_dims,
                          channels=self.head_channels, fusion=self.fusion)
        if self.hrda is None:
            return EncoderDecoder(backbone, head)
        h = self.hrda
        # HRDA's scale attention is a second head of the same type; a DAFormer-type one has
        # its own width and a single 1x1 ConvModule as fusion.
        attention = self._head(in_channels, h.attention_classes or self.num_classes,
                               embed=h.attention_embed_dims, channels=h.attention_embed_dims, fusion="conv")
        return HRDAEncoderDecoder(backbone, HRDAHead(head, attention), lr_scale=h.lr_scale,
                                  hr_crop_size=h.hr_crop_size, hr_overlap=h.hr_overlap)

    def describe(self) -> str:
        """One line for messages, e.g. 'hrda_mitb5: HRDA + DAFormer head (aspp, 256) on MiT-B5, 19 classes'."""
        if isinstance(self.backbone, MiTConfig):
            size = next((k.upper() for k, v in MIT_SIZES.items() if v == self.backbone), None)
            bb = f"MiT-{size}" if size else f"MiT(dims={list(self.backbone.embed_dims)}, " \
                                            f"depths={list(self.backbone.depths)})"
        else:
            depth = next((d for d, b in STAGE_BLOCKS.items() if b == self.backbone.stage_blocks), None)
            std = self.backbone.stem_channels == 64 and self.backbone.base_channels == 64
            bb = f"ResNetV1c-{depth}" if depth and std else (
                f"ResNetV1c(blocks={list(self.backbone.stage_blocks)}, stem={self.backbone.stem_channels}, "
                f"base={self.backbone.base_channels})")
        head = (f"DAFormer head ({self.fusion}, {self.head_embed_dims}/{self.head_channels})"
                if self.head == "daformer" else "DeepLabV2 head")
        wrap = "HRDA + " if self.hrda else ""
        return f"{self.arch}: {wrap}{head} on {bb}, {self.num_classes} classes"

    def same_network(self, other: ModelSpec) -> bool:
        """True when both specs give identical state_dict layouts (names and runtime options aside)."""
        def strip(s: ModelSpec) -> ModelSpec:
            hrda = None if s.hrda is None else HRDAConfig(s.hrda.attention_embed_dims,
                                                          s.hrda.attention_classes or s.num_classes)
            backbone = s.backbone
            if isinstance(backbone, MiTConfig):   # stochastic depth: a training option, no weights
                backbone = dataclasses.replace(backbone, drop_path_rate=0.0)
            return dataclasses.replace(s, arch="", dropout=0.0, hrda=hrda, backbone=backbone)
        return strip(self) == strip(other)

"""Decode heads with mmseg 0.x key layouts: the DAFormer head and DeepLabV2's ASPP head.

Module and attribute names mirror mmcv/mmseg (``conv``/``bn`` inside a ConvModule,
``depthwise_conv``/``pointwise_conv`` in a separable conv, ``embed_layers``, ``fuse_layer``,
``conv_seg``, ``aspp_modules``) so that ``state_dict()`` keys equal those in DAFormer, HRDA and
MIC checkpoints. Initialisation as mmcv/mmseg: every ConvModule's convolution Kaiming-normal
(``kaiming_init``: fan_out, ReLU gain, bias 0; BatchNorm weight 1, bias 0) and ``conv_seg``
Normal(0, 0.01) with bias 0 (``BaseDecodeHead``'s ``init_cfg``); the embedding Linear layers keep
torch's default, as SegFormer's ``MLP`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConvModule(nn.Module):
    """Conv2d, then optional BatchNorm and ReLU (mmcv ConvModule: keys ``conv.*``, ``bn.*``).

    As in mmcv, the convolution has a bias only when there is no norm layer, and it is
    initialised by :meth:`init_weights` (mmcv's ``ConvModule.init_weights``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, padding: int = 0,
                 dilation: int = 1, groups: int = 1, norm: bool = True, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation,
                              groups=groups, bias=not norm)
        self.bn = nn.BatchNorm2d(out_channels) if norm else None
        self.act = nn.ReLU(inplace=True) if act else None
        self.init_weights()

    def init_weights(self) -> None:
        """mmcv ``kaiming_init(conv, a=0, mode='fan_out', nonlinearity='relu', bias=0)`` (also
        without activation, as mmcv), BatchNorm weight 1 and bias 0."""
        nn.init.kaiming_normal_(self.conv.weight, a=0, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)
        if self.bn is not None:
            nn.init.ones_(self.bn.weight)
            nn.init.zeros_(self.bn.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.act is not None:
            x = self.act(x)
        return x


class SeparableConvModule(nn.Module):
    """Depthwise 3x3 ConvModule then pointwise 1x1 ConvModule, both with BN and ReLU
    (mmcv DepthwiseSeparableConvModule)."""

    def __init__(self, in_channels: int, out_channels: int, *, dilation: int = 1) -> None:
        super().__init__()
        self.depthwise_conv = ConvModule(in_channels, in_channels, 3, padding=dilation, dilation=dilation,
                                         groups=in_channels)
        self.pointwise_conv = ConvModule(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class SepASPPFusion(nn.Module):
    """DAFormer's context-aware fusion: parallel (separable) atrous convs, concatenated, then a
    3x3 bottleneck (DAFormer ``ASPPWrapper`` with ``sep=True, pool=False``)."""

    def __init__(self, in_channels: int, channels: int, dilations: Sequence[int] = (1, 6, 12, 18)) -> None:
        super().__init__()
        # Dilation 1 is a plain 1x1 ConvModule, the others separable 3x3 (mmseg
        # DepthwiseSeparableASPPModule replaces only the dilated branches).
        self.aspp_modules = nn.ModuleList(
            ConvModule(in_channels, channels, 1) if d == 1 else SeparableConvModule(in_channels, channels,
                                                                                    dilation=d)
            for d in dilations)
        self.bottleneck = ConvModule(len(dilations) * channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.bottleneck(torch.cat([m(x) for m in self.aspp_modules], dim=1))


class MLPEmbed(nn.Module):
    """Per-pixel linear embedding of a feature map (SegFormer ``MLP``: key ``proj``)."""

    def __init__(self, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_channels, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        y = self.proj(x.flatten(2).transpose(1, 2))
        # Contiguous NCHW, as the authors' head (permute + contiguous): the transposed view
        # has channels-last strides, which every later conv of the head inherits, and
        # oneDNN's channels-last depthwise convs with dilation 12 and 18 are 4-10x slower
        # on CPU than NCHW (ASPP of a 512x1024 image: 6.2 s instead of 1.4 s on one core).
        return y.transpose(1, 2).reshape(n, -1, h, w).contiguous()


class DAFormerHead(nn.Module):
    """DAFormer decode head: MLP embedding of every backbone stage, upsampled to the first
    stage's size, fused (separable ASPP, or a single 1x1 ConvModule as in HRDA's scale
    attention and DAFormer's conv1 ablation), dropout, then ``conv_seg``.

    Output: logits at the resolution of the first feature map (stride 4 for MiT and ResNet).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, *, embed_dims: int = 256,
                 channels: int = 256, fusion: str = "aspp", dilations: Sequence[int] = (1, 6, 12, 18),
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.embed_layers = nn.ModuleDict({str(i): MLPEmbed(c, embed_dims) for i, c in enumerate(in_channels)})
        fused_in = embed_dims * len(in_channels)
        self.fuse_layer: nn.Module
        if fusion == "aspp":
            self.fuse_layer = SepASPPFusion(fused_in, channels, dilations)
        elif fusion == "conv":
            self.fuse_layer = ConvModule(fused_in, channels, 1)
        else:
            raise ValueError(f"unknown DAFormer fusion {fusion!r}; use 'aspp' or 'conv'")
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.init_weights()

    def init_weights(self) -> None:
        """mmseg ``BaseDecodeHead``'s ``init_cfg``: ``conv_seg`` Normal(0, 0.01), bias 0 (the
        ConvModules initialise themselves)."""
        nn.init.normal_(self.conv_seg.weight, mean=0.0, std=0.01)
        if self.conv_seg.bias is not None:
            nn.init.zeros_(self.conv_seg.bias)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        size = feats[0].shape[2:]
        embedded = []
        for i, f in enumerate(feats):
            e = self.embed_layers[str(i)](f)
            if e.shape[2:] != size:
                e = F.interpolate(e, size=size, mode="bilinear", align_corners=False)
            embedded.append(e)
        x = self.fuse_layer(torch.cat(embedded, dim=1))
        return self.conv_seg(self.dropout(x))


class DLV2Head(nn.Module):
    """DeepLabV2 head: the sum of parallel dilated 3x3 convs (with bias) on the last stage."""

    def __init__(self, in_channels: int, num_classes: int, dilations: Sequence[int] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.aspp_modules = nn.ModuleList(
            ConvModule(in_channels, num_classes, 3, padding=d, dilation=d, norm=False, act=False)
            for d in dilations)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        x = feats[-1]
        out = self.aspp_modules[0](x)
        for m in self.aspp_modules[1:]:
            out = out + m(x)
        return out

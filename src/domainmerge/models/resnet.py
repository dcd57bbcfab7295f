"""ResNetV1c (deep 3x3 stem, bottleneck blocks) with mmseg 0.x key names, dilated for output stride 8.

Keys: ``stem.{0,1,3,4,6,7}.*`` (three conv/BN pairs), ``layer{1..4}.{j}.conv{1,2,3}/bn{1,2,3}``,
``layer{i}.0.downsample.{0,1}``. DeepLab/DAFormer configs use strides (1, 2, 1, 1), dilations
(1, 1, 2, 4) and ``contract_dilation`` (the first block of a dilated stage uses half the dilation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
EXPANSION = 4


class Bottleneck(nn.Module):
    """mmseg 'pytorch'-style bottleneck: the stride and dilation sit in the 3x3 conv."""

    def __init__(self, inplanes: int, planes: int, *, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * EXPANSION, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * EXPANSION)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _stem(stem_channels: int) -> nn.Sequential:
    half = stem_channels // 2
    return nn.Sequential(
        nn.Conv2d(3, half, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
        nn.Conv2d(half, half, 3, padding=1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
        nn.Conv2d(half, stem_channels, 3, padding=1, bias=False), nn.BatchNorm2d(stem_channels),
        nn.ReLU(inplace=True))


class ResNetV1c(nn.Module):
    """ResNetV1c backbone returning the four stage outputs (channels ``base * 2**i * 4``)."""

    def __init__(self, stage_blocks: Sequence[int] = STAGE_BLOCKS[101], *, stem_channels: int = 64,
                 base_channels: int = 64, strides: Sequence[int] = (1, 2, 1, 1),
                 dilations: Sequence[int] = (1, 1, 2, 4), contract_dilation: bool = True) -> None:
        super().__init__()
        self.stage_blocks = tuple(stage_blocks)
        self.stem = _stem(stem_channels)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = stem_channels
        self.out_channels: list[int] = []
        for i, (n, stride, dilation) in enumerate(zip(stage_blocks, strides, dilations)):
            planes = base_channels * 2**i
            downsample = None
            if stride != 1 or inplanes != planes * EXPANSION:
                downsample = nn.Sequential(nn.Conv2d(inplanes, planes * EXPANSION, 1, stride=stride, bias=False),
                                           nn.BatchNorm2d(planes * EXPANSION))
            first_dilation = dilation // 2 if contract_dilation and dilation > 1 else dilation
            blocks = [Bottleneck(inplanes, planes, stride=stride, dilation=first_dilation, downsample=downsample)]
            inplanes = planes * EXPANSION
            blocks += [Bottleneck(inplanes, planes, dilation=dilation) for _ in range(1, n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.out_channels.append(inplanes)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.stem(x))
        outs = []
        for i in range(len(self.stage_blocks)):
            x = getattr(self, f"layer{i + 1}")(x)
            outs.append(x)
        return outs


@dataclass(frozen=True)
class ResNetConfig:
    """What a ResNetV1c checkpoint's shapes determine: blocks per stage and widths."""

    stage_blocks: tuple[int, ...] = STAGE_BLOCKS[101]
    stem_channels: int = 64
    base_channels: int = 64

    def build(self) -> ResNetV1c:
        return ResNetV1c(self.stage_blocks, stem_channels=self.stem_channels, base_channels=self.base_channels)

    @property
    def out_channels(self) -> list[int]:
        return [self.base_channels * 2**i * EXPANSION for i in range(len(self.stage_blocks))]


def resnet_v1c(depth: int) -> ResNetV1c:
    """ResNetV1c-50 or -101 as DeepLab/DAFormer configure it (output stride 8)."""
    if depth not in STAGE_BLOCKS:
        raise ValueError(f"ResNetV1c depth {depth} is not supported; use 50 or 101")
    return ResNetConfig(STAGE_BLOCKS[depth]).build()

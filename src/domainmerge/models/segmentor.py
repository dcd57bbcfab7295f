"""mmseg's EncoderDecoder: a backbone and a decode head (keys ``backbone.*``, ``decode_head.*``)."""

from __future__ import annotations

from torch import Tensor, nn


class EncoderDecoder(nn.Module):
    """Segmentation network ``decode_head(backbone(x))``.

    ``forward`` takes a normalised float batch [B, 3, H, W] and returns logits [B, C, h, w] at
    the head's output stride (4 for the DAFormer head, 8 for DeepLabV2); inference code
    resizes them to the label size.
    """

    def __init__(self, backbone: nn.Module, decode_head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head

    def forward(self, x: Tensor) -> Tensor:
        return self.decode_head(self.backbone(x))

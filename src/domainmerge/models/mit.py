"""Mix Transformer (MiT, SegFormer's encoder) with the key names DAFormer/HRDA checkpoints hold.

Keys: ``patch_embed{1..4}.proj/norm``, ``block{1..4}.{j}.norm1/attn.{q,kv,proj,sr,norm}/norm2/
mlp.{fc1,dwconv.dwconv,fc2}``, ``norm{1..4}``. Stochastic depth as the authors train
(``drop_path_rate`` 0.1, rising linearly over the blocks, timm's ``DropPath`` on both residual
branches); it acts only in training mode. Attention and MLP dropout are 0 in every MiT config.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


def token_grid(x: Tensor, h: int, w: int) -> Tensor:
    """Tokens [N, h*w, C] as the image [N, C, h, w] they are, without a copy: the token order is
    the channels-last (NHWC) layout, so convolutions read them in place (and write channels-last)."""
    return x.reshape(x.shape[0], h, w, x.shape[2]).permute(0, 3, 1, 2)


def grid_tokens(y: Tensor) -> Tensor:
    """An image [N, C, h, w] as tokens [N, h*w, C] (row-major positions); a view of a channels-last one."""
    return y.permute(0, 2, 3, 1).reshape(y.shape[0], -1, y.shape[1])


def channels_last_weight(conv: nn.Conv2d) -> None:
    """Give ``conv``'s weight [O, I, kh, kw] channels-last strides, those of the token grids it
    reads (:func:`token_grid`): no forward converts the weight, and its gradient comes in the
    weight's own layout (DDP's buckets and AdamW see one layout). Set explicitly, since
    ``contiguous(memory_format=...)`` keeps a depthwise [C, 1, 3, 3] weight as it is (its two
    layouts are the same memory and torch counts it as both)."""
    w = conv.weight.detach()
    _, i, kh, kw = w.shape
    laid = torch.empty_strided(w.shape, (kh * kw * i, 1, kw * i, i), dtype=w.dtype, device=w.device)
    conv.weight = nn.Parameter(laid.copy_(w))


class DWConv(nn.Module):
    """Depthwise 3x3 conv over the token grid (key ``dwconv``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        channels_last_weight(self.dwconv)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        return grid_tokens(self.dwconv(token_grid(x, h, w)))


class Mlp(nn.Module):
    """Mix-FFN: fc1, depthwise conv, GELU, fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class Attention(nn.Module):
    """Efficient self-attention: keys/values from a grid reduced by a strided conv ``sr``."""

    def __init__(self, dim: int, num_heads: int, *, sr_ratio: int = 1, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"MiT attention: dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            channels_last_weight(self.sr)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        n, t, c = x.shape
        heads = self.num_heads
        q = self.q(x).reshape(n, t, heads, c // heads).transpose(1, 2)
        src = x
        if self.sr_ratio > 1:
            src = self.norm(grid_tokens(self.sr(token_grid(x, h, w))))
        # unbind, not kv[0] and kv[1]: its backward stacks the two gradients in one kernel, where
        # each select's backward fills a zero tensor, copies into it, and the two are then added
        k, v = self.kv(src).reshape(n, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(n, t, c))


class DropPath(nn.Module):
    """Stochastic depth per sample (timm ``DropPath``): in training mode a residual branch is
    zeroed for a sample when ``floor(1 - p + u) == 0`` (u uniform), kept ones are scaled by
    ``1 / (1 - p)``; identity in eval mode. ``u`` [N] may be given; else torch's generator draws it."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor, u: Tensor | None = None, divisor: Tensor | None = None) -> Tensor:
        """``divisor`` [N] (from :func:`path_divisors`, float32) replaces ``u``: one division."""
        if not self.training:
            return x
        if divisor is not None:   # before reading p: a compiled block then does not guard on it (p = 0: x / 1)
            return x.div(divisor.view(-1, *([1] * (x.dim() - 1))))
        if self.p == 0:
            return x
        keep = 1.0 - self.p
        if u is None:
            u = torch.rand(x.shape[0], device=x.device)
        # the 0/1 mask in float32: keep + u in bfloat16 would round the drop probability
        mask = torch.floor(keep + u.float()).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return x.div(keep) * mask

    def extra_repr(self) -> str:
        return f"p={self.p:.4g}"


def path_divisors(keep: Tensor, u: Tensor) -> Tensor:
    """Per-sample divisors of every block's stochastic depth in one computation: ``keep = 1 - p``
    where :class:`DropPath` keeps the branch (``floor(keep + u) == 1``), infinity where it drops
    it. ``x / divisor`` is ``x / keep * mask`` to the bit (float32 ``x``; a dropped branch gives a
    signed 0 as ``x * 0`` does, forward and backward), in one kernel per branch instead of five.
    Under autocast the bf16 branch comes out in float32 (the residual sum's type), one rounding
    less than the bf16 ``x / keep``.

    ``keep`` [blocks] float32 ``1 - p`` (as DropPath rounds it), ``u`` [N, blocks, 2] uniforms ->
    [N, blocks, 2] on ``u``'s device.
    """
    keep = keep.to(u.device, non_blocking=True).view(1, -1, 1)
    kept = torch.floor(keep + u.float()) > 0
    return torch.where(kept, keep, torch.full_like(keep, math.inf))


class Block(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-6 as in mit_b0..b5) with stochastic depth."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, sr_ratio: int, qkv_bias: bool,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, sr_ratio=sr_ratio, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, h: int, w: int, noise: Tensor | None = None) -> Tensor:
        """``noise``: [N, 2] divisors of the two branches' stochastic depth (:func:`path_divisors`;
        None: torch's generator draws)."""
        x = x + self.drop_path(self.attn(self.norm1(x), h, w), divisor=None if noise is None else noise[:, 0])
        return x + self.drop_path(self.mlp(self.norm2(x), h, w), divisor=None if noise is None else noise[:, 1])


class OverlapPatchEmbed(nn.Module):
    """Strided conv patch embedding with overlapping windows, then LayerNorm (eps 1e-5)."""

    def __init__(self, in_channels: int, dim: int, patch: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=stride, padding=patch // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


@dataclass(frozen=True)
class MiTConfig:
    """Widths and depths of a Mix Transformer; heads are (1, 2, 5, 8) in every SegFormer size."""

    embed_dims: tuple[int, ...] = (64, 128, 320, 512)
    depths: tuple[int, ...] = (3, 6, 40, 3)
    num_heads: tuple[int, ...] = (1, 2, 5, 8)
    mlp_ratios: tuple[int, ...] = (4, 4, 4, 4)
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)
    qkv_bias: bool = True
    drop_path_rate: float = 0.1     # mix_transformer.py's default, which every DAFormer/HRDA/MIC config keeps

    def drop_path_rates(self) -> list[float]:
        """Per block over all stages: ``linspace(0, drop_path_rate, sum(depths))`` as the authors."""
        return torch.linspace(0, self.drop_path_rate, sum(self.depths), device="cpu").tolist()


MIT_SIZES = {
    "b0": MiTConfig(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "b1": MiTConfig(depths=(2, 2, 2, 2)),
    "b2": MiTConfig(depths=(3, 4, 6, 3)),
    "b3": MiTConfig(depths=(3, 4, 18, 3)),
    "b4": MiTConfig(depths=(3, 8, 27, 3)),
    "b5": MiTConfig(depths=(3, 6, 40, 3)),
}


class MixVisionTransformer(nn.Module):
    """MiT encoder returning four feature maps at strides 4, 8, 16, 32.

    ``path_noise``: when set (the trainer sets it around a student forward), a function of the
    batch size returning uniforms [N, blocks, 2] on the input's device for the stochastic depth of
    every block, so that the draws follow the trainer's (seed, iteration, slot) streams; None:
    torch's generator draws them. Unused in eval mode or with ``drop_path_rate`` 0.
    """

    def __init__(self, cfg: MiTConfig = MIT_SIZES["b5"]) -> None:
        super().__init__()
        self.cfg = cfg
        dims = cfg.embed_dims
        self.out_channels = list(dims)
        self.num_blocks = sum(cfg.depths)
        self.path_noise: Callable[[int], Tensor] | None = None
        rates = cfg.drop_path_rates()
        # float32(1 - p) per block for path_divisors, on the CPU (not a buffer: state-dict keys and
        # meta-device builds unchanged); pinned when a CUDA driver is present, so the copy does not wait
        keep = (1.0 - torch.tensor(rates, dtype=torch.float64, device="cpu")).to(torch.float32)
        self.path_keep = keep.pin_memory() if torch.cuda.is_available() else keep
        first = 0
        for i in range(4):
            in_ch = 3 if i == 0 else dims[i - 1]
            patch, stride = (7, 4) if i == 0 else (3, 2)
            self.add_module(f"patch_embed{i + 1}", OverlapPatchEmbed(in_ch, dims[i], patch, stride))
            self.add_module(f"block{i + 1}", nn.ModuleList(
                Block(dims[i], cfg.num_heads[i], cfg.mlp_ratios[i], cfg.sr_ratios[i], cfg.qkv_bias,
                      drop_path=rates[first + j])
                for j in range(cfg.depths[i])))
            first += cfg.depths[i]
            self.add_module(f"norm{i + 1}", nn.LayerNorm(dims[i], eps=1e-6))

    @torch.compiler.disable
    def _path_divisors(self, n: int) -> Tensor | None:
        """The stochastic depth divisors of a training forward of ``n`` images, or None. Never
        compiled: ``path_noise`` is the trainer's Python (seeded generators per iteration), which
        a compiled forward would trace, guard on and recompile at every iteration."""
        if self.training and self.path_noise is not None and self.cfg.drop_path_rate > 0:
            return path_divisors(self.path_keep, self.path_noise(n))
        return None

    def forward(self, x: Tensor) -> list[Tensor]:
        n = x.shape[0]
        noise = self._path_divisors(n)
        outs = []
        k = 0
        for i in range(1, 5):
            x, h, w = getattr(self, f"patch_embed{i}")(x)
            for blk in getattr(self, f"block{i}"):
                x = blk(x, h, w, None if noise is None else noise[:, k])
                k += 1
            x = getattr(self, f"norm{i}")(x)
            x = x.reshape(n, h, w, -1).permute(0, 3, 1, 2).contiguous()
            outs.append(x)
        return outs


def mit(size: str) -> MixVisionTransformer:
    """MiT-B0 ... MiT-B5 by name ('b0' .. 'b5')."""
    if size not in MIT_SIZES:
        raise ValueError(f"unknown MiT size {size!r}; use one of {sorted(MIT_SIZES)}")
    return MixVisionTransformer(MIT_SIZES[size])

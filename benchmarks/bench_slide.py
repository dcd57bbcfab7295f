"""HRDA sliding-window inference: domainmerge's ``predict`` against the authors' test-time
procedure, re-implemented below in plain torch from lhoyer/HRDA and driving the same modules
(same weights), timed in one process, alternating.

The authors' procedure, as read in lhoyer/HRDA (no code copied):
- ``mmseg/models/segmentors/encoder_decoder.py`` ``EncoderDecoder.slide_inference`` with
  ``batched_slide=True``: all windows of the image concatenated into one batch, one
  ``encode_decode``, each window's logits added into the image with ``F.pad``, divided by the
  window count;
- ``mmseg/models/segmentors/hrda_encoder_decoder.py`` ``encode_decode`` (scales [0.5, 1]): the
  context view resized by 0.5 through the backbone once; ``extract_slide_feat``: detail crops
  (``hr_crop_size``, stride half the crop) concatenated into one backbone batch; the fused
  logits resized to the input size;
- ``mmseg/models/decode_heads/hrda_head.py`` ``HRDAHead.forward``: context logits, ``decode_hr``
  (the head on all crops at once, boxes divided by the output stride 4, pasted with ``F.pad``
  and averaged), ``get_scale_attention`` (sigmoid of the attention head on the context
  features), ``(1 - att) * lr_seg`` resized by 2, ``att`` resized by 2, ``att * hr + lr``;
- ``mmseg/models/decode_heads/daformer_head.py`` ``DAFormerHead.forward`` and ``ASPPWrapper``
  (``segformer_head.py`` ``MLP``: flatten, transpose, contiguous, linear; then
  ``permute(0, 2, 1).contiguous()``; bilinear resize to the stride-4 grid; concat; the ASPP
  branches (mmcv ConvModule: conv, BN, ReLU), the 3x3 bottleneck; ``cls_seg``);
- ``mmseg/models/backbones/mix_transformer.py`` ``MixVisionTransformer.forward_features``
  (``Attention`` with an explicit softmax(q k^T * scale) v, ``DWConv`` on a contiguous NCHW
  copy, ``OverlapPatchEmbed``).
Only MiT backbones with the DAFormer head (``hrda_mitb0`` ... ``hrda_mitb5``) are supported.

    python benchmarks/bench_slide.py [--arch hrda_mitb0] [--settings 1024x2048:1024 ...]
        [--stride 512] [--repeats 1] [--threads 1] [--baseline authors|unbatched]

Each setting ``HxW:CROP`` is one random image of HxW, windows of CROP every ``--stride``
(default: 1024x2048 with windows 1024 and 512, the authors' Cityscapes and IDD/ACDC settings,
and 512x1024 with window 1024, i.e. the whole image in one window). Prints one Markdown row per
setting: wall and CPU seconds (median over ``--repeats``; which of the two runs first
alternates from repeat to repeat and from setting to setting), domainmerge / authors, and the
largest difference of the logits. CPU time (``time.process_time``, all threads of this
process) is the fair figure on a shared machine. ``--baseline unbatched`` compares all windows
in one forward with one window per forward instead (domainmerge against itself).

Measured with ``--threads 1`` (defaults otherwise: HRDA MiT-B0, random weights, one repeat) on
the project's 2-core CPU shared with other jobs (load average 3-7), torch 2.13; CPU seconds
domainmerge / authors:

| image | window | windows | before the fix | after the fix |
|--|--:|--:|--:|--:|
| 1024x2048 | 1024 | 3 | 116.5 / 77.4 = 1.50 | 75.6 / 84.0 = 0.90 |
| 1024x2048 | 512 | 8 | 38.5 / 24.6 = 1.56 | 22.8 / 25.9 = 0.88 |
| 512x1024 | 1024 (whole) | 1 | 12.8 / 7.8 = 1.64 | 7.6 / 8.0 = 0.95 |

Logits equal to 7e-8 in every row (the largest logit of these random weights is 0.13: float32
rounding). The fix: the DAFormer head's embeddings were channels-last
views (a transposed linear output), every conv of the head inherited that layout, and oneDNN's
channels-last depthwise convs with dilation 12 and 18 take 4-10x the time of NCHW ones (the
ASPP of a 512x1024 image: 6.2 s instead of 1.4 s); they are now contiguous NCHW as in the
authors' head. It hit every forward of more than one image (with one image the layout
was already NCHW): DAFormer MiT-B0 on a batch of two 512x1024 images took 16.4 CPU seconds
before and 8.8 after. What remains in domainmerge's favour is the backbone's fused attention
(``scaled_dot_product_attention``) and fewer copies. The large row is noisy on this machine:
two more runs of it gave 0.85 (authors first) and 1.10 (domainmerge first, load average 7);
the 512x1024 row, timed three times each, alternating, gave domainmerge 7.5-8.0 s, authors 8.0-8.3 s.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from domainmerge.evaluation.inference import predict
from domainmerge.models import build_model
from domainmerge.models.heads import ConvModule, SepASPPFusion
from domainmerge.models.hrda import HRDAEncoderDecoder
from domainmerge.models.mit import MixVisionTransformer


def _resize(x: Tensor, size: Sequence[int] | None = None, scale: float | None = None) -> Tensor:
    """mmseg.ops.resize as the authors call it: bilinear, align_corners=False."""
    return F.interpolate(x, size=None if size is None else tuple(size), scale_factor=scale, mode="bilinear",
                         align_corners=False)


def _conv_module(m: ConvModule, x: Tensor) -> Tensor:
    """mmcv ConvModule.forward, order (conv, norm, act), ReLU in place."""
    x = m.conv(x)
    if m.bn is not None:
        x = m.bn(x)
    return F.relu(x, inplace=True) if m.act is not None else x


def authors_mit(bb: MixVisionTransformer, x: Tensor) -> list[Tensor]:
    """``MixVisionTransformer.forward_features`` (mix_transformer.py) on our MiT's modules."""
    n = x.shape[0]
    outs = []
    for i in range(1, 5):
        pe = getattr(bb, f"patch_embed{i}")
        y = pe.proj(x)
        h, w = y.shape[2:]
        t = pe.norm(y.flatten(2).transpose(1, 2).contiguous())
        for blk in getattr(bb, f"block{i}"):
            t = t + _authors_attention(blk.attn, blk.norm1(t), h, w)
            t = t + _authors_mlp(blk.mlp, blk.norm2(t), h, w)
        t = getattr(bb, f"norm{i}")(t)
        x = t.reshape(n, h, w, -1).permute(0, 3, 1, 2).contiguous()
        outs.append(x)
    return outs


def _authors_attention(a: nn.Module, x: Tensor, h: int, w: int) -> Tensor:
    """``Attention.forward``: explicit softmax(q k^T / sqrt(d)) v, keys from the reduced grid."""
    n, t, c = x.shape
    heads = a.num_heads
    q = a.q(x).reshape(n, t, heads, c // heads).permute(0, 2, 1, 3).contiguous()
    src = x
    if a.sr_ratio > 1:
        grid = x.permute(0, 2, 1).contiguous().reshape(n, c, h, w)
        src = a.norm(a.sr(grid).reshape(n, c, -1).permute(0, 2, 1).contiguous())
    kv = a.kv(src).reshape(n, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4).contiguous()
    attn = ((q @ kv[0].transpose(-2, -1).contiguous()) * (c // heads) ** -0.5).softmax(dim=-1)
    return a.proj((attn @ kv[1]).transpose(1, 2).contiguous().reshape(n, t, c))


def _authors_mlp(m: nn.Module, x: Tensor, h: int, w: int) -> Tensor:
    """``Mlp.forward`` with ``DWConv.forward`` (depthwise conv on a contiguous NCHW copy)."""
    x = m.fc1(x)
    n, _, c = x.shape
    x = m.dwconv.dwconv(x.transpose(1, 2).contiguous().view(n, c, h, w))
    return m.fc2(m.act(x.flatten(2).transpose(1, 2).contiguous()))


def authors_daformer_head(head: nn.Module, feats: Sequence[Tensor]) -> Tensor:
    """``DAFormerHead.forward`` (daformer_head.py) with ``MLP`` embeddings and ``cls_seg``
    (dropout is the identity at test time)."""
    n = feats[-1].shape[0]
    size = feats[0].shape[2:]
    embedded = []
    for i, f in enumerate(feats):
        e = head.embed_layers[str(i)].proj(f.flatten(2).transpose(1, 2).contiguous())
        e = e.permute(0, 2, 1).contiguous().reshape(n, -1, f.shape[2], f.shape[3])
        embedded.append(_resize(e, size=size) if e.shape[2:] != size else e)
    x = torch.cat(embedded, dim=1)
    fuse = head.fuse_layer
    if isinstance(fuse, SepASPPFusion):   # ASPPWrapper(sep=True, pool=False)
        outs = [_conv_module(m, x) if isinstance(m, ConvModule)
                else _conv_module(m.pointwise_conv, _conv_module(m.depthwise_conv, x)) for m in fuse.aspp_modules]
        x = _conv_module(fuse.bottleneck, torch.cat(outs, dim=1))
    else:                                 # fusion_cfg type 'conv' (the scale attention head)
        x = _conv_module(fuse, x)
    return head.conv_seg(x)


def _grid(height: int, width: int, crop: Sequence[int], stride: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """Window boxes (y1, y2, x1, x2) in the authors' loop order (slide_inference,
    extract_slide_feat): the last window of a row/column moved back to end at the border."""
    rows = max(height - crop[0] + stride[0] - 1, 0) // stride[0] + 1
    cols = max(width - crop[1] + stride[1] - 1, 0) // stride[1] + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride[0] + crop[0], height), min(c * stride[1] + crop[1], width)
            boxes.append((max(y2 - crop[0], 0), y2, max(x2 - crop[1], 0), x2))
    return boxes


def _paste_mean(logits: Tensor, boxes: Sequence[tuple[int, int, int, int]], n: int, height: int,
                width: int) -> Tensor:
    """The authors' accumulation: ``preds += F.pad(crop logits)``, ``count_mat[box] += 1``, divide."""
    preds = logits.new_zeros(n, logits.shape[1], height, width)
    count = logits.new_zeros(n, 1, height, width)
    for i, (y1, y2, x1, x2) in enumerate(boxes):
        preds += F.pad(logits[i * n:(i + 1) * n], (x1, width - x2, y1, height - y2))
        count[:, :, y1:y2, x1:x2] += 1
    return preds / count


def authors_encode_decode(model: HRDAEncoderDecoder, img: Tensor) -> Tensor:
    """``HRDAEncoderDecoder.encode_decode`` with ``HRDAHead.forward`` (hrda_head.py)."""
    n, _, height, width = img.shape
    lr_feats = authors_mit(model.backbone, _resize(img, scale=model.lr_scale))
    crop = model.hr_crop_size
    stride = (crop[0] // 2, crop[1] // 2) if model.hr_overlap else crop
    boxes = _grid(height, width, crop, stride)   # extract_slide_feat
    hr_feats = authors_mit(model.backbone, torch.cat([img[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes]))
    head = model.decode_head
    lr_seg = authors_daformer_head(head.head, lr_feats)
    # decode_hr: boxes on the stride-4 grid (int(v / 4)), the head on all crops at once.
    os_boxes = [(int(y1 / 4), int(y2 / 4), int(x1 / 4), int(x2 / 4)) for y1, y2, x1, x2 in boxes]
    hr_seg = _paste_mean(authors_daformer_head(head.head, hr_feats), os_boxes, n,
                         max(b[1] for b in os_boxes), max(b[3] for b in os_boxes))
    att = torch.sigmoid(authors_daformer_head(head.scale_attention, lr_feats))
    up_lr_seg = _resize((1 - att) * lr_seg, scale=1 / model.lr_scale)
    fused = _resize(att, scale=1 / model.lr_scale) * hr_seg + up_lr_seg
    return _resize(fused, size=img.shape[2:])


@torch.no_grad()
def authors_slide(model: HRDAEncoderDecoder, img: Tensor, crop: int, stride: int) -> Tensor:
    """``EncoderDecoder.slide_inference`` with ``batched_slide=True`` (encoder_decoder.py):
    logits before the softmax (the argmax is the same)."""
    n, _, height, width = img.shape
    boxes = _grid(height, width, (crop, crop), (stride, stride))
    logits = authors_encode_decode(model, torch.cat([img[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes]))
    return _paste_mean(logits, boxes, n, height, width)


def timed(fn: Callable[[], Tensor]) -> tuple[float, float, Tensor]:
    """Wall and CPU seconds (this process, all threads) of one call, and its result."""
    start, start_cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - start, time.process_time() - start_cpu, out


def parse_setting(text: str) -> tuple[int, int, int]:
    """'1024x2048:512' -> (1024, 2048, 512)."""
    size, _, crop = text.partition(":")
    h, _, w = size.partition("x")
    return int(h), int(w), int(crop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="hrda_mitb0")
    parser.add_argument("--settings", nargs="+", type=parse_setting, metavar="HxW:CROP",
                        default=[(1024, 2048, 1024), (1024, 2048, 512), (512, 1024, 1024)])
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--baseline", choices=("authors", "unbatched"), default="authors")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.arch).eval()
    if args.baseline == "authors" and not (isinstance(model, HRDAEncoderDecoder)
                                           and isinstance(model.backbone, MixVisionTransformer)):
        parser.error(f"--arch {args.arch}: the authors' procedure is written for HRDA with a MiT backbone")
    with torch.no_grad():   # first-call overheads, outside every timing
        predict(model, torch.randn(1, 3, 256, 256), "whole")
        if args.baseline == "authors":
            authors_slide(model, torch.randn(1, 3, 256, 256), 256, 256)
    name = "authors' batched slide" if args.baseline == "authors" else "one window per forward"
    print(f"{args.arch}, stride {args.stride}, fp32 on CPU, torch {torch.__version__}, {torch.get_num_threads()} "
          f"thread(s), median of {args.repeats}; wall / CPU seconds")
    print(f"| image | window | windows | domainmerge (s) | {name} (s) | domainmerge / baseline (wall, CPU) "
          "| max abs diff (max abs logit) |")
    print("|--|--:|--:|--:|--:|--:|--:|")
    for i, (height, width, crop) in enumerate(args.settings):
        x = torch.randn(1, 3, height, width)
        window, step = (crop, crop), (args.stride, args.stride)
        ours = partial(predict, model, x, "slide", window, step)
        theirs = (partial(authors_slide, model, x, crop, args.stride) if args.baseline == "authors"
                  else partial(predict, model, x, "slide", window, step, max_batch=1))
        times: dict[str, list[tuple[float, float]]] = {"ours": [], "theirs": []}
        outs: dict[str, Tensor] = {}
        for r in range(args.repeats):
            order = [("ours", ours), ("theirs", theirs)]
            for key, fn in order if (i + r) % 2 == 0 else order[::-1]:
                wall, cpu, outs[key] = timed(fn)
                times[key].append((wall, cpu))
        (w_a, c_a), (w_b, c_b) = ((statistics.median(t[0] for t in times[k]), statistics.median(t[1] for t in times[k]))
                                  for k in ("ours", "theirs"))
        diff = float((outs["ours"] - outs["theirs"]).abs().max())
        scale = float(outs["theirs"].abs().max())
        windows = len(_grid(height, width, window, step))
        print(f"| {height}x{width} | {min(crop, height)}x{min(crop, width)} | {windows} | {w_a:.1f} / {c_a:.1f} "
              f"| {w_b:.1f} / {c_b:.1f} | {w_a / w_b:.2f}, {c_a / c_b:.2f} | {diff:.1e} ({scale:.2f}) |", flush=True)


if __name__ == "__main__":
    main()

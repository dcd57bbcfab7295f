"""Write tests/manifests/<arch>.json: the state_dict key -> shape layout of each architecture,
spelled out from the reference configs and mmseg 0.x / mmcv naming rules (lhoyer/DAFormer,
lhoyer/HRDA, AIR-DISCOVER/Model-Merging-MTDA configs), independently of domainmerge.models.

Run: python tests/manifests/make_manifests.py   (rewrites the JSON files beside this script)

Naming rules used (mmcv/mmseg 0.x):
- ConvModule: ``conv.weight`` (+ ``conv.bias`` only without norm), ``bn.{weight,bias,running_mean,
  running_var,num_batches_tracked}``.
- DepthwiseSeparableConvModule: ``depthwise_conv.<ConvModule>``, ``pointwise_conv.<ConvModule>``.
- ResNetV1c: ``stem.{0,3,6}`` convs, ``stem.{1,4,7}`` BNs; ``layer{i}.{j}.conv{1,2,3}``, ``bn{1,2,3}``;
  ``layer{i}.0.downsample.{0,1}``.
- MiT: ``patch_embed{i}.{proj,norm}``, ``block{i}.{j}.{norm1,attn.q,attn.kv,attn.sr,attn.norm,attn.proj,
  norm2,mlp.fc1,mlp.dwconv.dwconv,mlp.fc2}``, ``norm{i}``.
- DAFormerHead: ``embed_layers.{i}.proj`` (Linear), ``fuse_layer`` (ASPPWrapper:
  ``aspp_modules.{k}``, ``bottleneck``; or one ConvModule), ``conv_seg``.
- DLV2Head: ``aspp_modules.{k}`` ConvModules without norm (conv with bias), no conv_seg.
- HRDAHead: ``head.*`` and ``scale_attention.*``, no own conv_seg.
"""

from __future__ import annotations

import json
from pathlib import Path

Layout = dict[str, list[int]]


def bn(p: str, c: int) -> Layout:
    return {f"{p}weight": [c], f"{p}bias": [c], f"{p}running_mean": [c], f"{p}running_var": [c],
            f"{p}num_batches_tracked": []}


def conv_module(p: str, cin: int, cout: int, k: int, *, norm: bool = True, groups: int = 1) -> Layout:
    out: Layout = {f"{p}conv.weight": [cout, cin // groups, k, k]}
    if norm:
        out.update(bn(f"{p}bn.", cout))
    else:
        out[f"{p}conv.bias"] = [cout]
    return out


def linear(p: str, cin: int, cout: int, bias: bool = True) -> Layout:
    out: Layout = {f"{p}weight": [cout, cin]}
    if bias:
        out[f"{p}bias"] = [cout]
    return out


def layer_norm(p: str, c: int) -> Layout:
    return {f"{p}weight": [c], f"{p}bias": [c]}


def resnet_v1c(p: str, blocks: list[int], stem: int = 64, base: int = 64) -> tuple[Layout, list[int]]:
    out: Layout = {}
    half = stem // 2
    for idx, (cin, cout) in zip((0, 3, 6), ((3, half), (half, half), (half, stem))):
        out[f"{p}stem.{idx}.weight"] = [cout, cin, 3, 3]
        out.update(bn(f"{p}stem.{idx + 1}.", cout))
    inplanes, chans = stem, []
    for i, n in enumerate(blocks):
        planes = base * 2**i
        for j in range(n):
            q = f"{p}layer{i + 1}.{j}."
            out[f"{q}conv1.weight"] = [planes, inplanes, 1, 1]
            out.update(bn(f"{q}bn1.", planes))
            out[f"{q}conv2.weight"] = [planes, planes, 3, 3]
            out.update(bn(f"{q}bn2.", planes))
            out[f"{q}conv3.weight"] = [planes * 4, planes, 1, 1]
            out.update(bn(f"{q}bn3.", planes * 4))
            if j == 0:  # channel change (all stages) or stride 2 (stage 2)
                out[f"{q}downsample.0.weight"] = [planes * 4, inplanes, 1, 1]
                out.update(bn(f"{q}downsample.1.", planes * 4))
            inplanes = planes * 4
        chans.append(inplanes)
    return out, chans


def mit(p: str, dims: list[int], depths: list[int], sr=(8, 4, 2, 1), mlp: int = 4) -> tuple[Layout, list[int]]:
    out: Layout = {}
    for i in range(4):
        cin, k = (3, 7) if i == 0 else (dims[i - 1], 3)
        d = dims[i]
        out[f"{p}patch_embed{i + 1}.proj.weight"] = [d, cin, k, k]
        out[f"{p}patch_embed{i + 1}.proj.bias"] = [d]
        out.update(layer_norm(f"{p}patch_embed{i + 1}.norm.", d))
        for j in range(depths[i]):
            q = f"{p}block{i + 1}.{j}."
            out.update(layer_norm(f"{q}norm1.", d))
            out.update(linear(f"{q}attn.q.", d, d))
            out.update(linear(f"{q}attn.kv.", d, 2 * d))
            out.update(linear(f"{q}attn.proj.", d, d))
            if sr[i] > 1:
                out[f"{q}attn.sr.weight"] = [d, d, sr[i], sr[i]]
                out[f"{q}attn.sr.bias"] = [d]
                out.update(layer_norm(f"{q}attn.norm.", d))
            out.update(layer_norm(f"{q}norm2.", d))
            out.update(linear(f"{q}mlp.fc1.", d, mlp * d))
            out[f"{q}mlp.dwconv.dwconv.weight"] = [mlp * d, 1, 3, 3]
            out[f"{q}mlp.dwconv.dwconv.bias"] = [mlp * d]
            out.update(linear(f"{q}mlp.fc2.", mlp * d, d))
        out.update(layer_norm(f"{p}norm{i + 1}.", d))
    return out, list(dims)


def daformer_head(p: str, in_ch: list[int], classes: int, embed: int = 256, channels: int = 256,
                  fusion: str = "aspp") -> Layout:
    out: Layout = {}
    for i, c in enumerate(in_ch):
        out.update(linear(f"{p}embed_layers.{i}.proj.", c, embed))
    cin = embed * len(in_ch)
    if fusion == "aspp":  # ASPPWrapper(sep=True, dilations=(1, 6, 12, 18), pool=False)
        out.update(conv_module(f"{p}fuse_layer.aspp_modules.0.", cin, channels, 1))
        for k in (1, 2, 3):
            q = f"{p}fuse_layer.aspp_modules.{k}."
            out.update(conv_module(f"{q}depthwise_conv.", cin, cin, 3, groups=cin))
            out.update(conv_module(f"{q}pointwise_conv.", cin, channels, 1))
        out.update(conv_module(f"{p}fuse_layer.bottleneck.", 4 * channels, channels, 3))
    else:  # build_layer(type='conv', kernel_size=1)
        out.update(conv_module(f"{p}fuse_layer.", cin, channels, 1))
    out[f"{p}conv_seg.weight"] = [classes, channels, 1, 1]
    out[f"{p}conv_seg.bias"] = [classes]
    return out


def dlv2_head(p: str, in_ch: list[int], classes: int) -> Layout:
    out: Layout = {}
    for k in range(4):  # dilations (6, 12, 18, 24), all 3x3
        out.update(conv_module(f"{p}aspp_modules.{k}.", in_ch[-1], classes, 3, norm=False))
    return out


def network(backbone: tuple[Layout, list[int]], head: str, hrda: bool, classes: int = 19,
            embed: int = 256, att_embed: int = 256) -> Layout:
    layout, chans = backbone
    out = dict(layout)
    if head == "daformer":
        if hrda:
            out.update(daformer_head("decode_head.head.", chans, classes, embed, embed))
            out.update(daformer_head("decode_head.scale_attention.", chans, classes, att_embed, att_embed, "conv"))
        else:
            out.update(daformer_head("decode_head.", chans, classes, embed, embed))
    else:
        if hrda:
            out.update(dlv2_head("decode_head.head.", chans, classes))
            out.update(dlv2_head("decode_head.scale_attention.", chans, classes))
        else:
            out.update(dlv2_head("decode_head.", chans, classes))
    return out


R101 = [3, 4, 23, 3]
MITB5 = ([64, 128, 320, 512], [3, 6, 40, 3])

MANIFESTS = {
    "daformer_mitb5": lambda: network(mit("backbone.", *MITB5), "daformer", False),
    "hrda_mitb5": lambda: network(mit("backbone.", *MITB5), "daformer", True),
    "daformer_mitb0": lambda: network(mit("backbone.", [32, 64, 160, 256], [2, 2, 2, 2]), "daformer", False),
    "daformer_r101": lambda: network(resnet_v1c("backbone.", R101), "daformer", False),
    "hrda_r101": lambda: network(resnet_v1c("backbone.", R101), "daformer", True),
    "deeplabv2_r101": lambda: network(resnet_v1c("backbone.", R101), "dlv2", False),
    "daformer_r50": lambda: network(resnet_v1c("backbone.", [3, 4, 6, 3]), "daformer", False),
    # Tiny configurations (domainmerge's own, for tests and the demo).
    "tiny_daformer_r": lambda: network(resnet_v1c("backbone.", [1, 1, 1, 1], stem=16, base=8), "daformer", False,
                                       embed=32),
    "tiny_daformer_mit": lambda: network(mit("backbone.", [16, 32, 80, 128], [1, 1, 1, 1]), "daformer", False,
                                         embed=32),
    "tiny_hrda_r": lambda: network(resnet_v1c("backbone.", [1, 1, 1, 1], stem=16, base=8), "daformer", True,
                                   embed=32, att_embed=16),
}


if __name__ == "__main__":
    here = Path(__file__).parent
    for name, make in MANIFESTS.items():
        (here / f"{name}.json").write_text(json.dumps(make(), indent=0) + "\n")
        print(f"wrote {name}.json")

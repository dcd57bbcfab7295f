"""Architecture detection from a checkpoint's keys and shapes, and loading into a network."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from domainmerge.checkpoint import detect_prefixes
from domainmerge.errors import Option, Part, UserError
from domainmerge.models.mit import MiTConfig
from domainmerge.models.registry import ARCHS, get_spec
from domainmerge.models.resnet import ResNetConfig
from domainmerge.models.spec import HRDAConfig, ModelSpec


def _count(keys: set[str], pattern: str) -> int:
    """Number of distinct integer indices ``N`` in keys matching ``pattern`` (with ``(\\d+)``)."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := rx.match(k))})


def _summary(sd: Mapping[str, Tensor]) -> str:
    """A short listing of what a state dict holds: top-level prefixes and a few keys."""
    groups = sorted({".".join(k.split(".")[:2]) for k in sd})
    more = f" (+{len(groups) - 8} more)" if len(groups) > 8 else ""
    return f"{len(sd)} tensors under {', '.join(groups[:8])}{more}"


def _mit(sd: Mapping[str, Tensor], keys: set[str]) -> MiTConfig:
    dims, depths, mlp, sr = [], [], [], []
    for i in range(1, 5):
        w = sd.get(f"backbone.patch_embed{i}.proj.weight")
        if w is None:
            raise UserError(f"MiT backbone without backbone.patch_embed{i}.proj.weight; found {_summary(sd)}")
        dims.append(int(w.shape[0]))
        depths.append(_count(keys, rf"backbone\.block{i}\.(\d+)\."))
        mlp.append(int(sd[f"backbone.block{i}.0.mlp.fc1.weight"].shape[0]) // dims[-1])
        srw = sd.get(f"backbone.block{i}.0.attn.sr.weight")
        sr.append(int(srw.shape[-1]) if srw is not None else 1)
    return MiTConfig(embed_dims=tuple(dims), depths=tuple(depths), mlp_ratios=tuple(mlp), sr_ratios=tuple(sr),
                     qkv_bias="backbone.block1.0.attn.q.bias" in keys)


def _resnet(sd: Mapping[str, Tensor], keys: set[str]) -> ResNetConfig:
    blocks = tuple(_count(keys, rf"backbone\.layer{i}\.(\d+)\.") for i in range(1, 5))
    if "backbone.layer1.0.conv1.weight" not in keys or "backbone.stem.6.weight" not in keys:
        raise UserError(f"ResNetV1c backbone without stem.6 / layer1.0.conv1 weights; found {_summary(sd)}")
    if "backbone.layer1.0.conv3.weight" not in keys:
        raise UserError("ResNet with basic blocks (ResNet-18/34) is not supported; only bottleneck ResNetV1c")
    return ResNetConfig(stage_blocks=blocks, stem_channels=int(sd["backbone.stem.6.weight"].shape[0]),
                        base_channels=int(sd["backbone.layer1.0.conv1.weight"].shape[0]))


def _head(sd: Mapping[str, Tensor], keys: set[str], p: str) -> dict[str, Any]:
    """Head type and widths under prefix ``p`` (e.g. 'decode_head.' or 'decode_head.head.')."""
    if f"{p}embed_layers.0.proj.weight" in keys:
        n_embed = _count(keys, rf"{re.escape(p)}embed_layers\.(\d+)\.")
        if n_embed != 4:
            raise UserError(f"DAFormer head with {n_embed} embedding layers under {p}embed_layers; expected 4")
        out: dict[str, Any] = {"head": "daformer", "embed": int(sd[f"{p}embed_layers.0.proj.weight"].shape[0])}
        if f"{p}fuse_layer.aspp_modules.0.conv.weight" in keys:
            n = _count(keys, rf"{re.escape(p)}fuse_layer\.aspp_modules\.(\d+)\.")
            if n != 4:
                raise UserError(f"DAFormer ASPP fusion with {n} branches under {p}fuse_layer;"
                                " expected 4 (dilations 1, 6, 12, 18)")
            out["fusion"] = "aspp"
            out["channels"] = int(sd[f"{p}fuse_layer.bottleneck.conv.weight"].shape[0])
        elif f"{p}fuse_layer.conv.weight" in keys:
            out["fusion"] = "conv"
            out["channels"] = int(sd[f"{p}fuse_layer.conv.weight"].shape[0])
        else:
            raise UserError(f"DAFormer head with an unknown fusion under {p}fuse_layer; found {_summary(sd)}")
        out["classes"] = int(sd[f"{p}conv_seg.weight"].shape[0])
        return out
    if f"{p}aspp_modules.0.conv.weight" in keys and f"{p}aspp_modules.0.conv.bias" in keys:
        return {"head": "dlv2", "classes": int(sd[f"{p}aspp_modules.0.conv.weight"].shape[0])}
    raise UserError(f"no DAFormer or DeepLabV2 decode head under '{p}'; found {_summary(sd)}")


def detect_arch(state_dict: Mapping[str, Tensor]) -> ModelSpec:
    """The ModelSpec a state dict (keys without 'model.'-style prefix) was made from.

    Backbone family, widths and depths, head type and widths, HRDA or not and the class count
    come from the keys and shapes; a layout equal to a named architecture returns that name
    (with its runtime options), any other one 'custom'.
    """
    keys = set(state_dict)
    backbone: MiTConfig | ResNetConfig
    if "backbone.patch_embed1.proj.weight" in keys:
        backbone = _mit(state_dict, keys)
    elif "backbone.stem.0.weight" in keys:
        backbone = _resnet(state_dict, keys)
    else:
        hint: tuple[Part, ...] = ()
        if detect_prefixes(keys):
            hint = ("; the keys carry a prefix: strip it first (e.g. ", Option("prefix", "model."), ")")
        raise UserError(f"unknown backbone (no backbone.patch_embed1.* for MiT or backbone.stem.* for ResNetV1c);"
                        f" found {_summary(state_dict)}", *hint)
    hrda = any(k.startswith("decode_head.head.") for k in keys)
    h = _head(state_dict, keys, "decode_head.head." if hrda else "decode_head.")
    spec = ModelSpec(backbone, head=h["head"], num_classes=h["classes"], head_embed_dims=h.get("embed", 256),
                     head_channels=h.get("channels", 256), fusion=h.get("fusion", "aspp"))
    if hrda:
        if not any(k.startswith("decode_head.scale_attention.") for k in keys):
            raise UserError("HRDA checkpoint without decode_head.scale_attention.* (fixed-attention HRDA is not "
                            "supported)")
        a = _head(state_dict, keys, "decode_head.scale_attention.")
        if a["head"] != h["head"] or (a["head"] == "daformer" and a["fusion"] != "conv"):
            raise UserError(f"HRDA scale attention of an unexpected type ({a}); expected a {h['head']} head"
                            " with 1x1 conv fusion")
        classes = None if a["classes"] == h["classes"] else a["classes"]
        spec = dataclasses.replace(spec, hrda=HRDAConfig(attention_embed_dims=a.get("embed", 256),
                                                         attention_classes=classes))
    for named in ARCHS.values():
        if named.same_network(dataclasses.replace(spec, num_classes=named.num_classes)):
            return dataclasses.replace(named, num_classes=spec.num_classes)
    return spec


def _mismatch(model: nn.Module, sd: Mapping[str, Tensor]) -> str:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(want) - set(sd))
    extra = sorted(set(sd) - set(want))
    shapes = sorted(k for k in set(want) & set(sd) if want[k] != tuple(sd[k].shape))
    parts = []
    for label, names in (("missing", missing), ("unexpected", extra), ("wrong shape", shapes)):
        if names:
            parts.append(f"{len(names)} {label} (e.g. {', '.join(names[:3])})")
    return "; ".join(parts)


def resolve_spec(state_dict: Mapping[str, Tensor], arch: str = "auto", **config: Any) -> ModelSpec:
    """The spec ``model_from_state_dict`` builds: detected (``arch='auto'``) or named, with the
    class count read from the checkpoint and ``config`` overrides (e.g. ``hr_crop_size``)."""
    if arch == "auto":
        spec = detect_arch(state_dict)
        if config:
            if spec.arch not in ARCHS:
                raise UserError(f"options {sorted(config)} need a named architecture; detected {spec.describe()}")
            spec = get_spec(spec.arch, spec.num_classes, **config)
        return spec
    heads = ("decode_head.conv_seg.weight", "decode_head.head.conv_seg.weight",
             "decode_head.aspp_modules.0.conv.weight", "decode_head.head.aspp_modules.0.conv.weight")
    classes = next((int(state_dict[k].shape[0]) for k in heads if k in state_dict), 19)
    return get_spec(arch, classes, **config)


def model_from_state_dict(state_dict: Mapping[str, Tensor], arch: str = "auto", **config: Any) -> nn.Module:
    """A network holding ``state_dict`` (loaded strictly), in eval mode, float32.

    Args:
        state_dict: the network's tensors without wrapper prefix (``strip_model_prefix`` of a
            training checkpoint's keys).
        arch: ``'auto'`` detects the architecture from the keys and shapes (MiT-B0...B5 or
            ResNetV1c backbones, DAFormer / DeepLabV2 heads, HRDA); a name from ``ARCHS`` forces it.
        config: overrides of the spec's options, such as ``hr_crop_size``.

    Returns:
        The network in eval mode with copies of the tensors (training it leaves ``state_dict``
        unchanged). A state dict that does not fit raises a UserError naming what was found.

    Example:
        >>> from domainmerge import build_model, model_from_state_dict
        >>> sd = build_model("tiny_daformer_r").state_dict()
        >>> net = model_from_state_dict(sd)
        >>> sorted(net.state_dict()) == sorted(sd) and not net.training
        True
    """
    spec = resolve_spec(state_dict, arch, **config)
    with torch.device("meta"):
        model = spec.build()
    problem = _mismatch(model, state_dict)
    if problem:
        raise UserError(f"checkpoint does not fit {spec.describe()}: {problem}; found {_summary(state_dict)}",
                        *(() if arch == "auto" else ("; try ", Option("arch", "auto"))))
    # Built on the meta device and filled by assignment (no random initialisation of large
    # nets); the tensors are copies, so training the network never alters the caller's dict.
    model.load_state_dict({k: v.detach().clone() for k, v in state_dict.items()}, strict=True, assign=True)
    return model.float().eval()

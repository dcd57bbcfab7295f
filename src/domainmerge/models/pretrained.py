"""ImageNet backbone weights for ``domainmerge adapt``: the files users have, in their own key names.

- SegFormer's ``mit_b0.pth`` .. ``mit_b5.pth`` (NVlabs/SegFormer, the files DAFormer/HRDA load from
  ``pretrained/``): the names our MiT uses (``patch_embed1.proj``, ``block1.0.attn.q/kv/sr/norm``,
  ``norm1`` ...) plus an ImageNet classifier ``head.*``, ignored.
- Hugging Face ``nvidia/mit-b0`` .. ``mit-b5`` (``model.safetensors`` or ``pytorch_model.bin``):
  ``segformer.encoder.patch_embeddings.{i}.proj/layer_norm``, ``block.{i}.{j}.layer_norm_1/2``,
  ``attention.self.query/key/value/sr/layer_norm``, ``attention.output.dense``,
  ``mlp.dense1/dwconv.dwconv/dense2``, ``layer_norm.{i}`` (the inverse of transformers'
  ``convert_segformer_original_to_pytorch.py``; key and value are fused back into ``kv``);
  ``classifier.*`` ignored.
- open-mmlab ResNetV1c ImageNet checkpoints (``resnet50_v1c``, ``resnet101_v1c``; mmseg's
  ``open-mmlab://resnet101_v1c``): our ResNet names (``stem.*``, ``layer1.*``); ``fc.*`` ignored.
- Any checkpoint holding ``backbone.*`` (an mmseg segmentor, a domainmerge or DAFormer training
  checkpoint: ``model.`` is taken first): its backbone.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
from torch import nn

from domainmerge.errors import UserError
from domainmerge.models.stored import StoredNetwork

_HF_BLOCK = [  # (Hugging Face name inside block.{i}.{j}., ours inside block{i+1}.{j}.)
    ("layer_norm_1.", "norm1."), ("layer_norm_2.", "norm2."),
    ("attention.self.query.", "attn.q."), ("attention.self.sr.", "attn.sr."),
    ("attention.self.layer_norm.", "attn.norm."), ("attention.output.dense.", "attn.proj."),
    ("mlp.dense1.", "mlp.fc1."), ("mlp.dense2.", "mlp.fc2."), ("mlp.dwconv.dwconv.", "mlp.dwconv.dwconv."),
]


def _from_hugging_face(sd: Mapping[str, torch.Tensor], path: os.PathLike[str] | str) -> dict[str, torch.Tensor]:
    """Hugging Face SegFormer encoder names -> ours (``kv`` = cat(key, value) along rows)."""
    out: dict[str, torch.Tensor] = {}
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key.startswith(("classifier.", "decode_head.")):
            continue
        name = key.removeprefix("segformer.").removeprefix("encoder.")
        mapped: str | None = None
        if m := re.fullmatch(r"patch_embeddings\.(\d+)\.(proj|layer_norm)\.(\w+)", name):
            part = "proj" if m[2] == "proj" else "norm"
            mapped = f"patch_embed{int(m[1]) + 1}.{part}.{m[3]}"
        elif m := re.fullmatch(r"layer_norm\.(\d+)\.(\w+)", name):
            mapped = f"norm{int(m[1]) + 1}.{m[2]}"
        elif m := re.fullmatch(r"block\.(\d+)\.(\d+)\.(.+)", name):
            prefix, rest = f"block{int(m[1]) + 1}.{m[2]}.", m[3]
            if kv := re.fullmatch(r"attention\.self\.(key|value)\.(\w+)", rest):
                halves.setdefault(f"{prefix}attn.kv.{kv[2]}", {})[kv[1]] = value
                continue
            for theirs, ours in _HF_BLOCK:
                if rest.startswith(theirs):
                    mapped = prefix + ours + rest[len(theirs):]
                    break
        if mapped is None:
            raise UserError(f"{path}: key {key!r} is not part of a Hugging Face SegFormer (MiT) encoder; "
                            "give nvidia/mit-b* weights, SegFormer's mit_b*.pth or a ResNetV1c checkpoint")
        out[mapped] = value
    for key, parts in halves.items():
        if set(parts) != {"key", "value"}:
            missing = ({"key", "value"} - set(parts)).pop()
            raise UserError(f"{path}: attention {missing} weights missing for {key!r}; the file is incomplete")
        out[key] = torch.cat([parts["key"], parts["value"]], 0)
    return out


def backbone_state_dict(sd: Mapping[str, torch.Tensor], path: os.PathLike[str] | str
                        ) -> tuple[str, dict[str, torch.Tensor]]:
    """(naming found, the backbone's tensors in our key names without ``backbone.``) of the
    network in a pretrained file (:meth:`StoredNetwork.state_dict`: ``model.`` of a training
    checkpoint or ``module.`` of DDP stripped); classifier heads are dropped."""
    keys = list(sd)
    if any(k.startswith(("segformer.encoder.", "encoder.patch_embeddings.")) for k in keys):
        return "Hugging Face SegFormer", _from_hugging_face(sd, path)
    inner = sd
    if any(k.startswith("backbone.") for k in inner):
        return "segmentor checkpoint (backbone.*)", {k[len("backbone."):]: v for k, v in inner.items()
                                                     if k.startswith("backbone.")}
    if "conv1.weight" in inner and "stem.0.weight" not in inner:
        raise UserError(f"{path}: a ResNet with a single 7x7 stem conv (torchvision/ResNetV1b naming 'conv1'); "
                        "DAFormer's ResNet is ResNetV1c: use open-mmlab's resnet50_v1c / resnet101_v1c weights")
    if "patch_embed1.proj.weight" in inner:
        kind, drop = "SegFormer mit_b* (original names)", "head."
    elif "stem.0.weight" in inner:
        kind, drop = "open-mmlab ResNetV1c", "fc."
    else:
        raise UserError(f"{path}: first key {keys[0]!r} is from no known backbone naming; give SegFormer's "
                        "mit_b*.pth, Hugging Face nvidia/mit-b* weights or open-mmlab ResNetV1c weights")
    return kind, {k: v for k, v in inner.items() if not k.startswith(drop)}


def load_pretrained(model: nn.Module, path: str | os.PathLike[str], *, trust_pickle: bool = False) -> str:
    """Copy ImageNet backbone weights from ``path`` into ``model.backbone`` (a network from
    :func:`domainmerge.models.build_model`); returns the naming recognised.

    Every backbone tensor must come from the file with its shape (BatchNorm's
    ``num_batches_tracked``, absent from old checkpoints, may be missing); anything else raises
    UserError naming the file and the first key or shape that differs. The decode head is untouched.
    """
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise UserError(f"{type(model).__name__} has no .backbone to load pretrained weights into")
    # Not closed here: the mapping of a safetensors file lives as long as the tensors viewing it.
    stored = StoredNetwork.open(path, trust_pickle=trust_pickle).state_dict()
    kind, weights = backbone_state_dict(stored, path)
    expected = backbone.state_dict()
    what = f"{type(backbone).__name__} of this architecture"
    for key, value in weights.items():
        if key not in expected:
            raise UserError(f"{path} ({kind}): key {key!r} does not exist in the {what}; the file is for "
                            "another architecture or size")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise UserError(f"{path} ({kind}): {key!r} has shape {tuple(value.shape)} but the {what} needs "
                            f"{tuple(expected[key].shape)}; the file is for another architecture or size")
    for key in expected:
        if key not in weights and not key.endswith("num_batches_tracked"):
            raise UserError(f"{path} ({kind}): key {key!r} of the {what} is missing from the file; the file "
                            "is for another architecture or size")
    with torch.no_grad():
        for key, value in weights.items():
            expected[key].copy_(value)   # state_dict() tensors share storage with the parameters
    return kind

"""Pretrained backbone files in each naming users have, written from our own tiny models with the
reverse mapping spelled out by hand here, then loaded into a fresh model: every tensor arrives."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from domainmerge.errors import UserError
from domainmerge.models import build_model
from domainmerge.models.pretrained import load_pretrained

MIT = {"depths": (2, 1, 1, 1)}      # two blocks in stage 1: block indices other than 0 are exercised


def backbone(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k[len("backbone."):]: v.clone() for k, v in model.state_dict().items() if k.startswith("backbone.")}


def to_hugging_face(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our MiT names -> transformers' SegformerForImageClassification names, one rule per key kind."""
    hf: dict[str, torch.Tensor] = {}
    for key, v in ours.items():
        parts = key.split(".")
        if parts[0].startswith("patch_embed"):
            stage = int(parts[0][-1]) - 1
            sub = {"proj": "proj", "norm": "layer_norm"}[parts[1]]
            hf[f"segformer.encoder.patch_embeddings.{stage}.{sub}.{parts[2]}"] = v
        elif parts[0].startswith("norm"):
            hf[f"segformer.encoder.layer_norm.{int(parts[0][-1]) - 1}.{parts[1]}"] = v
        else:
            stage, j, rest = int(parts[0][-1]) - 1, parts[1], ".".join(parts[2:])
            base = f"segformer.encoder.block.{stage}.{j}."
            if rest.startswith("attn.kv."):
                dim = v.shape[0] // 2
                hf[base + "attention.self.key." + parts[-1]] = v[:dim].clone()
                hf[base + "attention.self.value." + parts[-1]] = v[dim:].clone()
                continue
            names = {"norm1": "layer_norm_1", "norm2": "layer_norm_2", "attn.q": "attention.self.query",
                     "attn.sr": "attention.self.sr", "attn.norm": "attention.self.layer_norm",
                     "attn.proj": "attention.output.dense", "mlp.fc1": "mlp.dense1", "mlp.fc2": "mlp.dense2",
                     "mlp.dwconv.dwconv": "mlp.dwconv.dwconv"}
            module = rest.rsplit(".", 1)[0]
            hf[base + names[module] + "." + parts[-1]] = v
    hf["classifier.weight"] = torch.randn(1000, ours["norm4.weight"].shape[0])
    hf["classifier.bias"] = torch.randn(1000)
    return hf


def assert_backbone_equal(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = backbone(model)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def fresh(arch: str, seed: int, **config: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(arch, **config)


def test_segformer_original_mit_file(tmp_path: Path) -> None:
    source = backbone(fresh("tiny_daformer_mit", 0, **MIT))
    file = {**source, "head.weight": torch.randn(1000, 128), "head.bias": torch.randn(1000)}
    torch.save(file, tmp_path / "mit_b0.pth")
    model = fresh("tiny_daformer_mit", 1, **MIT)
    head_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("decode_head.")}
    assert "original" in load_pretrained(model, tmp_path / "mit_b0.pth")
    assert_backbone_equal(model, source)
    for k, v in model.state_dict().items():
        if k.startswith("decode_head."):
            assert torch.equal(v, head_before[k])
    # the authors' container form {'state_dict': ...} too
    torch.save({"meta": {}, "state_dict": file}, tmp_path / "wrapped.pth")
    model = fresh("tiny_daformer_mit", 2, **MIT)
    load_pretrained(model, tmp_path / "wrapped.pth")
    assert_backbone_equal(model, source)


@pytest.mark.parametrize("suffix", ["safetensors", "bin"])
def test_hugging_face_mit_file(tmp_path: Path, suffix: str) -> None:
    source = backbone(fresh("tiny_daformer_mit", 0, **MIT))
    hf = to_hugging_face(source)
    assert "segformer.encoder.block.0.1.attention.self.value.weight" in hf
    path = tmp_path / f"model.{suffix}"
    if suffix == "safetensors":
        save_file({k: v.contiguous() for k, v in hf.items()}, str(path))
    else:
        torch.save(hf, path)
    model = fresh("tiny_daformer_mit", 3, **MIT)
    assert "Hugging Face" in load_pretrained(model, path)
    assert_backbone_equal(model, source)


def test_open_mmlab_resnet_v1c_file(tmp_path: Path) -> None:
    source = backbone(fresh("tiny_daformer_r", 0))
    file = {k: v for k, v in source.items() if not k.endswith("num_batches_tracked")}   # old checkpoints lack them
    file |= {"fc.weight": torch.randn(1000, 64), "fc.bias": torch.randn(1000)}
    torch.save({"meta": {"epoch": 100}, "state_dict": file}, tmp_path / "resnet_v1c.pth")
    for arch in ("tiny_daformer_r", "tiny_hrda_r"):     # the HRDA wrapper's backbone as well
        model = fresh(arch, 5)
        assert "ResNetV1c" in load_pretrained(model, tmp_path / "resnet_v1c.pth")
        got = backbone(model)
        for k, v in file.items():
            if not k.startswith("fc."):
                assert torch.equal(got[k], v), k


def test_training_checkpoint_backbone(tmp_path: Path) -> None:
    trained = fresh("tiny_daformer_mit", 0, **MIT)
    sd = {f"model.{k}": v for k, v in trained.state_dict().items()}
    sd |= {f"ema_model.{k}": torch.zeros_like(v) for k, v in trained.state_dict().items()}
    torch.save({"meta": {"iter": 10}, "state_dict": sd}, tmp_path / "iter_10.pth")
    model = fresh("tiny_daformer_mit", 1, **MIT)
    load_pretrained(model, tmp_path / "iter_10.pth")
    assert_backbone_equal(model, backbone(trained))


def test_files_for_other_architectures_are_refused(tmp_path: Path) -> None:
    deeper = backbone(fresh("tiny_daformer_mit", 0, **MIT))
    torch.save(deeper, tmp_path / "deeper.pth")
    with pytest.raises(UserError, match=r"deeper\.pth.*'block1\.1\.norm1\.weight' does not exist"):
        load_pretrained(fresh("tiny_daformer_mit", 0), tmp_path / "deeper.pth")
    with pytest.raises(UserError, match=r"'block1\.2\.norm1\.weight' of the MixVisionTransformer .* missing"):
        load_pretrained(fresh("tiny_daformer_mit", 0, depths=(3, 1, 1, 1)), tmp_path / "deeper.pth")
    wider = backbone(fresh("tiny_daformer_mit", 0, embed_dims=(32, 64, 80, 128)))
    torch.save(wider, tmp_path / "wider.pth")
    with pytest.raises(UserError, match=r"'patch_embed1\.proj\.weight' has shape \(32, 3, 7, 7\).*\(16, 3, 7, 7\)"):
        load_pretrained(fresh("tiny_daformer_mit", 0), tmp_path / "wider.pth")
    torch.save(backbone(fresh("tiny_daformer_r", 0)), tmp_path / "resnet.pth")
    with pytest.raises(UserError, match=r"resnet\.pth.*'stem\.0\.weight' does not exist"):
        load_pretrained(fresh("tiny_daformer_mit", 0), tmp_path / "resnet.pth")
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "layer1.0.conv1.weight": torch.zeros(1)},
               tmp_path / "torchvision.pth")
    with pytest.raises(UserError, match="ResNetV1c"):
        load_pretrained(fresh("tiny_daformer_r", 0), tmp_path / "torchvision.pth")
    torch.save({"encoder.layers.0.weight": torch.zeros(1)}, tmp_path / "vit.pth")
    with pytest.raises(UserError, match=r"vit\.pth: first key 'encoder\.layers\.0\.weight'"):
        load_pretrained(fresh("tiny_daformer_r", 0), tmp_path / "vit.pth")
    hf = to_hugging_face(backbone(fresh("tiny_daformer_mit", 0)))
    del hf["segformer.encoder.block.0.0.attention.self.value.bias"]
    save_file({k: v.contiguous() for k, v in hf.items()}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(UserError, match=r"value weights missing for 'block1\.0\.attn\.kv\.bias'"):
        load_pretrained(fresh("tiny_daformer_mit", 0), tmp_path / "partial.safetensors")
    with pytest.raises(UserError, match="no such file"):
        load_pretrained(fresh("tiny_daformer_mit", 0), tmp_path / "absent.pth")


def test_pickled_objects_need_trust(tmp_path: Path) -> None:
    source = backbone(fresh("tiny_daformer_r", 0))
    torch.save({"state_dict": source, "meta": {"config": argparse.Namespace(lr=6e-5)}}, tmp_path / "objects.pth")
    with pytest.raises(UserError, match="trust_pickle=True") as info:   # the keyword, in the library
        load_pretrained(fresh("tiny_daformer_r", 1), tmp_path / "objects.pth")
    assert info.value.for_command().endswith("--trust-pickle")           # the flag, on the command line

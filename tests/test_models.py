"""Networks against their reference layouts (tests/manifests, written from the mmseg/DAFormer/HRDA
source by tests/manifests/make_manifests.py), the parameter counts the issue states, detection and
loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from domainmerge.checkpoint import strip_model_prefix
from domainmerge.errors import UserError
from domainmerge.models import ARCHS, build_model, detect_arch, get_spec, model_from_state_dict

MANIFESTS = Path(__file__).parent / "manifests"
NAMES = sorted(p.stem for p in MANIFESTS.glob("*.json"))
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")

# Parameter counts (no prefix, BN buffers aside) from the issue.
FACTS = {"daformer_mitb5": 85_155_283, "hrda_mitb5": 85_685_990,
         "daformer_r101": 46_952_563, "hrda_r101": 48_204_166}


def manifest(name: str) -> dict[str, list[int]]:
    return json.loads((MANIFESTS / f"{name}.json").read_text())


def meta_state_dict(layout: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """A state dict of the manifest's shapes without allocating memory."""
    return {k: torch.empty(s, device="meta", dtype=torch.int64 if k.endswith("num_batches_tracked") else None)
            for k, s in layout.items()}


def test_manifests_cover_the_main_architectures():
    assert {"daformer_mitb5", "hrda_mitb5", "daformer_r101", "hrda_r101", "deeplabv2_r101",
            "tiny_daformer_r", "tiny_daformer_mit"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_equals_manifest(name):
    with torch.device("meta"):
        model = build_model(name)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == manifest(name)


@pytest.mark.parametrize("name", sorted(FACTS))
def test_parameter_counts_match_the_facts(name):
    with torch.device("meta"):
        model = build_model(name)
    assert sum(p.numel() for p in model.parameters()) == FACTS[name]
    # The manifest (independent of the code) agrees too.
    layout = manifest(name)
    n = 0
    for key, shape in layout.items():
        if not key.endswith(BUFFERS):
            n += int(torch.Size(shape).numel())
    assert n == FACTS[name]


def test_hrda_has_no_wrapper_conv_seg_and_a_19_way_conv_attention():
    layout = manifest("hrda_mitb5")
    assert "decode_head.conv_seg.weight" not in layout
    assert layout["decode_head.scale_attention.conv_seg.weight"] == [19, 256, 1, 1]
    assert layout["decode_head.scale_attention.fuse_layer.conv.weight"] == [256, 1024, 1, 1]
    assert not any(k.startswith("decode_head.scale_attention.fuse_layer.aspp") for k in layout)


@pytest.mark.parametrize("name", NAMES)
def test_detect_arch_on_manifest(name):
    spec = detect_arch(meta_state_dict(manifest(name)))
    assert spec.arch == name
    assert spec.num_classes == 19


def test_detect_arch_reads_class_count_and_custom_widths():
    ref = get_spec("tiny_daformer_r", num_classes=7, stage_blocks=(2, 1, 3, 1), base_channels=4, stem_channels=8,
                   head_embed_dims=24, head_channels=40)
    sd = ref.build().state_dict()
    spec = detect_arch(sd)
    assert spec.arch == "custom"
    assert spec.num_classes == 7
    assert spec.backbone == ref.backbone
    assert (spec.head_embed_dims, spec.head_channels) == (24, 40)
    model_from_state_dict(sd)  # loads strictly

    # HRDA with a single (not class-wise) attention channel and a custom attention width.
    single = get_spec("tiny_hrda_r", attention_classes=1, attention_embed_dims=8)
    spec = detect_arch(single.build().state_dict())
    assert spec.hrda is not None and spec.hrda.attention_classes == 1 and spec.hrda.attention_embed_dims == 8

    mit = get_spec("tiny_daformer_mit", num_classes=5, embed_dims=(8, 16, 40, 64), depths=(2, 1, 1, 2))
    spec = detect_arch(mit.build().state_dict())
    assert spec.backbone.embed_dims == (8, 16, 40, 64) and spec.backbone.depths == (2, 1, 1, 2)
    assert spec.num_classes == 5


def training_checkpoint(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layout DA training writes: the network three times under different prefixes."""
    out = {}
    for prefix in ("model.", "ema_model.", "imnet_model."):
        out.update({prefix + k: v.clone() + (0 if prefix == "model." else 1) * v.is_floating_point()
                    for k, v in sd.items()})
    return out


@pytest.mark.parametrize("arch", ["tiny_daformer_r", "tiny_daformer_mit", "tiny_hrda_r", "tiny_deeplabv2_r"])
def test_strict_load_after_stripping_model_prefix(arch):
    torch.manual_seed(0)
    source = build_model(arch).eval()
    # Non-trivial BN statistics, so a wrong buffer would change the output.
    for m in source.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    ckpt = training_checkpoint(source.state_dict())
    model = model_from_state_dict(strip_model_prefix(ckpt, "auto"))
    assert not model.training
    x = torch.randn(2, 3, 64, 128)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


def test_loaded_network_does_not_alias_the_state_dict():
    sd = build_model("tiny_daformer_r").state_dict()
    before = sd["decode_head.conv_seg.weight"].clone()
    model = model_from_state_dict(sd)
    with torch.no_grad():
        model.decode_head.conv_seg.weight.add_(1.0)
    assert torch.equal(sd["decode_head.conv_seg.weight"], before)
    assert all(p.requires_grad for p in model.parameters())


def test_errors_name_what_was_found():
    sd = build_model("tiny_daformer_r").state_dict()
    with pytest.raises(UserError, match="prefix"):
        detect_arch({"model." + k: v for k, v in sd.items()})
    with pytest.raises(UserError, match="unknown backbone"):
        detect_arch({"foo.bar": torch.zeros(1)})
    extra = dict(sd, **{"decode_head.extra.weight": torch.zeros(3)})
    with pytest.raises(UserError, match="unexpected.*decode_head.extra.weight"):
        model_from_state_dict(extra)
    with pytest.raises(UserError, match="does not fit"):
        model_from_state_dict(sd, arch="tiny_daformer_mit")
    with pytest.raises(UserError, match="unknown architecture"):
        build_model("segformer_b9")
    with pytest.raises(UserError, match="unknown option"):
        build_model("tiny_daformer_r", hr_crop_size=(8, 8))


def test_forward_shapes_and_output_strides():
    x = torch.randn(2, 3, 64, 128)
    for arch in ("tiny_daformer_r", "tiny_daformer_mit", "tiny_hrda_r"):
        assert build_model(arch).eval()(x).shape == (2, 19, 16, 32)
    assert build_model("tiny_deeplabv2_r").eval()(x).shape == (2, 19, 8, 16)
    # ResNet at output stride 8 (DeepLab dilations): strides 4, 8, 8, 8.
    feats = build_model("tiny_daformer_r").backbone(x)
    assert [tuple(f.shape[2:]) for f in feats] == [(16, 32), (8, 16), (8, 16), (8, 16)]
    feats = build_model("tiny_daformer_mit").backbone(x)
    assert [tuple(f.shape[2:]) for f in feats] == [(16, 32), (8, 16), (4, 8), (2, 4)]


def test_hrda_fusion_by_hand():
    """With one detail crop covering the image, HRDA's output is a * detail + (1 - a) * context."""
    torch.manual_seed(1)
    model = build_model("tiny_hrda_r", hr_crop_size=(64, 128)).eval()
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        lr_feats = model.backbone(F.interpolate(x, scale_factor=0.5, mode="bilinear"))
        context = model.decode_head.head(lr_feats)
        att = torch.sigmoid(model.decode_head.scale_attention(lr_feats))
        detail = model.decode_head.head(model.backbone(x))
        size = detail.shape[2:]
        want = (F.interpolate(att, size=size, mode="bilinear") * detail
                + F.interpolate((1 - att) * context, size=size, mode="bilinear"))
        torch.testing.assert_close(model(x), want)


def test_hrda_overlapping_crops_average():
    """Detail logits from overlapping crops equal the per-pixel mean over the crops covering it."""
    torch.manual_seed(2)
    model = build_model("tiny_hrda_r", hr_crop_size=(64, 64)).eval()  # crops at x = 0, 32, 64
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        crops = [model.decode_head.head(model.backbone(x[:, :, :, a:a + 64])) for a in (0, 32, 64)]
        stacked, boxes, crop = model._detail_crops(x)
        got = model._paste(model.decode_head.head(model.backbone(stacked)), 1, boxes, crop)
    assert got.shape == (1, 19, 16, 32)
    torch.testing.assert_close(got[..., :8], crops[0][..., :8])
    torch.testing.assert_close(got[..., 8:16], (crops[0][..., 8:] + crops[1][..., :8]) / 2)
    torch.testing.assert_close(got[..., 16:24], (crops[1][..., 8:] + crops[2][..., :8]) / 2)
    torch.testing.assert_close(got[..., 24:], crops[2][..., 8:])


@pytest.mark.parametrize("arch,train,calls", [("tiny_hrda_mit", True, 1), ("tiny_hrda_r", True, 2),
                                              ("tiny_hrda_r", False, 1)])
def test_hrda_views_of_one_shape_share_a_backbone_call_where_that_computes_the_same(arch, train, calls):
    """HRDA's context view and detail crops (one shape) go through MiT in one call, each view's
    stochastic depth drawn as its own call would draw it (the k-th view from the k-th draw);
    features and input gradients equal those of a call per view (float32 rounding: the same
    products and sums per image in a larger batch). ResNet's training-mode BatchNorm normalises
    over the batch: its views go one call each, as HRDA runs them, to the bit; in eval mode (the
    running statistics) they share a call too."""
    from domainmerge.models.hrda import backbone_views

    torch.manual_seed(0)
    backbone = build_model(arch).backbone.train(train)
    count = []
    backbone.register_forward_hook(lambda *args: count.append(1))
    context, detail = torch.randn(2, 3, 64, 64), torch.randn(4, 3, 64, 64)
    results = []
    for together in (False, True):
        draws = iter(range(100))   # the k-th call's draws from a stream of its own, as the trainer's
        if hasattr(backbone, "path_noise"):
            backbone.path_noise = lambda n, draws=draws: torch.rand(
                n, backbone.num_blocks, 2, generator=torch.Generator().manual_seed(next(draws)))
        views = [context.clone().requires_grad_(), detail.clone().requires_grad_()]
        count.clear()
        feats = backbone_views(backbone, views) if together else [backbone(v) for v in views]
        assert len(count) == (calls if together else 2)
        total = sum((f * torch.linspace(-1, 1, f.numel()).view_as(f)).sum() for view in feats for f in view)
        results.append((feats, torch.autograd.grad(total, views)))
    (sep, sep_grads), (got, got_grads) = results
    exact = calls == 2
    for a, b in zip([f for view in sep for f in view], [f for view in got for f in view]):
        torch.testing.assert_close(b, a, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6)
    for a, b in zip(sep_grads, got_grads):
        torch.testing.assert_close(b, a, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_registry_names_are_buildable_specs(name):
    """Every registry name builds a network (on the meta device: shapes only, no memory) that maps
    a batch to 19-class logits at the head's output stride (DAFormer and HRDA's detail grid: 1/4,
    DeepLabV2: 1/8, as mmseg's heads), whose state dict is recognised as that same name."""
    spec = ARCHS[name]
    assert spec.arch == name and name in spec.describe()
    with torch.device("meta"):
        model = build_model(name).eval()
        out = model(torch.empty(2, 3, 64, 128))
    stride = 8 if "deeplabv2" in name else 4
    assert tuple(out.shape) == (2, 19, 64 // stride, 128 // stride)
    state = model.state_dict()
    assert detect_arch(state).arch == name
    if name in NAMES:   # the layout written from the authors' code
        assert {k: list(v.shape) for k, v in state.items()} == manifest(name)


@pytest.mark.parametrize("name", sorted(n for n in ARCHS if n.startswith("tiny_")))
def test_tiny_networks_run_on_real_tensors(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 128))   # HRDA MiT's context view: 32x64, the least MiT takes
    assert out.shape[:2] == (1, 19) and torch.isfinite(out).all()


def test_daformer_head_embeds_by_hand_and_runs_its_convs_on_nchw_tensors():
    """The embedding is a per-pixel linear map (einsum here), returned as a contiguous NCHW
    tensor as the authors' head makes it (``permute(0, 2, 1).contiguous()``): a transposed view
    has channels-last strides that every conv of the head inherits, and oneDNN's channels-last
    depthwise convs with dilation 12 and 18 are several times slower on CPU."""
    torch.manual_seed(3)
    model = build_model("tiny_daformer_mit").eval()
    x = torch.randn(2, 3, 64, 128)
    seen: list[bool] = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous()))
             for m in model.decode_head.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        feats = model.backbone(x)
        embed = model.decode_head.embed_layers["0"]
        got = embed(feats[0])
        model.decode_head(feats)
    for h in hooks:
        h.remove()
    want = torch.einsum("nchw,oc->nohw", feats[0], embed.proj.weight) + embed.proj.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(got, want)
    assert got.is_contiguous()
    # 1x1 branch, 3 x (depthwise, pointwise), bottleneck, conv_seg.
    assert len(seen) == 9 and all(seen)

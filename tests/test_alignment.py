"""Git Re-Basin weight matching: exact recovery of random permutations, function preservation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from domainmerge.alignment.matching import align_state_dicts, apply_permutation, weight_matching
from domainmerge.alignment.spec import spec_from_state_dict
from domainmerge.errors import UserError

# --- tiny networks in the key layouts users bring -----------------------------------------------


class Bottleneck(nn.Module):
    """mmseg/torchvision bottleneck: conv1..3 + bn1..3, optional downsample (conv, BN)."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class BasicBlock(nn.Module):
    """torchvision basic block: conv1/bn1, conv2/bn2, optional downsample."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNetV1c(nn.Module):
    """mmseg ResNetV1c: deep stem (stem.0..8), bottleneck stages; returns every stage output."""

    def __init__(self, depths: tuple[int, ...] = (2, 1, 2), width: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, 1, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU())
        cin = 2 * width
        for s, depth in enumerate(depths, start=1):
            mid = width * 2 ** (s - 1)
            blocks = [Bottleneck(cin if b == 0 else 4 * mid, mid, 4 * mid, 2 if (b == 0 and s > 1) else 1)
                      for b in range(depth)]
            self.add_module(f"layer{s}", nn.Sequential(*blocks))
            cin = 4 * mid
        self.depths = depths

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = nn.functional.max_pool2d(self.stem(x), 3, 2, 1)
        outs = []
        for s in range(1, len(self.depths) + 1):
            x = getattr(self, f"layer{s}")(x)
            outs.append(x)
        return outs


class Segmentor(nn.Module):
    """Backbone + a head that reads every stage (like DAFormer's), keys backbone.* / decode_head.*."""

    def __init__(self, backbone: ResNetV1c, classes: int = 5) -> None:
        super().__init__()
        self.backbone = backbone
        chans = [4 * backbone.stem[0].out_channels * 2 ** (s - 1) for s in range(1, len(backbone.depths) + 1)]
        self.decode_head = nn.ModuleDict({"fuse": nn.Conv2d(sum(chans), 8, 1), "bn": nn.BatchNorm2d(8),
                                          "conv_seg": nn.Conv2d(8, classes, 1)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)
        size = feats[0].shape[-2:]
        up = [nn.functional.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats]
        h = self.decode_head
        return h["conv_seg"](torch.relu(h["bn"](h["fuse"](torch.cat(up, 1)))))


class TorchvisionResNet(nn.Module):
    """torchvision layout: conv1/bn1, layerS.B (basic blocks), fc classifier."""

    def __init__(self, widths: tuple[int, ...] = (4, 6, 8), classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin = widths[0]
        for s, w in enumerate(widths, start=1):
            blocks = [BasicBlock(cin, w, 1 if s == 1 else 2), BasicBlock(w, w)]
            self.add_module(f"layer{s}", nn.Sequential(*blocks))
            cin = w
        self.fc = nn.Linear(cin, classes)
        self.n = len(widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        for s in range(1, self.n + 1):
            x = getattr(self, f"layer{s}")(x)
        return self.fc(x.mean((2, 3)))


def conv_stack() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 7, 3, padding=1), nn.BatchNorm2d(7), nn.ReLU(),
                         nn.Conv2d(7, 5, 3, padding=1, bias=True), nn.BatchNorm2d(5), nn.ReLU(),
                         nn.Conv2d(5, 2, 1))


def project_model(arch: str) -> nn.Module:
    from domainmerge.models import build_model

    return build_model(arch, num_classes=5)


BUILDERS = {
    "resnetv1c+head": lambda: Segmentor(ResNetV1c()),
    "torchvision-resnet": TorchvisionResNet,
    "conv-stack": conv_stack,
    "tiny_daformer_r": lambda: project_model("tiny_daformer_r"),  # the model package's networks
    "tiny_hrda_r": lambda: project_model("tiny_hrda_r"),
}


def randomised(model: nn.Module, seed: int) -> nn.Module:
    """Random weights AND random BN statistics/affine, so a wrong permutation shows in the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif name.endswith("num_batches_tracked"):
                t.fill_(7)
            elif t.is_floating_point():
                fan_in = t[0].numel() if t.ndim > 1 else 1  # keeps activations O(1) through depth
                t.copy_(torch.randn(t.shape, generator=gen) * fan_in ** -0.5)
    return model.eval()


def outputs(model: nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    model.load_state_dict(state)
    with torch.no_grad():
        return model.eval()(x)


def random_perms(sizes: dict[str, int], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {p: torch.randperm(n, generator=gen) for p, n in sizes.items()}


# --- spec derivation, checked against counts done by hand ------------------------------------------


def test_resnetv1c_spec_keeps_head_inputs_fixed() -> None:
    sd = Segmentor(ResNetV1c(depths=(2, 1, 2))).state_dict()
    spec = spec_from_state_dict(sd)
    assert spec.prefix == "backbone."
    # Stem: three convs, the last feeds layer1 (which opens its own stream): 3 perms.
    # Each bottleneck: conv1 and conv2 outputs (conv3 writes the stage stream, read by the head).
    assert len(spec.sizes) == 3 + 2 * (2 + 1 + 2)
    assert "backbone.stem.0" in spec.sizes and "backbone.layer3.1.conv2" in spec.sizes
    assert not any("stream.layer" in p for p in spec.sizes)
    assert set(spec.fixed) == {"backbone.stream.layer1", "backbone.stream.layer2", "backbone.stream.layer3"}
    assert ("backbone.stem.1.running_var", 0) in spec.axes["backbone.stem.0"]
    assert not any(k.startswith("decode_head.") for pairs in spec.axes.values() for k, _ in pairs)


def test_torchvision_spec_shares_one_permutation_per_stage() -> None:
    spec = spec_from_state_dict(TorchvisionResNet().state_dict())
    # layer1 has no downsample (4 -> 4 channels), so it shares the stem's stream; fc reads the last one.
    streams = {p for p in spec.sizes if p.startswith("stream.")}
    assert streams == {"stream.stem", "stream.layer2", "stream.layer3"}
    assert ("fc.weight", 1) in spec.axes["stream.layer3"]
    assert ("layer1.1.bn2.running_mean", 0) in spec.axes["stream.stem"]
    assert ("layer2.0.downsample.0.weight", 1) in spec.axes["stream.stem"]
    assert len(spec.sizes) == 3 + 6  # streams + conv1 of each of six basic blocks


def test_prefix_auto_detection_prefers_the_student() -> None:
    sd = Segmentor(ResNetV1c(depths=(1, 1))).state_dict()
    both = {f"{p}{k}": v for p in ("ema_model.", "model.") for k, v in sd.items()}
    assert spec_from_state_dict(both).prefix == "model.backbone."


def test_plain_stack_under_a_prefix_with_a_head() -> None:
    stack = conv_stack()
    sd = {f"backbone.{k}": v for k, v in stack.state_dict().items()}
    sd["decode_head.conv_seg.weight"] = torch.zeros(3, 2, 1, 1)
    for prefix in (None, "backbone", "backbone."):
        spec = spec_from_state_dict(sd, prefix)
        assert spec.prefix == "backbone." and spec.family == "conv-stack"
        # Three hidden layers permuted (with their BN), the last conv (read by the head) fixed.
        assert sorted(spec.sizes) == ["backbone.0", "backbone.3", "backbone.6"]
        assert ("backbone.7.running_mean", 0) in spec.axes["backbone.6"]
        assert ("backbone.9.weight", 1) in spec.axes["backbone.6"]


def test_unknown_tensor_in_backbone_is_refused() -> None:
    sd = dict(TorchvisionResNet().state_dict())
    sd["layer1.0.conv2.conv_offset.weight"] = torch.zeros(18, 4, 3, 3)
    with pytest.raises(UserError, match="conv_offset"):
        spec_from_state_dict(sd)


# --- matching ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_random_permutation_is_recovered_exactly(arch: str) -> None:
    model = randomised(BUILDERS[arch](), seed=1)
    a = model.state_dict()
    spec = spec_from_state_dict(a)
    pi = random_perms(spec.sizes, seed=2)
    b = apply_permutation(a, spec, pi)
    aligned, report = align_state_dicts(a, b, seed=3)
    for key in a:
        torch.testing.assert_close(aligned[key], a[key], rtol=0, atol=0)
    # Unit i of B is unit pi[i] of A, so the permutation taking B back to A is argsort(pi).
    found, _ = weight_matching(a, b, spec, seed=4)
    for p, perm in pi.items():
        np.testing.assert_array_equal(found[p].numpy(), np.argsort(perm.numpy()))
    expected = {p: float(np.mean(np.argsort(v.numpy()) == np.arange(len(v)))) for p, v in pi.items()}
    assert report.identity == pytest.approx(expected)


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_permuted_and_aligned_models_compute_the_same_function(arch: str) -> None:
    model = randomised(BUILDERS[arch](), seed=5)
    a = dict(model.state_dict())
    b = dict(randomised(BUILDERS[arch](), seed=6).state_dict())  # an unrelated net: a real, non-trivial match
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    spec = spec_from_state_dict(a)
    permuted = apply_permutation(b, spec, random_perms(spec.sizes, seed=8))
    aligned, report = align_state_dicts(a, b, seed=9)
    assert report.overall < 0.9  # independent nets: most units move
    want = outputs(model, b, x)
    torch.testing.assert_close(outputs(model, permuted, x), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outputs(model, aligned, x), want, rtol=1e-4, atol=1e-5)
    # And alignment really moved B towards A: the summed inner product of spec tensors grew.
    keys = {k for pairs in spec.axes.values() for k, _ in pairs if not k.endswith(("_mean", "_var"))}
    assert sum(float((a[k] * aligned[k]).sum()) for k in keys) > sum(float((a[k] * b[k]).sum()) for k in keys)


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_two_copies_map_to_identity(arch: str) -> None:
    a = randomised(BUILDERS[arch](), seed=10).state_dict()
    b = {k: v.clone() for k, v in a.items()}
    aligned, report = align_state_dicts(a, b, seed=11)
    assert all(f == 1.0 for f in report.identity.values()) and report.overall == 1.0
    assert all(torch.equal(aligned[k], a[k]) for k in a)


def test_mismatched_architectures_are_refused() -> None:
    a = TorchvisionResNet(widths=(4, 6, 8)).state_dict()
    b = TorchvisionResNet(widths=(4, 6, 10)).state_dict()
    with pytest.raises(UserError, match="shape"):
        align_state_dicts(a, b)


# --- command line -------------------------------------------------------------------------------------


def test_align_command_writes_b_permuted_onto_a(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    from domainmerge.cli import main

    net = randomised(Segmentor(ResNetV1c(depths=(1, 1))), seed=12)
    a = {f"model.{k}": v for k, v in net.state_dict().items()}  # DA-training layout, mmseg container
    spec = spec_from_state_dict(a)
    b = apply_permutation(a, spec, random_perms(spec.sizes, seed=13))
    torch.save({"meta": {"iter": 1}, "state_dict": a}, tmp_path / "a.pth")
    torch.save({"meta": {"iter": 2}, "state_dict": b}, tmp_path / "b.pth")
    out, report = tmp_path / "b_aligned.pth", tmp_path / "report.json"
    assert main(["align", str(tmp_path / "a.pth"), str(tmp_path / "b.pth"), "-o", str(out),
                 "--json", str(report)]) == 0
    saved = torch.load(out, weights_only=True)
    assert saved["meta"]["iter"] == 2  # B's container kept
    for key in a:
        torch.testing.assert_close(saved["state_dict"][key], a[key], rtol=0, atol=0)
    data = json.loads(report.read_text())
    assert data["prefix"] == "model.backbone." and len(data["permutations"]) == len(spec.sizes)
    assert "| permutation" in capsys.readouterr().out
    # Existing output without --force is a user error (exit 2), not a traceback.
    assert main(["align", str(tmp_path / "a.pth"), str(tmp_path / "b.pth"), "-o", str(out)]) == 2

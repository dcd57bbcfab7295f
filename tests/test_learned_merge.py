"""Data-using merges (Fisher merging, AdaMerging) on a tiny network and random images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from domainmerge.merging import merge_state_dicts
from domainmerge.merging.learned import adamerging, fisher_diagonal, fisher_merge, mean_entropy
from domainmerge.models import build_model


def _models(n: int = 2, scale: float = 0.05):
    torch.manual_seed(0)
    net = build_model("tiny_daformer_r", num_classes=19)
    base = {k: v.clone() for k, v in net.state_dict().items()}
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        sd = {k: (v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() and "running" not in k
                  else v.clone()) for k, v in base.items()}
        sd = {k: (v.abs() + 0.5 if k.endswith("running_var") else v) for k, v in sd.items()}
        out.append(sd)
    return net, base, out


def _images(seed: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 64, generator=torch.Generator().manual_seed(seed))


def test_fisher_diagonal_matches_per_image_autograd() -> None:
    net, _, (sd, _) = _models()
    images = _images(1, 3)
    fisher = fisher_diagonal(net, sd, [images[:2], images[2:]])
    # by hand: one backward per image, squared gradients averaged
    net.load_state_dict(sd)
    net.eval()
    acc = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    for x in images:
        net.zero_grad()
        logits = F.interpolate(net(x[None]), size=x.shape[-2:], mode="bilinear", align_corners=False)
        F.cross_entropy(logits, logits.argmax(1)).backward()
        for n, p in net.named_parameters():
            acc[n] += p.grad ** 2
    for n in acc:
        torch.testing.assert_close(fisher[n], acc[n] / 3, rtol=1e-4, atol=1e-12)


def test_fisher_merge_equal_fishers_is_linear() -> None:
    _, _, sds = _models()
    ones = {k: torch.ones_like(v) for k, v in sds[0].items() if k.endswith("weight") and "bn" not in k}
    merged = fisher_merge(sds, [ones, ones], weights=[1, 3])
    linear = merge_state_dicts(sds, weights=[1, 3])
    for k in linear:
        torch.testing.assert_close(merged[k], linear[k])


def test_fisher_merge_hand_made() -> None:
    a = {"w": torch.tensor([1.0, 2.0, 3.0])}
    b = {"w": torch.tensor([3.0, 6.0, 9.0])}
    fa = {"w": torch.tensor([1.0, 3.0, 0.0])}
    fb = {"w": torch.tensor([1.0, 1.0, 2.0])}
    out = fisher_merge([a, b], [fa, fb], floor=0.0)
    # entry 0: equal Fisher -> 2; entry 1: (3*2 + 1*6)/4 = 3; entry 2: only b counts -> 9
    expected = np.array([2.0, 3.0, 9.0])
    np.testing.assert_allclose(out["w"].numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("granularity", ["model", "layer"])
def test_adamerging_lowers_entropy_on_its_images(granularity: str) -> None:
    net, base, sds = _models(scale=0.2)
    targets = [[_images(10, 1)], [_images(11, 1)]]
    result = adamerging(net, sds, base, targets, granularity=granularity, steps=6, lr=0.05)

    def entropy(sd) -> float:     # measured independently: plain forward with the weights loaded
        net.load_state_dict(sd)
        net.eval()
        with torch.no_grad():
            return float(sum(mean_entropy(F.interpolate(net(t[0]), size=t[0].shape[-2:], mode="bilinear",
                                                        align_corners=False)) for t in targets))

    uniform = merge_state_dicts(sds)
    assert entropy(result.state_dict) < entropy(uniform) - 1e-3
    # the coefficients started at the merge weights: step 0's entropy is the uniform merge's
    assert result.entropy[0] * 2 == pytest.approx(entropy(uniform), rel=1e-4)
    n = 1 if granularity == "model" else sum(1 for _ in net.parameters())
    assert len(result.coefficients) == n and all(len(c) == 2 for c in result.coefficients.values())


def test_adamerging_zero_steps_is_the_linear_merge() -> None:
    net, base, sds = _models()
    result = adamerging(net, sds, base, [[_images(3)], [_images(4)]], steps=0, weights=[1, 3])
    linear = merge_state_dicts(sds, weights=[1, 3])
    for k in linear:
        torch.testing.assert_close(result.state_dict[k], linear[k], rtol=1e-5, atol=1e-6)


# -- the command ------------------------------------------------------------------------------

def _write(tmp_path):
    net, base, sds = _models(scale=0.1)
    for name, sd in zip(("a", "b"), sds):
        torch.save({"meta": {"iter": 1}, "state_dict": {f"model.{k}": v for k, v in sd.items()}},
                   tmp_path / f"{name}.pth")
    torch.save(base, tmp_path / "base.pth")
    return sds


def test_merge_command_fisher_and_adamerging(tmp_path, capsys) -> None:
    import json

    from domainmerge.checkpoint import load_state_dict
    from domainmerge.cli import main

    sds = _write(tmp_path)
    a, b = str(tmp_path / "a.pth"), str(tmp_path / "b.pth")
    doms = ["--domain", "city", "synthetic", "city", "train", "--domain", "night", "synthetic", "night", "train"]
    assert main(["merge", a, b, "-o", str(tmp_path / "f.pth"), "--method", "fisher", "--images", "4",
                 "--device", "cpu", "--quiet", *doms]) == 0
    out = load_state_dict(tmp_path / "f.pth")
    assert "READS TARGET IMAGES" in capsys.readouterr().out
    k = "backbone.stem.0.weight" if "backbone.stem.0.weight" in sds[0] else next(iter(sds[0]))
    lo = torch.minimum(sds[0][k], sds[1][k]) - 1e-6
    hi = torch.maximum(sds[0][k], sds[1][k]) + 1e-6
    assert bool(((out[f"model.{k}"] >= lo) & (out[f"model.{k}"] <= hi)).all())   # a convex combination
    record = torch.load(tmp_path / "f.pth", weights_only=True)["meta"]["domainmerge"]
    assert record["uses_target_data"] is True and record["method"] == "fisher"

    assert main(["merge", a, b, "-o", str(tmp_path / "m.pth"), "--method", "adamerging", "--base",
                 str(tmp_path / "base.pth"), "--images", "4", "--steps", "2", "--granularity", "model",
                 "--device", "cpu", "--quiet", *doms]) == 0
    coef = json.loads((tmp_path / "m.coefficients.json").read_text())
    assert len(coef["coefficients"]["model"]) == 2 and len(coef["entropy"]) == 2
    assert set(load_state_dict(tmp_path / "m.pth")) == {f"model.{k}" for k in sds[0]}


@pytest.mark.parametrize(("extra", "message"), [
    (["--method", "fisher", "--domain", "city", "synthetic", "city"], "one --domain per model"),
    (["--method", "adamerging", "--domain", "city", "synthetic", "city"], "--base"),
    (["--method", "fisher", "--keep-heads", "decode_head."], "does not combine"),
    (["--domain", "city", "synthetic", "city"], "only read by the methods that use data"),
])
def test_merge_command_data_method_errors(tmp_path, capsys, extra, message) -> None:
    from domainmerge.cli import main

    _write(tmp_path)
    rc = main(["merge", str(tmp_path / "a.pth"), str(tmp_path / "b.pth"), "-o", str(tmp_path / "m.pth"), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m.pth").exists()

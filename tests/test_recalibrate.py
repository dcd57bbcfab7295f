"""BN recalibration: running statistics equal the BN inputs' statistics, computed by hand."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from domainmerge.analysis.recalibrate import recalibrate_bn
from domainmerge.errors import UserError


def small_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                        nn.Conv2d(4, 5, 3, stride=2), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 2, 1))
    with torch.no_grad():  # stale statistics that recalibration must forget
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.fill_(3.0), m.running_var.fill_(9.0), m.num_batches_tracked.fill_(40)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-1, 1)
    return net.eval()


def expected_stats(net: nn.Module, batches: list[torch.Tensor]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each BN layer's inputs captured with hooks on a copy normalising with batch statistics
    (as training mode does, dropout off); per batch the mean and unbiased variance over (N, H, W)
    in float64, then averaged over batches (PyTorch's cumulative average)."""
    ref = copy.deepcopy(net).eval()
    seen: dict[str, list[np.ndarray]] = {}
    for name, m in ref.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
            m.register_forward_pre_hook(
                lambda mod, inp, name=name: seen.setdefault(name, []).append(inp[0].double().numpy()))
    with torch.no_grad():
        for x in batches:
            ref(x)
    out = {}
    for name, inputs in seen.items():
        means = [a.mean(axis=(0, 2, 3)) for a in inputs]
        vars_ = [a.transpose(1, 0, 2, 3).reshape(a.shape[1], -1).var(axis=1, ddof=1) for a in inputs]
        out[name] = (np.mean(means, axis=0), np.mean(vars_, axis=0))
    return out


def test_running_stats_equal_hand_computed_statistics() -> None:
    net = small_net()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 3, 12, 12, generator=gen) * 2 + 1 for _ in range(3)]
    batches.append(torch.randn(1, 3, 9, 11, generator=gen))  # another size, another batch size
    want = expected_stats(net, batches)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert recalibrate_bn(net, iter(batches)) == 4
    state = net.state_dict()
    for name, (mean, var) in want.items():
        np.testing.assert_allclose(state[f"{name}.running_mean"].numpy(), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state[f"{name}.running_var"].numpy(), var, rtol=1e-5, atol=1e-6)
        assert int(state[f"{name}.num_batches_tracked"]) == 4
    # Only BN statistics changed; momentum restored; model left in eval mode.
    for key, value in before.items():
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(state[key], value), key
    assert not any(m.training for m in net.modules())
    assert all(m.momentum == 0.1 for m in net.modules() if isinstance(m, nn.BatchNorm2d))


def test_no_batchnorm_or_no_images_is_a_user_error() -> None:
    with pytest.raises(UserError, match="no BatchNorm"):
        recalibrate_bn(nn.Conv2d(3, 3, 1), [torch.zeros(1, 3, 4, 4)])
    with pytest.raises(UserError, match="no image"):
        recalibrate_bn(small_net(), [])


def write_cityscapes(root, n: int, seed: int, size=(24, 32)) -> list:  # type: ignore[no-untyped-def]
    """A Cityscapes-layout tree of random images; returns the image paths in order."""
    rng = np.random.default_rng(seed)
    for sub in ("leftImg8bit/train/c", "gtFine/train/c"):
        (root / sub).mkdir(parents=True)
    paths = []
    for i in range(n):
        paths.append(root / f"leftImg8bit/train/c/{i}_leftImg8bit.png")
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(paths[-1])
        label = root / f"gtFine/train/c/{i}_gtFine_labelTrainIds.png"
        Image.fromarray(rng.integers(0, 19, size, dtype=np.uint8)).save(label)
    return paths


def test_recalibrate_command_on_a_model_package_network(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from domainmerge.cli import main
    from domainmerge.data import MEAN, STD
    from domainmerge.models import build_model

    net = build_model("tiny_daformer_r", num_classes=19).eval()
    sd = {f"model.{k}": v for k, v in net.state_dict().items()}
    sd["ema_model.extra"] = torch.ones(2)
    torch.save({"meta": {"domainmerge": {"inputs": ["a", "b"]}}, "state_dict": sd}, tmp_path / "merged.pth")
    d1 = write_cityscapes(tmp_path / "d1", 3, seed=1)
    d2 = write_cityscapes(tmp_path / "d2", 2, seed=2, size=(32, 24))
    shutil.rmtree(tmp_path / "d2" / "gtFine")  # an unlabeled training split must do
    out = tmp_path / "recal.pth"
    assert main(["recalibrate", str(tmp_path / "merged.pth"), "--images", "4", "-o", str(out), "--quiet",
                 "--domain", "one", "cityscapes", str(tmp_path / "d1"), "train",
                 "--domain", "two", "cityscapes", str(tmp_path / "d2"), "train", "--device", "cpu",
                 "--protocol", "custom"]) == 0
    saved = torch.load(out, weights_only=True)
    assert saved["meta"]["domainmerge"]["inputs"] == ["a", "b"]  # the merge record is kept
    assert saved["meta"]["domainmerge"]["recalibrated"]["domains"] == {"one": 2, "two": 2}
    assert torch.equal(saved["state_dict"]["ema_model.extra"], torch.ones(2))
    # Independent check: the same 4 images (indices 0 and 2 of d1, 0 and 1 of d2), one per batch.
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    files = [d1[0], d1[2], d2[0], d2[1]]
    batches = [(torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1)[None].float() - mean) / std
               for f in files]
    for name, (m, v) in expected_stats(net, batches).items():
        np.testing.assert_allclose(saved["state_dict"][f"model.{name}.running_mean"].numpy(), m, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(saved["state_dict"][f"model.{name}.running_var"].numpy(), v, rtol=1e-4, atol=1e-5)

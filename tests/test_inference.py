"""Whole/sliding-window inference and the evaluation loop, checked against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from domainmerge.data.resize import rescale_size
from domainmerge.errors import UserError
from domainmerge.evaluation.inference import evaluate_model, normalize, predict


class Pointwise(nn.Module):
    """A 1x1 convolution at full resolution: translation-equivariant, no border effects."""

    def __init__(self, classes: int = 4, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, classes, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.copy_(torch.randn(classes, generator=g))

    def forward(self, x):
        return self.conv(x)


class WindowMean(nn.Module):
    """Logits constant over the input window: channel 0 is the window's mean of channel 0."""

    def forward(self, x):
        m = x[:, :1].mean(dim=(2, 3), keepdim=True)
        return m.expand(-1, 2, x.shape[2], x.shape[3]).clone()


class Fixed2x2(nn.Module):
    """Logits of a fixed 2x2 map whatever the input size: channel 0 the given values, channel 1
    the constant ``threshold`` (so the argmax is 1 where the value is below it)."""

    def __init__(self, values, threshold: float = 0.0):
        super().__init__()
        v = torch.tensor(values, dtype=torch.float32).view(1, 1, 2, 2)
        self.register_buffer("values", torch.cat([v, torch.full_like(v, threshold)], dim=1))

    def forward(self, x):
        return self.values.expand(x.shape[0], -1, -1, -1)


def test_normalize_uses_paper_mean_std():
    img = torch.tensor([[[0]], [[128]], [[255]]], dtype=torch.uint8)
    want = [(0 - 123.675) / 58.395, (128 - 116.28) / 57.12, (255 - 103.53) / 57.375]
    np.testing.assert_allclose(normalize(img).flatten().numpy(), want, rtol=1e-6)


def test_slide_equals_whole_for_translation_equivariant_model():
    model = Pointwise()
    x = torch.randn(2, 3, 37, 53)
    whole = predict(model, x, "whole")
    for crop, stride in (((16, 16), (8, 8)), ((20, 30), (7, 11)), ((64, 64), (32, 32))):
        slide = predict(model, x, "slide", crop, stride, max_batch=3)
        torch.testing.assert_close(slide, whole)


def test_slide_overlap_average_by_hand():
    # Width 9, window 4, stride 3: windows [0,4), [3,7) and the last moved back to [5,9).
    x = torch.arange(9, dtype=torch.float32).view(1, 1, 1, 9).expand(1, 3, 1, 9).contiguous()
    got = predict(WindowMean(), x, "slide", crop=(1, 4), stride=(1, 3))[0, 0, 0].numpy()
    means = {(0, 4): 1.5, (3, 7): 4.5, (5, 9): 6.5}
    want = []
    for px in range(9):
        covering = [m for (a, b), m in means.items() if a <= px < b]
        want.append(sum(covering) / len(covering))
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_whole_logits_resized_bilinear_to_image():
    a, b, c, d = 0.0, 4.0, 8.0, 16.0
    got = predict(Fixed2x2([[a, b], [c, d]]), torch.zeros(1, 3, 4, 4), "whole")[0, 0].numpy()

    # align_corners=False doubling: sample positions -0.25, 0.25, 0.75, 1.25 clamped to [0, 1].
    def lerp(u, v):
        return [u, 0.75 * u + 0.25 * v, 0.25 * u + 0.75 * v, v]

    top, bottom = lerp(a, b), lerp(c, d)
    want = np.array([lerp(t, s) for t, s in zip(top, bottom)]).T
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_rescale_size_like_mmseg_keep_ratio():
    assert rescale_size(1024, 2048, (2048, 1024)) == (1024, 2048)
    assert rescale_size(1024, 2048, (1024, 512)) == (512, 1024)
    assert rescale_size(1080, 1920, (1024, 512)) == (512, 910)   # short edge binds: 512/1080
    assert rescale_size(10, 20, None) == (10, 20)


def confusion_by_hand(pred: np.ndarray, gt: np.ndarray, c: int, ignore: int = 255) -> np.ndarray:
    conf = np.zeros((c, c), dtype=np.int64)
    for p, g in zip(pred.ravel(), gt.ravel()):
        if g != ignore:
            conf[g, p] += 1
    return conf


def miou_by_hand(conf: np.ndarray) -> float:
    tp = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    return float(np.nanmean(iou) * 100)


def fake_dataset(n: int = 5, classes: int = 4, seed: int = 0, sizes=((12, 16),)):
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        lab = torch.randint(0, classes, (h, w), generator=g)
        lab[torch.rand(h, w, generator=g) < 0.1] = 255
        items.append((img, lab, f"img{i}"))
    return items


def expected_pointwise(model: Pointwise, items, classes: int) -> tuple[np.ndarray, dict]:
    """Predictions computed with numpy: normalise, apply the 1x1 conv, argmax."""
    w = model.conv.weight.detach().numpy()[:, :, 0, 0]
    b = model.conv.bias.detach().numpy()
    mean = np.array([123.675, 116.28, 103.53])[:, None, None]
    std = np.array([58.395, 57.12, 57.375])[:, None, None]
    conf = np.zeros((classes, classes), dtype=np.int64)
    preds = {}
    for img, lab, name in items:
        x = (img.numpy().astype(np.float64) - mean) / std
        logits = np.einsum("kc,chw->khw", w, x) + b[:, None, None]
        pred = logits.argmax(0)
        preds[name] = pred
        conf += confusion_by_hand(pred, lab.numpy(), classes)
    return conf, preds


@pytest.mark.parametrize("mode,batch_size", [("whole", 1), ("whole", 2), ("slide", 3)])
def test_evaluate_model_matches_hand_confusion(mode, batch_size):
    classes = 4
    items = fake_dataset(n=5, classes=classes, sizes=((12, 16), (12, 16), (10, 14)))
    model = Pointwise(classes)
    conf, preds = expected_pointwise(model, items, classes)
    seen = {}
    scores = evaluate_model(model, items, mode=mode, crop=(8, 8), stride=(4, 4), batch_size=batch_size,
                            num_classes=classes, progress=False,
                            on_prediction=lambda name, p: seen.__setitem__(name, p.numpy()))
    assert scores.miou == pytest.approx(miou_by_hand(conf), abs=1e-9)
    tp = np.diag(conf).sum()
    assert scores.aacc == pytest.approx(tp / conf.sum() * 100)
    assert seen.keys() == preds.keys()
    for name, p in preds.items():
        np.testing.assert_array_equal(seen[name], p)


def test_evaluate_model_resizes_logits_to_label_size():
    """With img_scale the image is shrunk, and the logits brought back to the label's size."""
    items = fake_dataset(n=2, classes=2, sizes=((16, 32),))
    got = {}
    evaluate_model(Fixed2x2([[0.0, 1.0], [2.0, 3.0]], threshold=1.5), items, img_scale=(16, 8), num_classes=2,
                   progress=False, on_prediction=lambda n, p: got.__setitem__(n, p))
    pred = got["img0"]
    assert pred.shape == (16, 32)
    # Top-left quadrant comes from value 0 (< 1.5: class 1), bottom-right from 3 (class 0).
    assert bool((pred[:4, :8] == 1).all()) and bool((pred[-4:, -8:] == 0).all())


def test_predict_rejects_bad_options():
    model = Pointwise()
    with pytest.raises(UserError, match="mode"):
        predict(model, torch.zeros(1, 3, 4, 4), "tiles")
    with pytest.raises(UserError, match="classes"):
        predict(model, torch.zeros(1, 3, 4, 4), num_classes=19)
    with pytest.raises(UserError, match="CUDA"):
        predict(model, torch.zeros(1, 3, 4, 4), amp="fp16")


def test_bf16_autocast_close_to_fp32_on_cpu():
    model = Pointwise()
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(predict(model, x, amp="bf16"), predict(model, x), atol=0.1, rtol=0.05)


def test_batched_slide_equals_one_window_per_forward():
    """All windows in one forward (the default, as the authors' batched_slide) against one window
    per forward and chunks of 2, on a network that is not translation-equivariant (HRDA with
    its context branch and detail crops, BatchNorm in eval mode): equal to float32 rounding."""
    from domainmerge.models import build_model

    torch.manual_seed(0)
    model = build_model("tiny_hrda_r").eval()
    x = torch.randn(2, 3, 64, 160)
    crop, stride = (64, 96), (32, 32)
    batched = predict(model, x, "slide", crop, stride)
    for max_batch in (1, 4):  # 2 images: one window, then 2 windows per forward
        one = predict(model, x, "slide", crop, stride, max_batch=max_batch)
        torch.testing.assert_close(batched, one, rtol=1e-5, atol=1e-5)
    # And the windows really are averaged: the first window alone gives the left border.
    alone = predict(model, x[:, :, :, :96], "whole")
    torch.testing.assert_close(batched[:, :, :, :32], alone[:, :, :, :32], rtol=1e-5, atol=1e-5)

"""SegMetric against two independent references: torchmetrics and mmseg's definition in numpy.

Differences from torchmetrics 1.9 (documented, not hidden):
- per class (average='none'), torchmetrics reports 0 for a class absent from both ground truth
  and prediction (zero_division=0); we report NaN. Its macro average gives such classes weight
  0, so the mIoU is the same (mmseg's nanmean).
- torchmetrics reduces in float32; we reduce the same int64 counts in float64, so IoU values
  agree to float32 rounding (the confusion matrices agree exactly).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassJaccardIndex

from domainmerge.errors import UserError
from domainmerge.evaluation.metrics import SegMetric, arithmetic_mean, harmonic_mean

IGNORE = 255


def mmseg_reference(preds: list[np.ndarray], gts: list[np.ndarray], num_classes: int) -> dict[str, object]:
    """mmseg's eval_metrics, by hand: areas summed over images, then IoU/Acc with nanmean."""
    inter = np.zeros(num_classes)
    area_pred = np.zeros(num_classes)
    area_gt = np.zeros(num_classes)
    for pred, gt in zip(preds, gts):
        keep = gt != IGNORE
        p, g = pred[keep], gt[keep]
        hit = p[p == g]
        inter += np.histogram(hit, bins=num_classes, range=(0, num_classes - 1))[0]
        area_pred += np.histogram(p, bins=num_classes, range=(0, num_classes - 1))[0]
        area_gt += np.histogram(g, bins=num_classes, range=(0, num_classes - 1))[0]
    union = area_pred + area_gt - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union * 100
        acc = inter / area_gt * 100
    with warnings.catch_warnings():   # nanmean of all-NaN warns and gives NaN, as in mmseg
        warnings.simplefilter("ignore", RuntimeWarning)
        miou = np.nanmean(iou)
        aacc = inter.sum() / area_gt.sum() * 100 if area_gt.sum() else np.nan
    return {"iou": iou, "acc": acc, "miou": miou, "aacc": aacc}


def random_case(rng: np.random.Generator, num_classes: int, n: int, h: int, w: int,
                present: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from a random subset of classes (so some classes are absent), ~20% ignored,
    predictions equal to the label 60% of the time, else random over all classes."""
    classes = rng.choice(num_classes, size=present, replace=False)
    gt = rng.choice(classes, size=(n, h, w))
    gt[rng.random((n, h, w)) < 0.2] = IGNORE
    pred = np.where(rng.random((n, h, w)) < 0.6, np.where(gt == IGNORE, 0, gt),
                    rng.integers(0, num_classes, size=(n, h, w)))
    return pred.astype(np.int64), gt.astype(np.int64)


@pytest.mark.parametrize("seed", range(12))
def test_random_cases_match_torchmetrics_and_mmseg(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_classes = int(rng.integers(2, 25))
    present = int(rng.integers(1, num_classes + 1))
    pred, gt = random_case(rng, num_classes, n=3, h=int(rng.integers(1, 40)), w=int(rng.integers(1, 40)),
                           present=present)
    metric = SegMetric(num_classes)
    for i in range(3):   # accumulate image by image, as over a split
        metric.update(torch.from_numpy(pred[i]), torch.from_numpy(gt[i]))
    scores = metric.compute()

    cm = MulticlassConfusionMatrix(num_classes, ignore_index=IGNORE)
    cm.update(torch.from_numpy(pred), torch.from_numpy(gt))
    assert torch.equal(metric.confusion, cm.compute().to(torch.int64))

    macro = MulticlassJaccardIndex(num_classes, average="macro", ignore_index=IGNORE)
    macro.update(torch.from_numpy(pred), torch.from_numpy(gt))
    assert scores.miou == pytest.approx(float(macro.compute()) * 100, rel=1e-5, nan_ok=True)

    per_class = MulticlassJaccardIndex(num_classes, average="none", ignore_index=IGNORE)
    per_class.update(torch.from_numpy(pred), torch.from_numpy(gt))
    tm_iou = per_class.compute().double().numpy() * 100
    ours = np.array(scores.iou)
    defined = ~np.isnan(ours)
    np.testing.assert_allclose(ours[defined], tm_iou[defined], rtol=1e-5, atol=1e-5)
    assert (tm_iou[~defined] == 0).all()   # torchmetrics' zero_division for absent classes

    ref = mmseg_reference(list(pred), list(gt), num_classes)
    np.testing.assert_allclose(ours, ref["iou"], rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(np.array(scores.acc), ref["acc"], rtol=1e-12, equal_nan=True)
    assert scores.miou == pytest.approx(ref["miou"], rel=1e-12, nan_ok=True)
    assert scores.aacc == pytest.approx(ref["aacc"], rel=1e-12, nan_ok=True)
    assert scores.pixels == int((gt != IGNORE).sum())   # labelled pixels, counted by hand


def test_counts_over_the_split_not_mean_of_images() -> None:
    # Image 1: class 0 perfectly predicted on 1 pixel; image 2: class 0 (99 pixels) all wrong.
    gt = [np.zeros((1, 1), np.int64), np.zeros((1, 99), np.int64)]
    pred = [np.zeros((1, 1), np.int64), np.ones((1, 99), np.int64)]
    metric = SegMetric(2)
    for p, g in zip(pred, gt):
        metric.update(torch.from_numpy(p), torch.from_numpy(g))
    scores = metric.compute()
    # class 0: TP 1, FN 99 -> 1 %; class 1: TP 0, FP 99 -> 0 %; split mIoU 0.5 (per-image mean: 50).
    assert scores.iou == pytest.approx((1.0, 0.0))
    assert scores.miou == pytest.approx(0.5)


def test_confusion_rows_are_ground_truth() -> None:
    metric = SegMetric(3)
    metric.update(torch.tensor([1, 1, 2]), torch.tensor([0, 0, 2]))
    expected = torch.tensor([[0, 2, 0], [0, 0, 0], [0, 0, 1]])
    assert torch.equal(metric.confusion, expected)


def test_class_absent_from_both_is_nan_and_excluded() -> None:
    metric = SegMetric(4)
    # class 0: TP 2; class 1: TP 1, FN 1 (predicted 0) -> IoU 1/2 and class 0 IoU 2/3; 2, 3 absent.
    metric.update(torch.tensor([0, 0, 1, 0]), torch.tensor([0, 0, 1, 1]))
    scores = metric.compute()
    assert scores.iou[0] == pytest.approx(200 / 3)
    assert scores.iou[1] == pytest.approx(50.0)
    assert math.isnan(scores.iou[2]) and math.isnan(scores.iou[3])
    assert scores.miou == pytest.approx((200 / 3 + 50) / 2)
    assert scores.to_dict()["iou"]["class2"] is None


def test_class_predicted_but_absent_from_gt_scores_zero_and_counts() -> None:
    metric = SegMetric(3)
    metric.update(torch.tensor([0, 2, 1, 1]), torch.tensor([0, 0, 1, 1]))
    scores = metric.compute()
    # class 0: TP 1, FN 1 -> 50; class 1: 100; class 2: FP 1, no GT -> IoU 0 (in the mean), acc NaN.
    assert scores.iou == pytest.approx((50.0, 100.0, 0.0))
    assert scores.miou == pytest.approx(50.0)
    assert math.isnan(scores.acc[2])
    assert scores.macc == pytest.approx(75.0)


def test_all_pixels_ignored_gives_nan_like_torchmetrics() -> None:
    gt = torch.full((2, 5), IGNORE)
    pred = torch.zeros(2, 5, dtype=torch.int64)
    metric = SegMetric(4)
    metric.update(pred, gt)
    scores = metric.compute()
    assert int(metric.confusion.sum()) == 0
    assert math.isnan(scores.miou) and math.isnan(scores.aacc) and math.isnan(scores.macc)
    assert scores.pixels == 0 and scores.to_dict()["pixels"] == 0
    tm = MulticlassJaccardIndex(4, average="macro", ignore_index=IGNORE)
    tm.update(pred, gt)
    assert math.isnan(float(tm.compute()))


@pytest.mark.parametrize("bad", [19, 100, 254, 256, -1])
def test_label_outside_range_raises_user_error(bad: int) -> None:
    gt = torch.tensor([0, 1, bad, IGNORE])
    with pytest.raises(UserError, match=f"label value {bad}"):
        SegMetric(19).update(torch.tensor([0, 1, 2, 3]), gt)


def test_prediction_outside_range_raises_unless_pixel_ignored() -> None:
    with pytest.raises(UserError, match="predicted value 19"):
        SegMetric(19).update(torch.tensor([0, 19]), torch.tensor([0, 1]))
    metric = SegMetric(19)
    metric.update(torch.tensor([0, 19, 255]), torch.tensor([0, IGNORE, IGNORE]))
    assert int(metric.confusion.sum()) == 1 and int(metric.confusion[0, 0]) == 1


def test_shape_mismatch_and_float_input() -> None:
    with pytest.raises(UserError, match="shape"):
        SegMetric(3).update(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(TypeError):
        SegMetric(3).update(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int64))


def test_uint8_and_int64_inputs_agree_and_reset() -> None:
    rng = np.random.default_rng(5)
    pred, gt = random_case(rng, 19, n=2, h=16, w=16, present=10)
    a, b = SegMetric(), SegMetric()
    a.update(torch.from_numpy(pred), torch.from_numpy(gt))
    b.update(torch.from_numpy(pred.astype(np.uint8)), torch.from_numpy(gt.astype(np.uint8)))
    assert torch.equal(a.confusion, b.confusion)
    assert a.confusion.dtype == torch.int64
    a.reset()
    assert int(a.confusion.sum()) == 0


def test_sync_without_process_group_keeps_local_counts() -> None:
    metric = SegMetric(2)
    metric.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    assert torch.equal(metric.sync().confusion, torch.tensor([[1, 1], [0, 0]]))


@pytest.mark.parametrize(("values", "expected"), [
    ((58.8, 54.0), 56.3),                 # merged ResNet-101, C / I
    ((61.9, 44.3), 51.6),                 # STDA GTA->CS
    ((49.4, 55.1), 52.1),                 # STDA GTA->IDD
    ((72.6, 50.6), 59.6),                 # STDA GTA->CS, MiT-B5
    ((67.0, 55.6), 60.8),                 # merged MiT-B5
    ((51.6, 47.3, 45.8, 21.1), 36.4),     # four targets merged
])
def test_harmonic_mean_reproduces_paper_tables(values: tuple[float, ...], expected: float) -> None:
    # The paper's H comes from unrounded mIoUs, so a few rows (59.3/53.3 -> 56.2, 60.2/55.5 ->
    # 57.7) are off by 0.1 from the rounded inputs; the rows here are not.
    assert round(harmonic_mean(values), 1) == expected


def test_harmonic_mean_formula_and_edges() -> None:
    assert harmonic_mean([58.8, 54.0]) == pytest.approx(2 * 58.8 * 54.0 / (58.8 + 54.0))
    assert harmonic_mean([30.0, 0.0]) == 0.0
    assert math.isnan(harmonic_mean([30.0, math.nan]))
    with pytest.raises(ValueError):
        harmonic_mean([])
    with pytest.raises(ValueError):
        harmonic_mean([10.0, -1.0])
    assert arithmetic_mean([51.6, 47.3, 45.8, 21.1]) == pytest.approx(41.45)


def test_many_classes_use_wide_keys_and_still_match_torchmetrics() -> None:
    # 200 classes x 256 key rows exceed int16: the int32 key path.
    rng = np.random.default_rng(11)
    pred, gt = random_case(rng, 200, n=2, h=30, w=30, present=150)
    metric = SegMetric(200)
    metric.update(torch.from_numpy(pred), torch.from_numpy(gt))
    cm = MulticlassConfusionMatrix(200, ignore_index=IGNORE)
    cm.update(torch.from_numpy(pred), torch.from_numpy(gt))
    assert torch.equal(metric.confusion, cm.compute().to(torch.int64))

"""Bootstrap intervals over images: coverage, paired differences, verdicts, per-image statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from domainmerge.evaluation.bootstrap import (
    PairedBootstrap,
    combine_verdicts,
    compare,
    interval,
    miou_samples,
    paired_difference,
    resample_counts,
    verdict,
)
from domainmerge.evaluation.metrics import ImageStats, SegMetric, scores_from_confusion


def random_confusions(rng: np.random.Generator, n: int, c: int) -> np.ndarray:
    conf = rng.integers(0, 50, size=(n, c, c))
    conf[:, np.arange(c), np.arange(c)] += rng.integers(0, 400, size=(n, c))
    conf[:, c - 1, :] = 0          # the last class never in the ground truth...
    conf[:, :, c - 1] = 0          # ...nor predicted: excluded from mIoU
    return conf


def test_image_stats_from_confusions_match_the_split_metric():
    rng = np.random.default_rng(0)
    conf = random_confusions(rng, 7, 5)
    stats = ImageStats.from_confusions(conf)
    assert stats.miou() == pytest.approx(scores_from_confusion(conf.sum(0)).miou, abs=1e-12)
    tp = np.array([np.diag(c) for c in conf])
    np.testing.assert_array_equal(stats.intersection, tp)
    np.testing.assert_array_equal(stats.union, conf.sum(2) + conf.sum(1) - tp)
    np.testing.assert_array_equal(ImageStats.from_rows(stats.rows()).union, stats.union)


def test_update_per_image_returns_each_image_and_adds_them_up():
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 4, size=(3, 5, 6))
    gt[0, 0, :] = 255
    pred = rng.integers(0, 4, size=(3, 5, 6))
    metric = SegMetric(4)
    confs = metric.update_per_image(torch.from_numpy(pred), torch.from_numpy(gt))
    for i in range(3):
        keep = gt[i] != 255
        expect = np.zeros((4, 4), dtype=np.int64)
        np.add.at(expect, (gt[i][keep], pred[i][keep]), 1)
        np.testing.assert_array_equal(confs[i].numpy(), expect)
    np.testing.assert_array_equal(metric.confusion.numpy(), confs.sum(0).numpy())


def test_resampled_miou_equals_scoring_the_resampled_split_by_hand():
    rng = np.random.default_rng(2)
    conf = random_confusions(rng, 6, 4)
    stats = ImageStats.from_confusions(conf)
    counts = resample_counts(6, 5, np.random.default_rng(3))
    assert counts.shape == (5, 6) and (counts.sum(1) == 6).all()
    for row, value in zip(counts, miou_samples(stats, counts)):
        total = sum(k * conf[i] for i, k in enumerate(row)).astype(float)
        tp = np.diag(total)
        union = total.sum(0) + total.sum(1) - tp
        expect = np.nanmean(np.where(union > 0, tp / np.maximum(union, 1), np.nan)) * 100
        assert value == pytest.approx(expect, abs=1e-10)


def test_interval_of_a_mean_covers_the_truth_at_the_nominal_rate():
    """One class whose union is the same 1000 pixels in every image: the split's mIoU is then
    exactly the mean of per-image values x_i = intersection_i / 10. With x_i independent, the
    truth is E[x] = 30 and a 95% interval must cover it in about 95% of simulated data sets.
    The percentile bootstrap of a mean of n = 50 values is known to cover slightly less than
    nominal (its spread is the plug-in sd, sqrt((n-1)/n) of the true one): about 94%. Over 1000
    data sets the Monte Carlo sd of the coverage is 0.007, so +-0.03 is more than 4 sd."""
    rng = np.random.default_rng(4)
    n, sets, covered80, covered95 = 50, 1000, 0, 0
    for k in range(sets):
        # A skewed per-image distribution (intersection ~ 1000 * Beta(1.5, 3.5)), mean 300.
        inter = np.round(1000 * rng.beta(1.5, 3.5, size=n)).astype(np.int64)[:, None]
        stats = ImageStats(intersection=inter, union=np.full((n, 1), 1000), target=np.full((n, 1), 1000))
        assert stats.miou() == pytest.approx(inter.mean() / 10)
        boot = PairedBootstrap({"d": n}, resamples=1000, seed=k)
        samples = boot.miou(stats, "d")
        lo95, hi95 = np.quantile(samples, [0.025, 0.975])
        lo80, hi80 = np.quantile(samples, [0.1, 0.9])
        covered95 += lo95 <= 30.0 <= hi95
        covered80 += lo80 <= 30.0 <= hi80
    assert abs(covered95 / sets - 0.95) < 0.03
    assert abs(covered80 / sets - 0.80) < 0.04
    # The library's interval() is those quantiles around the split's own value.
    ci = interval(stats, resamples=1000, level=0.95, seed=sets - 1)
    assert (ci.low, ci.high) == pytest.approx((lo95, hi95))
    assert ci.estimate == pytest.approx(inter.mean() / 10)


def test_paired_difference_of_a_model_with_itself_is_exactly_zero():
    rng = np.random.default_rng(5)
    a = ImageStats.from_confusions(random_confusions(rng, 30, 6))
    b = ImageStats.from_confusions(random_confusions(rng, 20, 6))
    for ci in (paired_difference(a, a, resamples=300), paired_difference([a, b], [a, b], resamples=300)):
        assert (ci.estimate, ci.low, ci.high) == (0.0, 0.0, 0.0)
    # The two models' own intervals are wide; the pairing is what removes the noise.
    own = interval(a, resamples=300)
    assert own.high - own.low > 1.0


def test_models_differing_on_one_image_only():
    """N = 20 images. Model A and B agree on images 1..19 (each: class 0 with I = 60, U = 100,
    class 1 with I = 50, U = 100); on image 0, A is perfect (I = U = 100 for both classes) and B
    is as on the others. A resample is then fixed by k, the number of copies of image 0
    (Binomial(20, 1/20)): diff(k) = mIoU_A - mIoU_B with
      mIoU_A(k) = 100 * ((100k + 60(20-k)) + (100k + 50(20-k))) / (2 * 100 * 20),
      mIoU_B = 55 for every k.
    P(k <= 2) = 0.925 < 0.975 < P(k <= 3) = 0.984 and P(k = 0) = 0.358 > 0.025, so the 95%
    percentile interval is [diff(0), diff(3)] = [0, 100 * 3 * 90 / 4000] = [0, 6.75], and the
    estimate (k = 1) is 2.25."""
    n = 20
    inter_b = np.tile([60, 50], (n, 1))
    union = np.full((n, 2), 100)
    inter_a = inter_b.copy()
    inter_a[0] = [100, 100]
    a = ImageStats(intersection=inter_a, union=union, target=union)
    b = ImageStats(intersection=inter_b, union=union, target=union)
    ci = paired_difference(a, b, resamples=4000, level=0.95, seed=0)
    assert ci.estimate == pytest.approx(2.25)
    assert ci.low == pytest.approx(0.0, abs=1e-12)
    assert ci.high == pytest.approx(6.75)


def test_h_interval_and_compare_share_resamples():
    rng = np.random.default_rng(6)
    a = {"x": ImageStats.from_confusions(random_confusions(rng, 25, 4)),
         "y": ImageStats.from_confusions(random_confusions(rng, 15, 4))}
    b = {"x": ImageStats.from_confusions(random_confusions(rng, 25, 4)),
         "y": ImageStats.from_confusions(random_confusions(rng, 15, 4))}
    res = compare({"a": a, "b": b}, resamples=500, level=0.9, seed=1)
    assert res["reference"] == "a" and set(res["differences"]) == {"b"}
    ia, ib = res["intervals"]["a"], res["intervals"]["b"]
    ma, mb = a["x"].miou(), a["y"].miou()
    assert ia["H"].estimate == pytest.approx(2 * ma * mb / (ma + mb))
    # The same numbers through the single-purpose functions (same seed, same draws).
    h = interval([a["x"], a["y"]], resamples=500, level=0.9, seed=1)
    assert (h.low, h.high) == pytest.approx((ia["H"].low, ia["H"].high))
    d = paired_difference([b["x"], b["y"]], [a["x"], a["y"]], resamples=500, level=0.9, seed=1)
    got = res["differences"]["b"]["H"]
    assert (d.estimate, d.low, d.high) == pytest.approx((got.estimate, got.low, got.high))
    assert got.estimate == pytest.approx(ib["H"].estimate - ia["H"].estimate)
    for k in ("x", "y", "H"):
        assert ia[k].low <= ia[k].estimate <= ia[k].high


@pytest.mark.parametrize(("low", "high", "margin", "side", "expected"), [
    (0.5, 2.0, 0.0, ">=", "PASS"),     # on the claimed side
    (-2.0, -0.5, 0.0, ">=", "FAIL"),   # on the other side
    (-0.5, 2.0, 0.0, ">=", "TIE"),     # straddles zero
    (0.0, 0.0, 0.0, ">=", "PASS"),     # exactly equal satisfies >=
    (0.0, 0.0, 0.0, ">", "FAIL"),      # ...but not >
    (2.5, 6.0, 2.0, ">=", "PASS"),     # a margin: claimed gain of at least 2
    (1.0, 3.0, 2.0, ">=", "TIE"),
    (-1.0, 1.9, 2.0, ">=", "FAIL"),
    (-1.4, 3.0, -1.5, ">=", "PASS"),   # 'not worse by more than 1.5'
    (0.2, 0.9, 1.0, "<=", "PASS"),     # a barrier of at most 1
    (0.5, 1.5, 1.0, "<=", "TIE"),
    (1.2, 3.0, 1.0, "<=", "FAIL"),
    (math.nan, math.nan, 0.0, ">=", "TIE"),
])
def test_verdicts_on_hand_made_intervals(low, high, margin, side, expected):
    assert verdict(low, high, margin, side) == expected


def test_verdict_rejects_bad_input_and_combines():
    with pytest.raises(ValueError):
        verdict(1.0, 0.0)
    with pytest.raises(ValueError):
        verdict(0.0, 1.0, side="=>")
    assert combine_verdicts(["PASS", "PASS"]) == "PASS"
    assert combine_verdicts(["PASS", "TIE"]) == "TIE"
    assert combine_verdicts(["TIE", "FAIL", "PASS"]) == "FAIL"

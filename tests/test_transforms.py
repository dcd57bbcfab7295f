"""Train-time transforms against hand computations (mmcv's resize rule, cv2-style bilinear and
nearest written out in numpy, mmseg's cat_max_ratio loop replayed with the same generator)."""

from __future__ import annotations

import math

import numpy as np
import torch

from domainmerge.data.classes import MEAN
from domainmerge.data.transforms import (
    cat_max_ratio_box,
    crop_accepted,
    hflip,
    pad_to,
    random_crop_box,
    resize,
    resize_keep_ratio,
)


def _bilinear_reference(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """cv2.INTER_LINEAR written out: half-pixel centres, source coordinates clamped at the border."""
    c, h, w = img.shape

    def axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        src = np.clip(src, 0, None)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, fy = axis(out_h, h)
    x0, x1, fx = axis(out_w, w)
    f = img.astype(np.float64)
    top = f[:, y0][:, :, x0] * (1 - fx) + f[:, y0][:, :, x1] * fx
    bottom = f[:, y1][:, :, x0] * (1 - fx) + f[:, y1][:, :, x1] * fx
    out = top * (1 - fy)[None, :, None] + bottom * fy[None, :, None]
    return np.clip(np.round(out), 0, 255)


def test_resize_image_bilinear_label_nearest() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (3, 37, 53), dtype=np.uint8)
    lab = rng.integers(0, 19, (37, 53))
    lab[rng.random((37, 53)) < 0.2] = 255
    for out_h, out_w in ((20, 29), (61, 100)):   # down and up
        out, out_lab = resize(torch.from_numpy(img), torch.from_numpy(lab), (out_h, out_w))
        assert out.dtype == torch.uint8 and out_lab is not None and out_lab.dtype == torch.int64
        ref = _bilinear_reference(img, out_h, out_w)
        assert np.abs(out.numpy().astype(float) - ref).max() <= 1   # float rounding only
        ys = np.minimum(np.floor(np.arange(out_h) * 37 / out_h).astype(int), 36)
        xs = np.minimum(np.floor(np.arange(out_w) * 53 / out_w).astype(int), 52)
        np.testing.assert_array_equal(out_lab.numpy(), lab[ys][:, xs])


def test_resize_keep_ratio_sizes_and_no_op() -> None:
    img = torch.zeros(3, 1052, 1914, dtype=torch.uint8)
    lab = torch.zeros(1052, 1914, dtype=torch.int64)
    out, out_lab = resize_keep_ratio(img, lab, (1280, 720))
    assert out.shape == (3, 704, 1280) and out_lab is not None and out_lab.shape == (704, 1280)
    same, same_lab = resize_keep_ratio(img[:, :512, :1024], None, (1024, 512))
    assert same.shape == (3, 512, 1024) and same_lab is None


def test_crop_accepted_counts_by_hand() -> None:
    lab = torch.full((10, 10), 255)
    assert not crop_accepted(lab, 0.75)                 # nothing labelled
    lab[:, :] = 3
    assert not crop_accepted(lab, 0.75)                 # one class only
    lab[:, :7] = 3
    lab[:, 7:] = 5
    assert crop_accepted(lab, 0.75)                     # 70 / 100 < 0.75
    lab[:, 7] = 3
    assert not crop_accepted(lab, 0.75)                 # 80 / 100
    lab[:5, :] = 255                                    # 40 of class 3, 10 of class 5 among 50 labelled
    assert not crop_accepted(lab, 0.75) and crop_accepted(lab, 0.81)
    lab[:, :] = 255
    lab[0, 0], lab[0, 1] = 0, 18                        # two pixels, 50 % each
    assert crop_accepted(lab, 0.75)


def _replay_boxes(seed: int, height: int, width: int, crop: tuple[int, int], n: int) -> list[tuple[int, ...]]:
    """The first n boxes mmseg's RandomCrop draws (offset_h then offset_w, each uniform)."""
    rng = np.random.default_rng(seed)
    boxes = []
    for _ in range(n):
        y = int(rng.integers(0, max(height - crop[0], 0) + 1))
        x = int(rng.integers(0, max(width - crop[1], 0) + 1))
        boxes.append((y, y + crop[0], x, x + crop[1]))
    return boxes


def test_cat_max_ratio_takes_first_accepted_box() -> None:
    lab = torch.zeros(40, 80, dtype=torch.int64)
    lab[:, 60:] = 1                      # only crops reaching x >= 60 with enough class 1 pass
    crop = (20, 20)
    for seed in range(20):
        box = cat_max_ratio_box(lab, crop, 0.75, np.random.default_rng(seed))
        candidates = _replay_boxes(seed, 40, 80, crop, 11)
        shares = []
        for y1, y2, x1, x2 in candidates:
            counts = np.bincount(lab[y1:y2, x1:x2].numpy().ravel(), minlength=2)
            shares.append(len(np.flatnonzero(counts)) > 1 and counts.max() / counts.sum() < 0.75)
        first_ok = next((i for i, ok in enumerate(shares[:10]) if ok), 10)
        assert box == candidates[first_ok]


def test_cat_max_ratio_gives_up_after_ten_tests() -> None:
    lab = torch.full((30, 30), 7, dtype=torch.int64)     # no crop can pass
    box = cat_max_ratio_box(lab, (10, 10), 0.75, np.random.default_rng(3))
    assert box == _replay_boxes(3, 30, 30, (10, 10), 11)[10]   # the 11th draw, unchecked
    # ratio 1 (no test): the first box
    assert cat_max_ratio_box(lab, (10, 10), 1.0, np.random.default_rng(3)) == _replay_boxes(3, 30, 30, (10, 10), 1)[0]


def test_random_crop_box_in_bounds_and_clipped() -> None:
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        y1, y2, x1, x2 = random_crop_box(12, 20, (10, 10), rng)
        assert 0 <= y1 and y2 <= 12 and 0 <= x1 and x2 <= 20 and y2 - y1 == 10 and x2 - x1 == 10
        seen.add((y1, x1))
    assert len(seen) == 3 * 11                               # every offset reachable
    assert random_crop_box(5, 8, (10, 10), rng) == (0, 5, 0, 8)


def test_pad_to_uses_mean_colour_and_ignore_label() -> None:
    img = torch.full((3, 4, 5), 9, dtype=torch.uint8)
    lab = torch.ones(4, 5, dtype=torch.int64)
    out, out_lab = pad_to(img, lab, (6, 8))
    assert out.shape == (3, 6, 8) and out_lab.shape == (6, 8)
    assert torch.equal(out[:, :4, :5], img) and torch.equal(out_lab[:4, :5], lab)
    for c in range(3):
        assert (out[c, 4:] == math.floor(MEAN[c] + 0.5)).all() and (out[c, :, 5:] == math.floor(MEAN[c] + 0.5)).all()
    assert (out_lab[4:] == 255).all() and (out_lab[:, 5:] == 255).all()


def test_hflip_mirrors_columns() -> None:
    img = torch.arange(36, dtype=torch.uint8).view(3, 3, 4)
    lab = torch.arange(12).view(3, 4)
    f_img, f_lab = hflip(img, lab)
    assert f_lab[1].tolist() == [7, 6, 5, 4]
    assert f_img[2, 1].tolist() == [31, 30, 29, 28]


def test_margin_mask_and_nearest_mask_resize() -> None:
    from domainmerge.data.transforms import margin_mask, resize_nearest

    m = margin_mask(10, 12, (2, 3, 1, 0))
    yy, xx = np.mgrid[0:10, 0:12]
    expected = (yy >= 2) & (yy < 10 - 3) & (xx >= 1)
    np.testing.assert_array_equal(m.numpy(), expected)
    assert margin_mask(4, 4, (0, 0, 0, 0)).all()
    small = resize_nearest(m, (5, 6))
    assert small.dtype == torch.bool
    np.testing.assert_array_equal(small.numpy(), expected[::2, ::2])   # floor(i * 10 / 5) = 2i

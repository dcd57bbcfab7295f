"""domainmerge.tensors against hand-computed values and numpy / scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import hmean

from domainmerge.tensors import crop_boxes, equal_size_batches, harmonic_mean, normalize


def test_normalize_matches_numpy_on_every_channel() -> None:
    image = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    mean = np.array([123.675, 116.28, 103.53]).reshape(3, 1, 1)
    std = np.array([58.395, 57.12, 57.375]).reshape(3, 1, 1)
    expected = (image.numpy().astype(np.float64) - mean) / std
    out = normalize(image)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_crop_boxes_by_hand() -> None:
    # 10 x 7 image, 4 x 4 windows, stride 3 x 3: rows start at 0, 3, then 6 (shifted back to end at
    # 10); columns at 0 and 3 (the second already ends at 7).
    assert crop_boxes(10, 7, (4, 4), (3, 3)) == [(0, 4, 0, 4), (0, 4, 3, 7), (3, 7, 0, 4), (3, 7, 3, 7),
                                                 (6, 10, 0, 4), (6, 10, 3, 7)]
    # a window larger than the image is clipped to it
    assert crop_boxes(2, 3, (4, 4), (2, 2)) == [(0, 2, 0, 3)]


def test_equal_size_batches_split_on_size_and_count() -> None:
    items = ["aa", "bb", "cc", "d", "ee", "ff"]
    assert list(equal_size_batches(items, 2, len)) == [["aa", "bb"], ["cc"], ["d"], ["ee", "ff"]]
    assert list(equal_size_batches([], 3, len)) == []


@pytest.mark.parametrize("values", [[30.0, 60.0], [12.5, 40.0, 7.25, 90.0]])
def test_harmonic_mean_is_scipys(values: list[float]) -> None:
    assert harmonic_mean(values) == pytest.approx(float(hmean(values)))
    assert harmonic_mean([*values, 0.0]) == 0.0

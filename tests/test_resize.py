"""mmseg-style resizing of uint8 images, against OpenCV's cv2.resize and a case done by hand."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from domainmerge.data.resize import rescale_size, resize_to_scale, resize_uint8


def ours(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """HWC uint8 -> HWC uint8 through resize_uint8 (which takes CHW)."""
    return resize_uint8(torch.from_numpy(img).permute(2, 0, 1), (h, w)).permute(1, 2, 0).numpy()


# The authors' protocols only shrink: Cityscapes to DAFormer's 1024x512 (exactly half), IDD
# 1920x1080 to 1820x1024 (MTDA test config), ACDC/Dark Zurich 1920x1080 to 960x540, GTA 1914x1052
# to 1280x704, and a few odd ratios.
DOWNSCALES = [(1024, 2048, 512, 1024), (1080, 1920, 1024, 1820), (1080, 1920, 540, 960),
              (1052, 1914, 704, 1280), (37, 53, 20, 31), (100, 100, 7, 7), (30, 60, 10, 20), (31, 20, 19, 13)]


@pytest.mark.parametrize("h0,w0,h,w", DOWNSCALES)
def test_downscale_equals_opencv(h0, w0, h, w):
    rng = np.random.default_rng(h0 * w + w0)
    img = rng.integers(0, 256, (h0, w0, 3), dtype=np.uint8)
    want = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(ours(img, h, w), want)


@pytest.mark.parametrize("h0,w0,h,w", [(720, 1280, 1024, 1820), (20, 31, 45, 77), (20, 31, 21, 33), (8, 8, 64, 64)])
def test_upscale_equals_opencv_inside_the_border_rows(h0, w0, h, w):
    """Enlarging (IDD's 1280x720 images under the 1920x1080 protocol): equal everywhere except in
    the rows above the first / below the last source row centre, where OpenCV's vertical pass
    rounds differently (measured: off by at most 1)."""
    rng = np.random.default_rng(h0 + w)
    img = rng.integers(0, 256, (h0, w0, 3), dtype=np.uint8)
    want = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR).astype(int)
    got = ours(img, h, w).astype(int)
    centre = (np.arange(h) + 0.5) * h0 / h - 0.5
    inside = (centre >= 0) & (centre < h0 - 1)
    np.testing.assert_array_equal(got[inside], want[inside])
    assert np.abs(got - want).max() <= 1


def test_hand_computed_case():
    # One row 0, 100, 200, 255 shrunk to 2 pixels: sample positions (d + 0.5) * 2 - 0.5 = 0.5, 2.5,
    # weights 1024/1024 -> (0 + 100) / 2 = 50 and (200 + 255) / 2 = 227.5, which the fixed-point
    # rounding ((x * 2048 * 2048 >> 4 >> 16) + 2) >> 2 takes to 228 (half up).
    img = torch.tensor([[0, 100, 200, 255]], dtype=torch.uint8).view(1, 1, 4).expand(3, 1, 4)
    assert resize_uint8(img, (1, 2))[0, 0].tolist() == [50, 228]
    # Enlarging 2 -> 4 pixels: positions -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1);
    # 10 * 0.75 + 30 * 0.25 = 15 and 10 * 0.25 + 30 * 0.75 = 25 exactly (weights 1536 / 512).
    img = torch.tensor([10, 30], dtype=torch.uint8).view(1, 1, 2)
    assert resize_uint8(img, (1, 4))[0, 0].tolist() == [10, 15, 25, 30]


def test_same_size_is_returned_and_batches_work():
    img = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    assert resize_uint8(img, (5, 7)) is img
    out = resize_uint8(img, (3, 4))
    assert out.shape == (2, 3, 3, 4) and out.dtype == torch.uint8
    for i in range(2):
        want = cv2.resize(img[i].permute(1, 2, 0).numpy(), (4, 3), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_array_equal(out[i].permute(1, 2, 0).numpy(), want)
    with pytest.raises(TypeError, match="uint8"):
        resize_uint8(img.float(), (3, 4))


def test_rescale_size_and_resize_to_scale():
    # mmcv.imrescale: scale = min(long / max(h, w), short / min(h, w)), each edge int(x * s + 0.5).
    assert rescale_size(1080, 1920, (2048, 1024)) == (1024, 1820)   # IDD under the MTDA test config
    assert rescale_size(1052, 1914, (1280, 720)) == (704, 1280)  # 1052 * 1280 / 1914 = 703.53
    assert rescale_size(720, 1280, (1920, 1080)) == (1080, 1920)
    img = torch.zeros(3, 1080, 1920, dtype=torch.uint8)
    assert resize_to_scale(img, (2048, 1024)).shape == (3, 1024, 1820)
    assert resize_to_scale(img, None) is img


# mmcv's rule is symmetric in the two edges: sizes given (w, h) come back (w, h).
@pytest.mark.parametrize(("size", "scale", "expected"), [
    # GTA 1914x1052 into (1280, 720): factor min(1280/1914, 720/1052) = 0.668757; 1052 * 0.668757 = 703.53 -> 704
    ((1914, 1052), (1280, 720), (1280, 704)),
    # GTA into HRDA's (2560, 1440): factor 2560/1914 = 1.337513; 1052 * 1.337513 = 1407.06 -> 1407
    ((1914, 1052), (2560, 1440), (2560, 1407)),
    # Cityscapes 2048x1024 into (1024, 512): exactly half
    ((2048, 1024), (1024, 512), (1024, 512)),
    ((2048, 1024), (2048, 1024), (2048, 1024)),
    # IDD/ACDC 1920x1080 into (960, 540)
    ((1920, 1080), (960, 540), (960, 540)),
    # a portrait image: long side 200 -> 1280 limits (factor 6.4; the short side would allow 7.2)
    ((100, 200), (1280, 720), (640, 1280)),
    # scale given (H, W)-ordered gives the same (mmcv takes max/min of the pair)
    ((1914, 1052), (720, 1280), (1280, 704)),
])
def test_rescale_size_follows_mmcv(size: tuple[int, int], scale: tuple[int, int],
                                   expected: tuple[int, int]) -> None:
    assert rescale_size(*size, scale) == expected

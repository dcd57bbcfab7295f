"""TrainSet and batches: samples pure in (seed, iteration, slot), transforms applied consistently
to image and label, worker processes and rank splits giving the same batches."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from domainmerge.data import folder_dataset
from domainmerge.data.rcs import RareClassSampler
from domainmerge.data.training import CropConfig, TrainSet, batches, recipe_crops
from domainmerge.errors import UserError


class InMemory:
    """The shape of SyntheticDataset: .images [N, 3, H, W] uint8, .labels [N, H, W] int64."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        return self.images[i], self.labels[i], str(i)


def coded(n: int, h: int, w: int) -> InMemory:
    """Image i: channel 0 = row, 1 = column, 2 = i; label = (row + column) % 19, so a crop's
    label can be checked against its pixels and its place recovered."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    images = torch.stack([torch.stack([yy, xx, torch.full_like(yy, i)]) for i in range(n)]).to(torch.uint8)
    labels = ((yy + xx) % 19).expand(n, h, w).clone()
    return InMemory(images, labels)


def test_samples_are_pure_functions_of_seed_iteration_slot() -> None:
    ds = coded(5, 40, 60)
    crop = CropConfig(crop=(16, 24))
    a, b = TrainSet(ds, crop, seed=3), TrainSet(ds, crop, seed=3)
    for it, slot in [(0, 0), (7, 1), (7, 0), (12345, 3)]:
        x, y = a.sample(it, slot), b.sample(it, slot)
        assert all(torch.equal(x[k], y[k]) for k in ("image", "label", "index"))
    # order of calls does not matter
    first = a.sample(9, 2)["image"].clone()
    a.sample(1, 1)
    assert torch.equal(a.sample(9, 2)["image"], first)
    # different seeds, iterations or slots give different draws (not all equal over many)
    draws = {(int(s["index"]), tuple(s["image"][:2, 0, 0].tolist()), bool(s["image"][1, 0, 1] < s["image"][1, 0, 0]))
             for s in (a.sample(it, slot) for it in range(10) for slot in range(2))}
    assert len(draws) > 10


def test_crop_and_flip_apply_to_image_and_label_alike() -> None:
    ds = coded(3, 50, 70)
    ts = TrainSet(ds, CropConfig(crop=(20, 30), cat_max_ratio=1.0, flip=0.5), seed=0)
    flipped = 0
    for it in range(60):
        s = ts.sample(it, 0)
        img, lab = s["image"].long(), s["label"]
        assert img.shape == (3, 20, 30) and lab.shape == (20, 30) and lab.dtype == torch.int64
        assert (img[2] == s["index"]).all()
        assert torch.equal(lab, (img[0] + img[1]) % 19)               # label travels with its pixels
        rows, cols = img[0, :, 0], img[1, 0]
        assert torch.equal(rows, torch.arange(rows[0], rows[0] + 20))  # a contiguous window
        step = int(cols[1] - cols[0])
        flipped += step == -1
        assert torch.equal(cols, cols[0] + step * torch.arange(30))
    assert 15 <= flipped <= 45
    never = TrainSet(ds, CropConfig(crop=(20, 30), flip=0.0), seed=0)
    always = TrainSet(ds, CropConfig(crop=(20, 30), flip=1.0), seed=0)
    for it in range(10):
        assert never.sample(it, 0)["image"][1, 0, 1] > never.sample(it, 0)["image"][1, 0, 0]
        assert always.sample(it, 0)["image"][1, 0, 1] < always.sample(it, 0)["image"][1, 0, 0]


def test_resize_then_crop_and_pad() -> None:
    # a GTA-shaped image resized with DAFormer's (1280, 720) is 1280x704; crops of 512 fit
    images = torch.zeros(1, 3, 1052, 1914, dtype=torch.uint8)
    labels = torch.zeros(1, 1052, 1914, dtype=torch.int64)
    labels[..., 957:] = 1
    src, _ = recipe_crops("daformer", "gta", "cityscapes")
    s = TrainSet(InMemory(images, labels), src, seed=0).sample(0, 0)
    assert s["image"].shape == (3, 512, 512)
    # native-size images smaller than the crop are padded with the mean colour and label 255
    small = coded(1, 10, 12)
    s = TrainSet(small, CropConfig(crop=(16, 16), flip=0.0), seed=0).sample(0, 0)
    assert s["image"].shape == (3, 16, 16) and (s["label"][10:] == 255).all() and (s["label"][:, 12:] == 255).all()
    assert torch.equal(s["image"][:, :10, :12], small.images[0])
    assert (s["image"][0, 12:] == 124).all()
    # flipped, the image is mirrored and still padded at the bottom and right (mmseg pads after flipping)
    f = TrainSet(small, CropConfig(crop=(16, 16), flip=1.0), seed=0).sample(0, 0)
    assert torch.equal(f["image"][:, :10, :12], small.images[0].flip(-1))
    assert (f["label"][10:] == 255).all() and (f["label"][:, 12:] == 255).all()


def test_pseudo_margins_follow_crop_flip_and_padding() -> None:
    ds = coded(4, 40, 60)
    margins = (5, 8, 3, 6)                   # top, bottom, left, right of the stored image
    ts = TrainSet(ds, CropConfig(crop=(16, 20), pseudo_margins=margins), seed=0, labeled=False)
    for it in range(30):
        s = ts.sample(it, 0)
        rows, cols = s["image"][0].long(), s["image"][1].long()   # each pixel's place in the stored image
        inside = (rows >= 5) & (rows < 40 - 8) & (cols >= 3) & (cols < 60 - 6)
        assert s["valid"].dtype == torch.bool and torch.equal(s["valid"], inside)
    batch = ts.batch(0, 0, 3)
    assert batch["valid"].shape == (3, 16, 20)
    # padding is not valid; no margins -> no mask
    small = TrainSet(coded(1, 10, 12), CropConfig(crop=(16, 16), flip=0.0, pseudo_margins=(0, 0, 0, 0)),
                     seed=0, labeled=False).sample(0, 0)
    assert small["valid"][:10, :12].all() and not small["valid"][10:].any() and not small["valid"][:, 12:].any()
    assert "valid" not in TrainSet(ds, CropConfig(crop=(16, 20)), seed=0).sample(0, 0)


def test_cat_max_ratio_steers_labelled_crops() -> None:
    labels = torch.zeros(4, 60, 60, dtype=torch.int64)
    labels[:, :, 45:] = 1                       # only crops overlapping x >= 45 can pass
    ds = InMemory(torch.zeros(4, 3, 60, 60, dtype=torch.uint8), labels)
    def passing(cfg: CropConfig) -> int:
        ts = TrainSet(ds, cfg, seed=1)
        n = 0
        for it in range(100):
            lab = ts.sample(it, 0)["label"]
            counts = np.bincount(lab.numpy().ravel(), minlength=2)
            n += bool(counts.min() > 0 and counts.max() / counts.sum() < 0.75)
        return n
    # uniform 20x20 crops pass when 5 < x1 + 20 - 45 < 15, i.e. x1 in 31..39: 9 of 41 offsets; mmseg
    # tests 10 boxes and keeps the 11th unchecked, so a crop passes with 1 - (32/41)^11 = 0.934
    assert passing(CropConfig(crop=(20, 20), cat_max_ratio=0.75)) >= 85
    assert passing(CropConfig(crop=(20, 20), cat_max_ratio=1.0)) <= 35      # 9/41 = 0.22 without the test


def test_unlabelled_sets_return_ignore_labels(tmp_path: Path) -> None:
    (tmp_path / "images" / "train").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(tmp_path / "images" / "train" / f"{i}.png")
    reader = folder_dataset(tmp_path, "train", labels=False)
    ts = TrainSet(reader, CropConfig(crop=(8, 8)), seed=0, labeled=False)
    s = ts.sample(0, 0)
    assert s["image"].shape == (3, 8, 8) and (s["label"] == 255).all()
    assert (s["image"] == 40 * int(s["index"])).all()
    with pytest.raises(UserError, match="no label file"):
        TrainSet(reader, CropConfig(), seed=0).sample(0, 0)


def test_file_reader_gives_the_pixels_it_stores(tmp_path: Path) -> None:
    ds = coded(3, 24, 32)
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(ds.images[i].permute(1, 2, 0).numpy()).save(tmp_path / "images" / "train" / f"{i}.png")
        Image.fromarray(ds.labels[i].numpy().astype(np.uint8)).save(tmp_path / "labels" / "train" / f"{i}.png")
    crop = CropConfig(crop=(16, 16))
    from_files = TrainSet(folder_dataset(tmp_path, "train"), crop, seed=5)
    in_memory = TrainSet(ds, crop, seed=5)
    for it in range(5):
        a, b = from_files.sample(it, 1), in_memory.sample(it, 1)
        assert all(torch.equal(a[k], b[k]) for k in ("image", "label", "index"))


def test_rare_class_sampling_draws_images_and_crops_with_the_class() -> None:
    labels = torch.zeros(6, 40, 40, dtype=torch.int64)
    labels[:, 20:] = 1
    labels[4, 26:40, 0:14] = 2                    # a rare class: 196 pixels in image 4 only
    ds = InMemory(torch.zeros(6, 3, 40, 40, dtype=torch.uint8), labels)
    rcs = RareClassSampler.from_dataset(ds, temperature=0.01, min_pixels=150, min_crop_ratio=0.5)
    assert float(rcs.class_probabilities[2]) > 0.9
    # share of 16x16 crop positions showing more than 75 pixels of class 2, counted by hand
    ok = [(min(y + 16, 40) - max(y, 26)) * (min(x + 16, 14) - x) > 75
          for y in range(25) for x in range(25) if y + 16 > 26 and x < 14]
    p = sum(ok) / 625
    expected = 1 - (1 - p) ** 11                  # 10 tests, then the 11th crop unchecked
    ts = TrainSet(ds, CropConfig(crop=(16, 16), cat_max_ratio=1.0), seed=0, rcs=rcs)
    hits = n = 0
    for it in range(300):
        s = ts.sample(it, 0)
        index, cls = rcs.draw(0, it, 0)
        assert int(s["index"]) == index
        if cls == 2:
            n += 1
            hits += int((s["label"] == 2).sum()) > 75
    assert n > 270 and 0.05 < p < 0.15           # re-drawing matters: 0.09 alone vs 0.66
    assert abs(hits / n - expected) < 3 * (expected * (1 - expected) / n) ** 0.5 + 0.01
    with pytest.raises(UserError, match="rare-class statistics cover"):
        TrainSet(coded(2, 10, 10), CropConfig(), seed=0, rcs=rcs)


def test_batches_stack_resume_and_split_over_ranks() -> None:
    ts = TrainSet(coded(7, 30, 40), CropConfig(crop=(12, 12)), seed=2)
    full = list(itertools.islice(batches(ts, 4, start_iter=0), 5))
    assert full[0]["image"].shape == (4, 3, 12, 12) and full[0]["label"].shape == (4, 12, 12)
    assert full[0]["index"].shape == (4,)
    # resume at iteration 3 = the uninterrupted run's batches from 3 on
    resumed = list(itertools.islice(batches(ts, 4, start_iter=3), 2))
    for a, b in zip(full[3:], resumed):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # two ranks of batch 2 together = one process with batch 4
    r0 = list(itertools.islice(batches(ts, 2, start_iter=0, rank=0, world_size=2), 5))
    r1 = list(itertools.islice(batches(ts, 2, start_iter=0, rank=1, world_size=2), 5))
    for a, b, c in zip(full, r0, r1):
        assert all(torch.equal(a[k], torch.cat([b[k], c[k]])) for k in a)


def test_worker_processes_give_the_same_batches() -> None:
    ts = TrainSet(coded(5, 30, 40), CropConfig(crop=(12, 12)), seed=4)
    plain = list(itertools.islice(batches(ts, 3, start_iter=2), 4))
    loaded = list(itertools.islice(batches(ts, 3, start_iter=2, workers=2), 4))
    for a, b in zip(plain, loaded):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input() -> None:
    with pytest.raises(UserError, match="empty"):
        TrainSet(InMemory(torch.zeros(0, 3, 4, 4, dtype=torch.uint8), torch.zeros(0, 4, 4)), CropConfig(), seed=0)
    mixed = [(torch.zeros(3, 4, 4, dtype=torch.uint8), torch.zeros(4, 4, dtype=torch.int64), "a"),
             (torch.zeros(3, 4, 6, dtype=torch.uint8), torch.zeros(4, 6, dtype=torch.int64), "b")]
    ts = TrainSet(mixed, CropConfig(), seed=0)
    with pytest.raises(UserError, match="different sizes"):
        for it in range(20):
            ts.batch(it, 0, 4)
    with pytest.raises(UserError, match="batch size"):
        next(batches(ts, 0, start_iter=0))
    with pytest.raises(UserError, match="recipe"):
        recipe_crops("dacs", "gta", "cityscapes")
    for bad in ({"crop": (0, 512)}, {"scale": (1280,)}, {"flip": 1.5}, {"cat_max_ratio": 0.0},
                {"pseudo_margins": (30, -1, 0, 0)}):
        with pytest.raises(UserError):
            CropConfig(**bad)  # type: ignore[arg-type]

"""Rare-class sampling against DAFormer's formulas computed by hand in numpy, and its cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from domainmerge.cli import main
from domainmerge.data import folder_dataset
from domainmerge.data import rcs as rcs_mod
from domainmerge.data.rcs import (
    RareClassSampler,
    cached_class_counts,
    class_pixel_counts,
    class_probabilities,
    default_cache_path,
)
from domainmerge.errors import UserError


def by_hand(counts: np.ndarray, temperature: float) -> np.ndarray:
    """softmax((1 - f) / T) over the classes present, written out."""
    total = counts.sum(0).astype(float)
    present = [c for c in range(counts.shape[1]) if total[c] > 0]
    f = {c: total[c] / sum(total[k] for k in present) for c in present}
    e = {c: np.exp((1 - f[c]) / temperature) for c in present}
    z = sum(e.values())
    return np.array([e[c] / z if c in e else 0.0 for c in range(counts.shape[1])])


COUNTS = np.array([[5000, 100, 0, 4000],
                   [3000, 0, 0, 3500],
                   [9000, 3100, 0, 0],
                   [1000, 2000, 0, 2999]])


@pytest.mark.parametrize("temperature", [0.01, 0.1, 0.5])
def test_class_probabilities_by_hand(temperature: float) -> None:
    np.testing.assert_allclose(class_probabilities(COUNTS, temperature), by_hand(COUNTS, temperature), rtol=1e-10)


def test_sampler_qualifying_images_and_probabilities() -> None:
    s = RareClassSampler(COUNTS, temperature=0.5, min_pixels=3000, min_crop_ratio=0.5)
    # more than 3000 pixels (strictly, as DAFormer): class 0 in images 0 and 2 (image 1 has exactly 3000);
    # class 1 in image 2; class 3 in images 0 and 1 (image 3 has 2999); class 2 nowhere
    assert s.samples_with_class[0].tolist() == [0, 2]
    assert s.samples_with_class[1].tolist() == [2]
    assert s.samples_with_class[3].tolist() == [0, 1]
    assert 2 not in s.samples_with_class
    np.testing.assert_allclose(s.class_probabilities.numpy(), by_hand(COUNTS, 0.5), rtol=1e-10)
    assert s.min_crop_pixels() == 1500


def test_class_without_qualifying_image_is_dropped_and_rest_renormalised() -> None:
    counts = np.array([[5000, 10, 4000], [6000, 20, 0]])
    s = RareClassSampler(counts, temperature=0.3, min_pixels=3000)
    p = by_hand(counts, 0.3)
    p[1] = 0
    np.testing.assert_allclose(s.class_probabilities.numpy(), p / p.sum(), rtol=1e-10)
    with pytest.raises(UserError, match="min_pixels"):
        RareClassSampler(counts, min_pixels=10**6)
    with pytest.raises(UserError, match="no labelled"):
        RareClassSampler(np.zeros((0, 19)))


def test_draws_are_pure_and_follow_the_probabilities() -> None:
    s = RareClassSampler(COUNTS, temperature=0.5, min_pixels=3000)
    assert s.draw(7, 100, 3) == s.draw(7, 100, 3)
    assert RareClassSampler(COUNTS, temperature=0.5, min_pixels=3000).draw(7, 100, 3) == s.draw(7, 100, 3)
    n = 4000
    classes = np.zeros(4)
    images: dict[int, set[int]] = {}
    for i in range(n):
        index, c = s.draw(0, i, i % 4)
        classes[c] += 1
        images.setdefault(c, set()).add(index)
        assert index in s.samples_with_class[c]
    expected = by_hand(COUNTS, 0.5)
    # binomial standard error at n=4000 is below 0.008; allow 4 of them
    np.testing.assert_allclose(classes / n, expected, atol=0.032)
    assert images[0] == {0, 2} and images[3] == {0, 1}      # every qualifying image gets drawn


class InMemory:
    def __init__(self, labels: torch.Tensor) -> None:
        self.labels = labels
        self.images = torch.zeros(len(labels), 3, *labels.shape[1:], dtype=torch.uint8)

    def __len__(self) -> int:
        return len(self.labels)


def random_labels(n: int, h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, 19, (n, h, w))
    lab[rng.random((n, h, w)) < 0.1] = 255
    lab[:, :2, :] = 4                         # class 4 common, class 18 rare
    return lab


def test_class_pixel_counts_in_memory_and_files(tmp_path: Path) -> None:
    lab = random_labels(5, 12, 16, 0)
    expected = np.stack([[int((x == c).sum()) for c in range(19)] for x in lab])
    np.testing.assert_array_equal(class_pixel_counts(InMemory(torch.from_numpy(lab))), expected)
    write_folder(tmp_path, lab)
    reader = folder_dataset(tmp_path, "train")
    np.testing.assert_array_equal(class_pixel_counts(reader), expected)
    np.testing.assert_array_equal(class_pixel_counts(reader, workers=2), expected)


def write_folder(root: Path, labels: np.ndarray, split: str = "train") -> None:
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    for i, lab in enumerate(labels):
        Image.fromarray(np.zeros((*lab.shape, 3), np.uint8)).save(root / "images" / split / f"{i:03d}.png")
        Image.fromarray(lab.astype(np.uint8)).save(root / "labels" / split / f"{i:03d}.png")


def test_cache_written_reused_and_invalidated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lab = random_labels(4, 10, 10, 1)
    write_folder(tmp_path, lab)
    reader = folder_dataset(tmp_path, "train")
    counts, path = cached_class_counts(reader)
    assert path == tmp_path / "labels" / "domainmerge_rcs_train.json" == default_cache_path(reader)
    saved = json.loads(path.read_text())
    assert saved["files"] == ["000", "001", "002", "003"] and saved["counts"] == counts.tolist()

    calls = []
    real = rcs_mod.class_pixel_counts
    monkeypatch.setattr(rcs_mod, "class_pixel_counts", lambda *a, **k: calls.append(1) or real(*a, **k))
    again, _ = cached_class_counts(folder_dataset(tmp_path, "train"))
    assert calls == [] and np.array_equal(again, counts)          # read from the cache

    # a label file changes: recomputed, and the new counts are right
    lab[2] = 7
    Image.fromarray(lab[2].astype(np.uint8)).save(tmp_path / "labels" / "train" / "002.png")
    st = (tmp_path / "labels" / "train" / "002.png").stat()
    os.utime(tmp_path / "labels" / "train" / "002.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed, _ = cached_class_counts(folder_dataset(tmp_path, "train"))
    assert calls == [1] and changed[2].tolist() == [0] * 7 + [100] + [0] * 11

    # a file added: recomputed
    Image.fromarray(np.full((10, 10, 3), 0, np.uint8)).save(tmp_path / "images" / "train" / "009.png")
    Image.fromarray(np.full((10, 10), 3, np.uint8)).save(tmp_path / "labels" / "train" / "009.png")
    grown, _ = cached_class_counts(folder_dataset(tmp_path, "train"))
    assert len(calls) == 2 and len(grown) == 5 and grown[4][3] == 100


def test_cache_falls_back_when_dataset_folder_is_not_writable(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    write_folder(tmp_path / "ds", random_labels(2, 8, 8, 2))
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder would be: writes below it fail")
    monkeypatch.setattr(rcs_mod, "default_cache_path", lambda reader: blocker / "rcs.json")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    reader = folder_dataset(tmp_path / "ds", "train")
    counts, path = cached_class_counts(reader)
    assert path is not None and path.is_relative_to(tmp_path / "xdg" / "domainmerge" / "rcs")
    assert json.loads(path.read_text())["counts"] == counts.tolist()
    _, again = cached_class_counts(folder_dataset(tmp_path / "ds", "train"))
    assert again == path


def test_from_dataset_in_memory_matches_counts() -> None:
    lab = random_labels(6, 40, 40, 3)
    s = RareClassSampler.from_dataset(InMemory(torch.from_numpy(lab)), temperature=0.2, min_pixels=60)
    counts = np.stack([[int((x == c).sum()) for c in range(19)] for x in lab])
    np.testing.assert_allclose(s.class_probabilities.numpy()[counts.max(0) > 60],
                               (lambda p: p / p.sum())(by_hand(counts, 0.2)[counts.max(0) > 60]), rtol=1e-10)


def test_convert_labels_writes_rcs_statistics(tmp_path: Path) -> None:
    root = tmp_path / "gta"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 34, (3, 9, 11)).astype(np.uint8)
    for i in range(3):
        Image.fromarray(np.zeros((9, 11, 3), np.uint8)).save(root / "images" / f"{i:05d}.png")
        Image.fromarray(raw[i]).save(root / "labels" / f"{i:05d}.png")
    assert main(["convert-labels", "gta", str(root), "--rcs-split", "train"]) == 0
    saved = json.loads((root / "domainmerge_rcs_labels.json").read_text())
    from domainmerge.data.labels import CITYSCAPES_ID_TO_TRAIN_ID
    for i in range(3):
        train = np.vectorize(lambda v: CITYSCAPES_ID_TO_TRAIN_ID.get(int(v), 255))(raw[i])
        assert saved["counts"][i] == [int((train == c).sum()) for c in range(19)]
    assert main(["convert-labels", "gta", str(root), "--rcs-split", "val"]) == 2


def _rank_counts(rank: int, world: int, port: int, root: str, out: str) -> None:
    """One gloo rank: count (rank 0 only, wrapped to record calls) and save what it got."""
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=world)
    calls: list[int] = []
    real = rcs_mod.class_pixel_counts
    rcs_mod.class_pixel_counts = lambda *a, **k: calls.append(1) or real(*a, **k)  # type: ignore[assignment]
    try:
        counts, path = cached_class_counts(folder_dataset(root, "train"))
    except UserError as exc:
        (Path(out) / f"{rank}.txt").write_text(f"error {exc}")
    else:
        np.save(Path(out) / f"{rank}.npy", counts)
        (Path(out) / f"{rank}.txt").write_text(f"{len(calls)} {path}")
    dist.destroy_process_group()


def test_under_torchrun_rank_zero_counts_and_shares(tmp_path: Path) -> None:
    import socket

    lab = random_labels(3, 9, 9, 4)
    write_folder(tmp_path / "ds", lab)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    torch.multiprocessing.spawn(_rank_counts, args=(2, port, str(tmp_path / "ds"), str(tmp_path)), nprocs=2)
    expected = np.stack([[int((x == c).sum()) for c in range(19)] for x in lab])
    for rank in (0, 1):
        np.testing.assert_array_equal(np.load(tmp_path / f"{rank}.npy"), expected)
    cache = tmp_path / "ds" / "labels" / "domainmerge_rcs_train.json"
    assert (tmp_path / "0.txt").read_text() == f"1 {cache}"      # rank 0 computed and wrote
    assert (tmp_path / "1.txt").read_text() == f"0 {cache}"      # rank 1 only received

    # a bad label found by rank 0 fails every rank with its message (no rank left waiting)
    bad = lab.copy()
    bad[1, 0, 0] = 77
    write_folder(tmp_path / "bad", bad)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    torch.multiprocessing.spawn(_rank_counts, args=(2, port, str(tmp_path / "bad"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        assert (tmp_path / f"{rank}.txt").read_text().startswith("error ")
        assert "label value 77 is not a train id" in (tmp_path / f"{rank}.txt").read_text()

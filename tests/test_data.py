"""Dataset readers and label conversion on tiny fake trees in the layouts of PAPER.md."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from domainmerge.cli import main
from domainmerge.data import build_dataset, register_dataset
from domainmerge.errors import UserError

H, W = 32, 64

# Written out by hand from cityscapesScripts' labels.py (PAPER.md lists the same pairs).
CS_ID_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                  24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
# IDD level-3 classes that exist among the 19 (from IDD's anue_labels.py level3Id/csTrainId).
IDD_L3_TO_TRAIN = {0: 0, 2: 1, 3: 9, 4: 11, 5: 12, 6: 17, 7: 18, 9: 13, 10: 14, 11: 15, 14: 3,
                   15: 4, 18: 7, 19: 6, 20: 5, 22: 2, 24: 8, 25: 10}


def by_hand(ids: np.ndarray, table: dict[int, int]) -> np.ndarray:
    out = np.full(ids.shape, 255, dtype=np.int64)
    for y in range(ids.shape[0]):
        for x in range(ids.shape[1]):
            out[y, x] = table.get(int(ids[y, x]), 255)
    return out


def rgb(path: Path, seed: int) -> np.ndarray:
    arr = np.random.default_rng(seed).integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return arr


def ids_png(path: Path, ids: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(ids.astype(np.uint8))
    if palette:   # GTA5 ships palette ('P') PNGs whose indices are the ids
        im.putpalette([(i * 7) % 256 for i in range(768)])   # 'L' -> 'P', pixel values kept
        assert im.mode == "P"
    im.save(path)


def raw_ids(seed: int, high: int = 34) -> np.ndarray:
    """Every id 0..high-1 appears, then random ones."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, high, size=H * W)
    ids[:high] = np.arange(high)
    return ids.reshape(H, W)


def train_ids(seed: int) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(0, 19, size=(H, W))
    ids[0, :5] = 255
    return ids


def convert(dataset: str, root: Path, *extra: str) -> int:
    return main(["convert-labels", dataset, str(root), *extra])


def test_cityscapes_convert_then_read(tmp_path: Path) -> None:
    root = tmp_path / "cityscapes"
    raws = {}
    for i, (city, split) in enumerate([("frankfurt", "val"), ("lindau", "val"), ("aachen", "train")]):
        stem = f"{city}_000000_00001{i}"
        rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", i)
        raws[stem] = raw_ids(i)
        ids_png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", raws[stem])
        ids_png(root / "gtFine" / split / city / f"{stem}_gtFine_color.png", raws[stem])  # ignored
    assert convert("cityscapes", root) == 0
    ds = build_dataset("cityscapes", root, "val")
    assert len(ds) == 2
    names = []
    for image, label, name in (ds[i] for i in range(len(ds))):
        assert image.dtype == torch.uint8 and image.shape == (3, H, W)
        assert label.dtype == torch.int64 and label.shape == (H, W)
        stem = name.split("/")[-1]
        np.testing.assert_array_equal(label.numpy(), by_hand(raws[stem], CS_ID_TO_TRAIN))
        names.append(name)
    assert names == ["frankfurt/frankfurt_000000_000010", "lindau/lindau_000000_000011"]
    image0 = np.asarray(Image.open(root / "leftImg8bit/val/frankfurt/frankfurt_000000_000010_leftImg8bit.png"))
    np.testing.assert_array_equal(ds[0][0].permute(1, 2, 0).numpy(), image0)
    assert len(build_dataset("cityscapes", root, "train")) == 1


def test_convert_is_idempotent_and_parallel_gives_same(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "gta"
    for i in range(1, 5):
        rgb(root / "images" / f"{i:05d}.png", i)
        ids_png(root / "labels" / f"{i:05d}.png", raw_ids(i), palette=True)
    assert convert("gta", root) == 0
    assert "wrote 4" in capsys.readouterr().err
    out = root / "labels" / "00001_labelTrainIds.png"
    first = out.read_bytes()
    mtime = out.stat().st_mtime_ns
    assert convert("gta", root) == 0
    assert "wrote 0, 4 already up to date" in capsys.readouterr().err
    assert out.stat().st_mtime_ns == mtime
    # A newer source is converted again; a parallel run writes identical files.
    src = root / "labels" / "00002.png"
    os.utime(src, (src.stat().st_atime + 10, src.stat().st_mtime + 10))
    assert convert("gta", root, "--workers", "2") == 0
    assert "wrote 1, 3 already up to date" in capsys.readouterr().err
    assert out.read_bytes() == first
    assert not [p for p in (root / "labels").iterdir() if p.name.startswith(".")]   # no temp files
    ds = build_dataset("gta", root, "train")
    assert len(ds) == 4
    for i in range(4):
        np.testing.assert_array_equal(ds[i][1].numpy(), by_hand(raw_ids(i + 1), CS_ID_TO_TRAIN))


def test_idd_cs_train_ids_and_level3(tmp_path: Path) -> None:
    root = tmp_path / "idd"
    cs = raw_ids(1, high=23)   # csTrainIds 0..22: 19-22 are IDD-only classes in some releases
    cs[0, :3] = 255
    rgb(root / "leftImg8bit/val/0/000001_leftImg8bit.png", 1)
    ids_png(root / "gtFine/val/0/000001_gtFine_labelcsTrainIds.png", cs)
    ids_png(root / "gtFine/val/0/000001_gtFine_labellevel3Ids.png", raw_ids(9, high=26))  # cs wins
    level3 = raw_ids(2, high=26)
    level3[1, :2] = 255
    rgb(root / "leftImg8bit/val/1/000002_leftImg8bit.png", 2)
    ids_png(root / "gtFine/val/1/000002_gtFine_labellevel3Ids.png", level3)
    assert convert("idd", root) == 0
    ds = build_dataset("idd", root, "val")
    labels = {name: label.numpy() for _, label, name in (ds[i] for i in range(len(ds)))}
    np.testing.assert_array_equal(labels["0/000001"], np.where(cs <= 18, cs, 255))
    np.testing.assert_array_equal(labels["1/000002"], by_hand(level3, IDD_L3_TO_TRAIN))


def test_acdc_and_dark_zurich_layouts(tmp_path: Path) -> None:
    acdc = tmp_path / "acdc"
    for split in ("train", "val"):
        rgb(acdc / "rgb_anon" / split / f"GOPR0475_frame_0000{split}_rgb_anon.png", 3)
        ids_png(acdc / "gt" / split / f"GOPR0475_frame_0000{split}_gt_labelTrainIds.png", train_ids(3))
    image, label, name = build_dataset("acdc", acdc, "val")[0]
    assert name == "GOPR0475_frame_0000val"
    np.testing.assert_array_equal(label.numpy(), train_ids(3))

    # ACDC as downloaded keeps a folder per condition above the split: the split names the path.
    rgb(acdc / "rgb_anon/fog/val/GOPR0476/GOPR0476_frame_000001_rgb_anon.png", 5)
    ids_png(acdc / "gt/fog/val/GOPR0476/GOPR0476_frame_000001_gt_labelTrainIds.png", train_ids(5))
    fog = build_dataset("acdc", acdc, "fog/val")
    assert len(fog) == 1 and fog[0][2] == "GOPR0476/GOPR0476_frame_000001"
    np.testing.assert_array_equal(fog[0][1].numpy(), train_ids(5))

    dz = tmp_path / "dark_zurich"
    rgb(dz / "rgb_anon/val/night/GOPR0356/GOPR0356_000000_rgb_anon.png", 4)
    ids_png(dz / "gt/val/night/GOPR0356/GOPR0356_000000_gt_labelTrainIds.png", train_ids(4))
    for i in range(3):   # the training split has no labels
        rgb(dz / f"rgb_anon/train/night/GOPR0351/GOPR0351_00000{i}_rgb_anon.png", 10 + i)
    val = build_dataset("darkzurich", dz, "val")
    assert val[0][2] == "night/GOPR0356/GOPR0356_000000"
    np.testing.assert_array_equal(val[0][1].numpy(), train_ids(4))
    train = build_dataset("darkzurich", dz, "train", labels=False)
    assert len(train) == 3 and bool((train[0][1] == 255).all()) and train[0][0].shape == (3, H, W)
    with pytest.raises(UserError, match="gt/train"):
        build_dataset("darkzurich", dz, "train")


def test_folder_reader_with_custom_suffixes(tmp_path: Path) -> None:
    rgb(tmp_path / "img/a/x.jpg.png", 1)
    ids_png(tmp_path / "ann/a/x_mask.png", train_ids(1))
    ds = build_dataset("folder", tmp_path, "", image_dir="img", label_dir="ann",
                       image_suffix=".jpg.png", label_suffix="_mask.png")
    assert len(ds) == 1 and ds[0][2] == "a/x"
    np.testing.assert_array_equal(ds[0][1].numpy(), train_ids(1))


def test_folder_reader_default_layout_same_suffix(tmp_path: Path) -> None:
    # images/val/a.png with labels/val/a.png: equal suffixes in separate folders
    for i in range(2):
        rgb(tmp_path / f"images/val/s{i}.png", i)
        ids_png(tmp_path / f"labels/val/s{i}.png", train_ids(i))
    ds = build_dataset("folder", tmp_path, "val")
    assert [ds[i][2] for i in range(len(ds))] == ["s0", "s1"]
    np.testing.assert_array_equal(ds[1][1].numpy(), train_ids(1))


def make_cityscapes_val(root: Path, n: int = 3) -> None:
    for i in range(n):
        rgb(root / f"leftImg8bit/val/ulm/ulm_{i:06d}_leftImg8bit.png", i)
        ids_png(root / f"gtFine/val/ulm/ulm_{i:06d}_gtFine_labelTrainIds.png", train_ids(i))


def test_missing_folder_names_path_and_layout(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"leftImg8bit/val.*not found.*cityscapes layout"):
        build_dataset("cityscapes", tmp_path, "val")
    with pytest.raises(UserError, match="unknown dataset kind 'kitti'"):
        build_dataset("kitti", tmp_path, "val")


def test_image_without_label_strict_and_lenient(tmp_path: Path) -> None:
    make_cityscapes_val(tmp_path)
    (tmp_path / "gtFine/val/ulm/ulm_000001_gtFine_labelTrainIds.png").unlink()
    with pytest.raises(UserError, match=r"ulm_000001_leftImg8bit\.png: image without label .*"
                                        r"ulm_000001_gtFine_labelTrainIds\.png"):
        build_dataset("cityscapes", tmp_path, "val")
    with pytest.warns(UserWarning, match="skipped 1"):
        ds = build_dataset("cityscapes", tmp_path, "val", strict=False)
    assert [ds[i][2] for i in range(len(ds))] == ["ulm/ulm_000000", "ulm/ulm_000002"]
    assert len(ds.skipped) == 1


def test_label_without_image(tmp_path: Path) -> None:
    make_cityscapes_val(tmp_path)
    (tmp_path / "leftImg8bit/val/ulm/ulm_000002_leftImg8bit.png").unlink()
    with pytest.raises(UserError, match="ulm_000002_gtFine_labelTrainIds.png: label without image"):
        build_dataset("cityscapes", tmp_path, "val")
    with pytest.warns(UserWarning):
        assert len(build_dataset("cityscapes", tmp_path, "val", strict=False)) == 2


def test_unreadable_image_and_size_mismatch(tmp_path: Path) -> None:
    make_cityscapes_val(tmp_path)
    (tmp_path / "leftImg8bit/val/ulm/ulm_000000_leftImg8bit.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="ulm_000000_leftImg8bit.png: unreadable image"):
        build_dataset("cityscapes", tmp_path, "val")
    ids_png(tmp_path / "gtFine/val/ulm/ulm_000001_gtFine_labelTrainIds.png", np.zeros((H, W + 1)))
    with pytest.warns(UserWarning, match="skipped 2"):
        ds = build_dataset("cityscapes", tmp_path, "val", strict=False)
    assert len(ds) == 1


def test_raw_ids_in_train_id_file_are_rejected(tmp_path: Path) -> None:
    make_cityscapes_val(tmp_path, n=1)
    ids_png(tmp_path / "gtFine/val/ulm/ulm_000000_gtFine_labelTrainIds.png", raw_ids(0))
    ds = build_dataset("cityscapes", tmp_path, "val")
    with pytest.raises(UserError, match=r"not a train id.*domainmerge\.data\.convert\.convert_labels") as info:
        ds[0]
    assert "`domainmerge convert-labels DATASET ROOT`" in info.value.for_command()   # on the command line


def test_register_dataset(tmp_path: Path) -> None:
    calls = []

    def factory(root: Path, split: str, *, strict: bool = True, size: int = 2) -> list[int]:
        calls.append((root, split, strict, size))
        return list(range(size))

    register_dataset("test-only-kind", factory)
    assert build_dataset("test-only-kind", tmp_path, "val", strict=False, size=3) == [0, 1, 2]
    assert calls == [(tmp_path, "val", False, 3)]
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("test-only-kind", factory)


def test_convert_labels_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert convert("kitti", tmp_path) == 2
    assert convert("cityscapes", tmp_path / "nope") == 2
    assert convert("cityscapes", tmp_path) == 2   # root exists, gtFine does not
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("domainmerge convert-labels: error:") for line in err)
    assert "gtFine" in err[2]


def test_every_reader_is_a_seg_dataset() -> None:
    from domainmerge.data import SegDataset, build_dataset
    from domainmerge.data.readers import PairedFolderDataset

    assert isinstance(build_dataset("synthetic", "city", "val", length=1, size=(8, 16)), SegDataset)
    assert issubclass(PairedFolderDataset, SegDataset)
    assert not isinstance(3, SegDataset)

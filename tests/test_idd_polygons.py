"""convert-labels idd on the release as downloaded: *_gtFine_polygons.json drawn into train ids."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from domainmerge.cli import main
from domainmerge.data import build_dataset
from domainmerge.data.labels import IDD_NAME_TO_TRAIN_ID, rasterize_polygons
from domainmerge.errors import UserError

H, W = 32, 64

# Train ids written out by hand from the csTrainId column of the IDD tools' anue_labels.py.
ROAD, SKY, CAR, BUILDING, VEGETATION, PERSON = 0, 10, 13, 2, 8, 11

# Every object below is an axis-aligned rectangle with integer corners (x0, y0)-(x1, y1). PIL's
# polygon drawing includes the boundary pixels, so it covers exactly rows y0..y1 and columns
# x0..x1, inclusive: the numpy slice [y0:y1 + 1, x0:x1 + 1]. With integer corners no pixel is
# partly covered, so the expected maps below are unambiguous.


def rect(label: str, x0: int, y0: int, x1: int, y1: int, deleted: int = 0) -> dict[str, Any]:
    return {"label": label, "polygon": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]], "deleted": deleted,
            "verified": 0, "date": "2018-01-01", "user": "anonymous", "id": 0}


def write_frame(root: Path, split: str, seq: str, frame: str, objects: list[dict[str, Any]]) -> Path:
    image = root / "leftImg8bit" / split / seq / f"{frame}_leftImg8bit.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((H, W, 3), dtype=np.uint8)).save(image)
    ann = root / "gtFine" / split / seq / f"{frame}_gtFine_polygons.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps({"imgHeight": H, "imgWidth": W, "objects": objects}), encoding="utf-8")
    return ann


def frame_a() -> tuple[list[dict[str, Any]], np.ndarray]:
    objects = [
        rect("road", 0, 16, 63, 31),
        rect("sky", 0, 0, 63, 9),
        rect("car", 10, 12, 29, 25),            # later, so it covers the road it overlaps
        rect("person", 40, 2, 50, 20, deleted=1),   # deleted: must leave sky/road/background
        rect("cargroup", 50, 20, 59, 27),       # unknown name ending in 'group' -> 'car'
        rect("polegroup", 35, 18, 37, 30),      # a label of its own, csTrainId 255, over road
    ]
    expected = np.full((H, W), 255, dtype=np.int64)
    expected[16:32, 0:64] = ROAD
    expected[0:10, 0:64] = SKY
    expected[12:26, 10:30] = CAR
    expected[20:28, 50:60] = CAR
    expected[18:31, 35:38] = 255
    return objects, expected


def frame_b() -> tuple[list[dict[str, Any]], np.ndarray]:
    objects = [
        rect("building", 0, 0, 40, 20),
        rect("vegetation", 30, 5, 63, 31),      # over the building's right part
        rect("person", 5, 10, 8, 30),           # over building and background
        rect("flying saucer", 0, 0, 5, 5, deleted=1),   # deleted objects are never looked up
    ]
    expected = np.full((H, W), 255, dtype=np.int64)
    expected[0:21, 0:41] = BUILDING
    expected[5:32, 30:64] = VEGETATION
    expected[10:31, 5:9] = PERSON
    return objects, expected


def convert(root: Path) -> int:
    return main(["convert-labels", "idd", str(root)])


def test_polygons_convert_then_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "idd"
    objs_a, exp_a = frame_a()
    objs_b, exp_b = frame_b()
    ann_a = write_frame(root, "val", "0", "000001", objs_a)
    write_frame(root, "val", "7", "000002", objs_b)
    assert convert(root) == 0
    assert "wrote 2, 0 already up to date" in capsys.readouterr().err
    out_a = root / "gtFine/val/0/000001_gtFine_labelTrainIds.png"
    out_b = root / "gtFine/val/7/000002_gtFine_labelTrainIds.png"
    with Image.open(out_a) as im:
        assert im.mode == "L" and im.size == (W, H)
        np.testing.assert_array_equal(np.array(im), exp_a)
    with Image.open(out_b) as im:
        np.testing.assert_array_equal(np.array(im), exp_b)
    assert not [p for p in (root / "gtFine/val/0").iterdir() if p.name.startswith(".")]   # no temp files

    ds = build_dataset("idd", root, "val")
    labels = {name: label.numpy() for _, label, name in (ds[i] for i in range(len(ds)))}
    assert sorted(labels) == ["0/000001", "7/000002"]
    np.testing.assert_array_equal(labels["0/000001"], exp_a)
    np.testing.assert_array_equal(labels["7/000002"], exp_b)

    # Idempotent: up-to-date outputs are kept; a newer annotation is drawn again.
    mtime = out_a.stat().st_mtime_ns
    assert convert(root) == 0
    assert "wrote 0, 2 already up to date" in capsys.readouterr().err
    assert out_a.stat().st_mtime_ns == mtime
    os.utime(ann_a, (ann_a.stat().st_atime + 10, ann_a.stat().st_mtime + 10))
    assert convert(root) == 0
    assert "wrote 1, 1 already up to date" in capsys.readouterr().err
    with Image.open(out_a) as im:
        np.testing.assert_array_equal(np.array(im), exp_a)


def test_png_source_wins_over_polygons(tmp_path: Path) -> None:
    root = tmp_path / "idd"
    objs, _ = frame_a()
    write_frame(root, "val", "0", "000001", objs)
    cs = np.full((H, W), 4, dtype=np.uint8)   # all 'fence' in the csTrainIds PNG
    cs[0, 0] = 20                             # an IDD-only id (19-22 in some releases) -> 255
    Image.fromarray(cs).save(root / "gtFine/val/0/000001_gtFine_labelcsTrainIds.png")
    assert convert(root) == 0
    expected = np.full((H, W), 4, dtype=np.int64)
    expected[0, 0] = 255
    with Image.open(root / "gtFine/val/0/000001_gtFine_labelTrainIds.png") as im:
        np.testing.assert_array_equal(np.array(im), expected)


def test_unknown_label_exits_2_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "idd"
    ann = write_frame(root, "val", "3", "000005", [rect("road", 0, 16, 63, 31), rect("flying saucer", 1, 1, 9, 9)])
    assert convert(root) == 2
    err = capsys.readouterr().err   # the progress bar shares stderr
    errors = [e for e in err.splitlines() if "domainmerge convert-labels: error:" in e]
    assert len(errors) == 1
    assert "'flying saucer'" in errors[0] and str(ann) in errors[0]
    assert sorted(p.name for p in ann.parent.iterdir()) == [ann.name]   # no output, no temp file


def test_malformed_annotation_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "idd"
    ann = write_frame(root, "val", "3", "000005", [])
    ann.write_text("{not json", encoding="utf-8")
    assert convert(root) == 2
    assert str(ann) in capsys.readouterr().err
    ann.write_text(json.dumps({"imgHeight": H, "objects": []}), encoding="utf-8")
    assert convert(root) == 2
    assert "imgWidth" in capsys.readouterr().err
    assert sorted(p.name for p in ann.parent.iterdir()) == [ann.name]


def test_rasterize_polygons_direct() -> None:
    ann = {"imgHeight": 4, "imgWidth": 5,
           "objects": [rect("sky", 0, 0, 4, 3), rect("road", 1, 1, 2, 2), rect("sky", 2, 2, 2, 2, deleted=1)]}
    expected = np.array([[10, 10, 10, 10, 10],
                         [10, 0, 0, 10, 10],
                         [10, 0, 0, 10, 10],
                         [10, 10, 10, 10, 10]], dtype=np.uint8)
    out = rasterize_polygons(ann, IDD_NAME_TO_TRAIN_ID)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
    with pytest.raises(UserError, match=r"some/file\.json: object 0 has unknown label 'bogusgroup'"):
        rasterize_polygons({"imgHeight": 2, "imgWidth": 2, "objects": [rect("bogusgroup", 0, 0, 1, 1)]},
                           IDD_NAME_TO_TRAIN_ID, source="some/file.json")


def test_idd_name_table_covers_each_train_id_once() -> None:
    # anue_labels.py has 40 labels; exactly one of them carries each of the 19 train ids.
    assert len(IDD_NAME_TO_TRAIN_ID) == 40
    used = sorted(v for v in IDD_NAME_TO_TRAIN_ID.values() if v != 255)
    assert used == list(range(19))
    assert {IDD_NAME_TO_TRAIN_ID[n] for n in ("non-drivable fallback", "train", "polegroup", "autorickshaw")} \
        == {9, 16, 255}

"""`evaluate --protocol`: the settings resolved from the checkpoint's family and the dataset kind,
printed before each domain runs and stored in the JSON, checked against an independent
computation (OpenCV resize, numpy normalisation, the network, numpy confusion)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from domainmerge.checkpoint import save_checkpoint
from domainmerge.cli import main
from domainmerge.models import build_model

FAST = ["--device", "cpu", "--workers", "0"]  # not --quiet: the protocol lines are checked
H, W = 600, 1000  # ACDC-like 5:3 images; the authors' ACDC scale (960, 540) shrinks them to 540x900


@pytest.fixture(scope="module")
def acdc(tmp_path_factory):
    root = tmp_path_factory.mktemp("acdc")
    rng = np.random.default_rng(0)
    for i in range(2):
        (root / "rgb_anon" / "val").mkdir(parents=True, exist_ok=True)
        (root / "gt" / "val").mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (H // 50, W // 50, 3)).astype(np.uint8)
        Image.fromarray(small).resize((W, H), Image.BILINEAR).save(root / "rgb_anon" / "val" / f"s{i}_rgb_anon.png")
        lab = rng.integers(0, 19, (H, W)).astype(np.uint8)
        Image.fromarray(lab).save(root / "gt" / "val" / f"s{i}_gt_labelTrainIds.png")
    torch.manual_seed(0)
    net = build_model("tiny_daformer_r").eval()
    # A random head with decisive logits: mmseg's conv_seg init, Normal(0, 0.01), leaves near ties whose
    # arg-max flips with float rounding between the evaluation and the hand computation.
    net.decode_head.conv_seg.reset_parameters()
    ckpt = save_checkpoint(root / "daf.pth", net.state_dict(), container="mmseg")
    return {"root": root, "net": net, "ckpt": ckpt}


def miou_by_hand(net, root: Path, size: tuple[int, int] | None) -> float:
    """cv2 resize of the uint8 image (size = (h, w)), normalise, network, logits to label size."""
    mean = np.array([123.675, 116.28, 103.53])
    std = np.array([58.395, 57.12, 57.375])
    conf = np.zeros((19, 19), dtype=np.int64)
    for img_path in sorted((root / "rgb_anon" / "val").glob("*.png")):
        img = np.asarray(Image.open(img_path).convert("RGB"))
        lab = np.asarray(Image.open(str(img_path).replace("rgb_anon", "gt").replace("gt.png", "gt_labelTrainIds.png")))
        if size:
            img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        x = torch.from_numpy(((img - mean) / std).transpose(2, 0, 1)).float()[None]
        with torch.no_grad():
            pred = F.interpolate(net(x), size=lab.shape, mode="bilinear", align_corners=False).argmax(1)[0].numpy()
        np.add.at(conf, (lab.astype(np.int64).ravel(), pred.ravel()), 1)
    tp = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - tp
    return float(np.nanmean(np.where(union > 0, tp / np.maximum(union, 1), np.nan)) * 100)


def run(acdc, extra: list[str], name: str, capsys) -> tuple[dict, str]:
    out = acdc["root"] / f"{name}.json"
    argv = ["evaluate", str(acdc["ckpt"]), "--domain", "fog", "acdc", str(acdc["root"]), *extra, "--json", str(out),
            "--force", *FAST]
    assert main(argv) == 0
    return json.loads(out.read_text()), capsys.readouterr().err


def test_default_is_the_authors_protocol(acdc, capsys):
    res, err = run(acdc, [], "authors", capsys)
    row = res["results"]["daf"]
    assert row["protocol"]["fog"] == {
        "name": "authors", "mode": "whole", "crop": None, "stride": None, "img_scale": [960, 540],
        "source": row["protocol"]["fog"]["source"]}
    assert "uda_cityscapes_to_acdc_512x512.py" in row["protocol"]["fog"]["source"]
    assert "daf | fog: authors: resize to fit 960x540, whole image (lhoyer/DAFormer" in err
    # min(960 / 1000, 540 / 600) = 0.9: 540 x 900
    assert row["domains"]["fog"]["miou"] == pytest.approx(miou_by_hand(acdc["net"], acdc["root"], (540, 900)),
                                                          abs=1e-9)
    assert res["settings"]["protocol"] is None


def test_mtda_and_custom(acdc, capsys):
    res, err = run(acdc, ["--protocol", "mtda"], "mtda", capsys)
    p = res["results"]["daf"]["protocol"]["fog"]
    assert (p["name"], p["img_scale"]) == ("mtda", [960, 540]) and "no multi-target test config" in p["source"]
    res, err = run(acdc, ["--img-scale", "500", "300"], "custom", capsys)
    p = res["results"]["daf"]["protocol"]["fog"]
    assert (p["name"], p["mode"], p["img_scale"]) == ("custom", "whole", [500, 300])
    assert "daf | fog: custom: resize to fit 500x300, whole image (command-line options)" in err
    assert res["results"]["daf"]["domains"]["fog"]["miou"] == pytest.approx(
        miou_by_hand(acdc["net"], acdc["root"], (300, 500)), abs=1e-9)


def test_authors_with_explicit_settings_is_a_one_line_error(acdc, capsys):
    argv = ["evaluate", str(acdc["ckpt"]), "--domain", "fog", "acdc", str(acdc["root"]), "--protocol", "authors",
            "--mode", "slide", *FAST]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--protocol authors" in err and "--mode" in err and "Traceback" not in err
    assert main([*argv[:-len(FAST) - 4], "--mode", "slide", "--max-windows", "0", *FAST]) == 2
    assert "--max-windows 0" in capsys.readouterr().err


def test_recalibrate_uses_the_same_resolution(acdc, capsys):
    out = acdc["root"] / "recal.pth"
    argv = ["recalibrate", str(acdc["ckpt"]), "--domain", "fog", "acdc", str(acdc["root"]), "val", "--images", "1",
            "-o", str(out), "--device", "cpu", "--force"]
    assert main(argv) == 0
    assert "image scale: fog 960x540" in capsys.readouterr().out
    assert main([*argv, "--img-scale", "500", "300"]) == 0
    assert "image scale: fog 500x300" in capsys.readouterr().out


def test_lmc_uses_the_same_resolution(acdc, capsys):
    out = acdc["root"] / "lmc"
    assert main(["lmc", str(acdc["ckpt"]), str(acdc["ckpt"]), "--steps", "2", "--out", str(out), "--force",
                 "--domain", "fog", "acdc", str(acdc["root"]), *FAST]) == 0
    assert "fog: authors: resize to fit 960x540, whole image" in capsys.readouterr().err
    data = json.loads((out / "lmc.json").read_text())
    assert data["protocol"]["fog"]["img_scale"] == [960, 540]
    # Both end points are the same network: its score under the authors' protocol, computed by hand.
    want = miou_by_hand(acdc["net"], acdc["root"], (540, 900))
    assert [p["scores"]["fog"] for p in data["points"]] == pytest.approx([want, want], abs=1e-9)

"""Corners of evaluate and recalibrate: impossible window settings, predictions that exist,
NaN checkpoints, and the error as the last line even with a progress bar open."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from domainmerge.cli import main
from domainmerge.errors import UserError
from domainmerge.evaluation.protocols import resolve


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from domainmerge.models import build_model

    folder = tmp_path_factory.mktemp("ck")
    torch.manual_seed(0)
    sd = build_model("tiny_daformer_r").state_dict()
    torch.save({"state_dict": sd}, folder / "m.pth")
    key = next(k for k, v in sd.items() if v.is_floating_point() and k.endswith("weight"))
    torch.save({"state_dict": {**sd, key: torch.full_like(sd[key], float("nan"))}}, folder / "nan.pth")
    return folder


DOMAIN = ["--domain", "city", "synthetic", "city", "val", "--device", "cpu", "--quiet"]


def _last_line_is_the_error(err: str, needle: str) -> None:
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    assert lines and needle in lines[-1] and "Traceback" not in err, err


@pytest.mark.parametrize("options, needle", [
    (["--crop", "0", "0"], "--crop 0 0: must be two positive sizes"),
    (["--img-scale", "-5", "10"], "--img-scale -5 10: must be two positive sizes"),
    (["--mode", "slide", "--crop", "32", "32", "--stride", "64", "64"], "no prediction"),
    (["--mode", "slide", "--stride", "2048", "2048"],
     "--stride (2048, 2048) is larger than the windows --crop (1024, 1024)"),
])
def test_impossible_window_settings_are_one_line_errors(ckpts, capsys, options, needle):
    assert main(["evaluate", str(ckpts / "m.pth"), *DOMAIN, *options]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_a_stride_up_to_the_crop_covers_every_pixel_and_python_names_options():
    p = resolve("daformer", "synthetic", mode="slide", crop=(32, 32), stride=(32, 32))
    assert p.stride == (32, 32)
    with pytest.raises(UserError, match=r"^stride \(33, 32\) is larger than the windows crop \(32, 32\)"):
        resolve("daformer", "synthetic", mode="slide", crop=(32, 32), stride=(33, 32))


def test_save_pred_keeps_existing_predictions_without_force(ckpts, tmp_path, capsys):
    pred = tmp_path / "pred"
    args = ["evaluate", str(ckpts / "m.pth"), "--domain", "city", "synthetic", "city", "val", "--device", "cpu",
            "--quiet", "--save-pred", str(pred)]
    assert main(args) == 0
    files = sorted((pred / "city").glob("*.png"))
    assert len(files) == 100
    (files[0]).write_bytes(b"mine")
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--force" in err and str(pred / "city") in err, err
    assert files[0].read_bytes() == b"mine"
    assert main([*args, "--force"]) == 0
    assert files[0].read_bytes() != b"mine" and len(list((pred / "city").glob("*.png"))) == 100


def test_recalibrate_refuses_a_nan_checkpoint(ckpts, tmp_path, capsys):
    out = tmp_path / "rec.pth"
    assert main(["recalibrate", str(ckpts / "nan.pth"), "-o", str(out), "--domain", "city", "synthetic", "city",
                 "val", "--images", "4", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "NaN" in err and "nan.pth" in err, err
    assert not out.exists()


def test_the_error_is_the_last_line_when_a_progress_bar_was_open(ckpts, tmp_path, capsys):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(6):
        Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(root / "images" / f"{i}.png")
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(i).integers(0, 19, (32, 64), dtype=np.uint8)).save(buf, format="PNG")
        data = buf.getvalue()
        # the fifth label is cut: readable header, failing data, found only while the bar runs
        (root / "labels" / f"{i}.png").write_bytes(data[:-30] if i == 4 else data)
    assert main(["evaluate", str(ckpts / "m.pth"), "--domain", "x", "folder", str(root), "", "--device", "cpu",
                 "--workers", "0"]) == 2
    _last_line_is_the_error(capsys.readouterr().err, "truncated")

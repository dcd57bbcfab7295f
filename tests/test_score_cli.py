"""`domainmerge score` through the real command line entry point."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from domainmerge.cli import main

C = 19


def save(path: Path, ids: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ids.astype(np.uint8)).save(path)


def make_domain(root: Path, seed: int, n: int = 3, flat_pred: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """GT like Cityscapes (city/<stem>_gtFine_labelTrainIds.png), predictions at the same relative
    path as <stem>_gtFine.png (or flat); returns all predictions and labels stacked."""
    rng = np.random.default_rng(seed)
    gts, preds = [], []
    for i in range(n):
        gt = rng.integers(0, 12, size=(16, 24))          # classes 12..18 absent from GT
        gt[rng.random(gt.shape) < 0.2] = 255
        pred = np.where(rng.random(gt.shape) < 0.7, np.where(gt == 255, 3, gt), rng.integers(0, 14, gt.shape))
        city = f"city{i % 2}"
        save(root / "gt" / city / f"{city}_{i:06d}_gtFine_labelTrainIds.png", gt)
        pred_rel = f"{city}_{i:06d}_gtFine.png" if flat_pred else f"{city}/{city}_{i:06d}_gtFine.png"
        save(root / "pred" / pred_rel, pred)
        gts.append(gt)
        preds.append(pred)
    return np.stack(preds), np.stack(gts)


def iou_by_hand(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    keep = gt != 255
    conf = np.bincount(gt[keep] * C + pred[keep], minlength=C * C).reshape(C, C).astype(float)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union * 100, np.nan)


def table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|:"):
            parts = [c.strip() for c in line.strip("|").split("|")]
            rows[parts[0]] = parts[1:]
    return rows


def test_score_one_folder_prints_table_and_writes_json_csv(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    pred, gt = make_domain(tmp_path, 0)
    out_json, out_csv = tmp_path / "s.json", tmp_path / "s.csv"
    assert main(["score", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
                 "--json", str(out_json), "--csv", str(out_csv)]) == 0
    iou = iou_by_hand(pred, gt)
    miou = np.nanmean(iou)
    rows = table_rows(capsys.readouterr().out)
    assert rows["Class"] == ["score"]
    assert rows["road"] == [f"{iou[0]:.1f}"]
    assert rows["mIoU"] == [f"{miou:.1f}"]
    assert rows["rider"] == ["0.0"] and rows["bicycle"] == ["n/a"]   # predicted-only vs absent
    data = json.loads(out_json.read_text())
    dom = data["domains"]["score"]
    assert dom["images"] == 3
    assert dom["miou"] == pytest.approx(miou, rel=1e-12)
    assert dom["iou"]["road"] == pytest.approx(iou[0], rel=1e-12)
    assert dom["iou"]["rider"] == 0.0
    assert dom["iou"]["bicycle"] is None
    csv_rows = {r["class"]: r for r in csv.DictReader(out_csv.open())}
    assert float(csv_rows["mIoU"]["score"]) == pytest.approx(miou, abs=1e-4)


def test_score_domains_gives_h(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pc, gc = make_domain(tmp_path / "cs", 1)
    pi, gi = make_domain(tmp_path / "idd", 2, flat_pred=True)
    out_json = tmp_path / "h.json"
    assert main(["score", "--domain", "C", str(tmp_path / "cs/pred"), str(tmp_path / "cs/gt"),
                 "--domain", "I", str(tmp_path / "idd/pred"), str(tmp_path / "idd/gt"),
                 "--json", str(out_json)]) == 0
    m_c, m_i = np.nanmean(iou_by_hand(pc, gc)), np.nanmean(iou_by_hand(pi, gi))
    h = 2 * m_c * m_i / (m_c + m_i)
    rows = table_rows(capsys.readouterr().out)
    assert rows["Metric"] == ["C", "I", "H", "Mean"]
    assert rows["mIoU"][-4:] == [f"{m_c:.1f}", f"{m_i:.1f}", f"{h:.1f}", f"{(m_c + m_i) / 2:.1f}"]
    assert json.loads(out_json.read_text())["summary"]["H"] == pytest.approx(h, rel=1e-12)


def test_scores_json_in_the_library_matches_the_hand_computed_h(tmp_path: Path) -> None:
    """The notebook entry point gives the JSON the command writes: per-domain mIoU and H by hand."""
    from domainmerge.evaluation.folders import score_folders, scores_json

    pc, gc = make_domain(tmp_path / "cs", 4)
    pi, gi = make_domain(tmp_path / "idd", 5)
    results = score_folders([(d, tmp_path / d / "pred", tmp_path / d / "gt") for d in ("cs", "idd")], workers=1)
    data = json.loads(json.dumps(scores_json(results, C)))
    m_c, m_i = np.nanmean(iou_by_hand(pc, gc)), np.nanmean(iou_by_hand(pi, gi))
    assert data["num_classes"] == C and data["domains"]["idd"]["pred"] == str(tmp_path / "idd" / "pred")
    assert data["domains"]["cs"]["miou"] == pytest.approx(m_c, rel=1e-12)
    assert data["summary"]["H"] == pytest.approx(2 * m_c * m_i / (m_c + m_i), rel=1e-12)
    assert "summary" not in scores_json({"cs": results["cs"]}, C)


def run_bad(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["score", *args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("domainmerge score: error: "), captured.err
    assert captured.out == ""
    return err[0]


def test_bad_inputs_exit_2_one_line_no_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_domain(tmp_path, 3)
    out = tmp_path / "out.json"
    base = ["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--json", str(out)]

    missing = tmp_path / "pred/city1/city1_000001_gtFine.png"
    missing.rename(tmp_path / "elsewhere.png")
    assert "city1_000001_gtFine.png: no such prediction" in run_bad(base, capsys)
    (tmp_path / "elsewhere.png").rename(missing)

    save(missing, np.full((16, 24), 19))
    assert "predicted value 19" in run_bad(base, capsys)
    save(missing, np.zeros((8, 24)))
    assert "differs from ground truth" in run_bad(base, capsys)
    save(missing, np.zeros((16, 24)))

    save(tmp_path / "gt/city0/city0_000000_gtFine_labelTrainIds.png", np.full((16, 24), 33))
    msg = run_bad(base, capsys)
    assert "city0_000000_gtFine_labelTrainIds.png" in msg and "label value 33" in msg

    assert "not found" in run_bad(["--pred", str(tmp_path / "nope"), "--gt", str(tmp_path / "gt")], capsys)
    assert "nothing to score" in run_bad([], capsys)
    assert not out.exists()

    out.write_text("{}")
    assert "exists; pass --force" in run_bad(base, capsys)

"""`domainmerge evaluate` end to end on tiny networks and fake Cityscapes-layout trees."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from domainmerge.checkpoint import save_checkpoint
from domainmerge.cli import main
from domainmerge.evaluation.checkpoints import Job, plan_jobs
from domainmerge.models import build_model

H, W = 32, 64
# --protocol custom: native resolution, whole image (the independent computations below do the same).
FAST = ["--device", "cpu", "--workers", "0", "--quiet", "--protocol", "custom"]


def make_tree(root: Path, n: int, seed: int) -> Path:
    """A Cityscapes-layout val split of ``n`` random images and label maps."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        city = "aachen" if i % 2 else "bonn"
        img_dir = root / "leftImg8bit" / "val" / city
        lab_dir = root / "gtFine" / "val" / city
        img_dir.mkdir(parents=True, exist_ok=True)
        lab_dir.mkdir(parents=True, exist_ok=True)
        # Smooth-ish images so the random network predicts several classes.
        img = rng.integers(0, 256, (H // 8, W // 8, 3)).astype(np.uint8)
        Image.fromarray(img).resize((W, H), Image.BILINEAR).save(img_dir / f"{city}_{i:03d}_leftImg8bit.png")
        lab = rng.integers(0, 19, (H, W)).astype(np.uint8)
        lab[rng.random((H, W)) < 0.1] = 255
        Image.fromarray(lab).save(lab_dir / f"{city}_{i:03d}_gtFine_labelTrainIds.png")
    return root


def tiny_state_dict(seed: int, arch: str = "tiny_daformer_r") -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_model(arch)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(100 + seed)
    return {k: v.clone() for k, v in model.state_dict().items()}


def write_training_checkpoint(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    """A DA training checkpoint: the network under model., ema_model. and imnet_model."""
    full = {}
    for i, prefix in enumerate(("model.", "ema_model.", "imnet_model.")):
        full.update({prefix + k: (v + i if v.is_floating_point() else v) for k, v in sd.items()})
    return save_checkpoint(path, full, meta={"iter": 40000}, container="mmseg")


def expected_scores(sd: dict[str, torch.Tensor], root: Path, arch: str = "tiny_daformer_r") -> float:
    """mIoU computed outside the command: PIL reads, numpy normalisation and confusion."""
    model = build_model(arch)
    model.load_state_dict(sd)
    model.eval()
    mean = np.array([123.675, 116.28, 103.53])[:, None, None]
    std = np.array([58.395, 57.12, 57.375])[:, None, None]
    conf = np.zeros((19, 19), dtype=np.int64)
    for img_path in sorted((root / "leftImg8bit" / "val").rglob("*_leftImg8bit.png")):
        lab_path = Path(str(img_path).replace("leftImg8bit", "gtFine").replace("gtFine.png",
                                                                                   "gtFine_labelTrainIds.png"))
        img = np.asarray(Image.open(img_path).convert("RGB")).transpose(2, 0, 1).astype(np.float64)
        lab = np.asarray(Image.open(lab_path)).astype(np.int64)
        x = torch.from_numpy((img - mean) / std).float()[None]
        with torch.no_grad():
            logits = F.interpolate(model(x), size=lab.shape, mode="bilinear", align_corners=False)
        pred = logits.argmax(1)[0].numpy()
        keep = lab != 255
        np.add.at(conf, (lab[keep], pred[keep]), 1)
    tp = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    return float(np.nanmean(iou) * 100)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval")
    cs = make_tree(base / "cs", 5, seed=1)
    idd = make_tree(base / "idd", 4, seed=2)
    sda, sdb = tiny_state_dict(1), tiny_state_dict(2)
    a = write_training_checkpoint(base / "a.pth", sda)
    b = write_training_checkpoint(base / "b.pth", sdb)
    return {"base": base, "cs": cs, "idd": idd, "a": a, "b": b, "sda": sda, "sdb": sdb}


def domains(world) -> list[str]:
    return ["--domain", "cs", "cityscapes", str(world["cs"]), "--domain", "idd", "cityscapes", str(world["idd"]),
            "val"]


def run_json(args: list[str], out: Path) -> dict:
    assert main(["evaluate", *args, "--json", str(out), "--force", *FAST]) == 0
    return json.loads(out.read_text())


def test_scores_match_independent_computation(world, capsys):
    res = run_json([str(world["a"]), *domains(world)], world["base"] / "a.json")
    row = res["results"]["a"]
    for dom in ("cs", "idd"):
        assert row["domains"][dom]["miou"] == pytest.approx(expected_scores(world["sda"], world[dom]), abs=1e-9)
    assert row["domains"]["cs"]["images"] == 5
    m = [row["domains"][d]["miou"] for d in ("cs", "idd")]
    assert row["H"] == pytest.approx(2 * m[0] * m[1] / (m[0] + m[1]))
    assert "tiny_daformer_r" in row["arch"]["cs"]
    out = capsys.readouterr().out
    header = [c.strip() for c in out.strip().splitlines()[-3].split("|")]
    assert header[1:-1] == ["Model", "cs", "idd", "H", "Mean"]


def test_slide_and_save_pred(world):
    pred_dir = world["base"] / "preds"
    res = run_json([str(world["a"]), "--domain", "cs", "cityscapes", str(world["cs"]), "--mode", "slide",
                    "--crop", "32", "32", "--stride", "16", "16", "--batch-size", "4", "--save-pred", str(pred_dir)],
                   world["base"] / "slide.json")
    assert res["results"]["a"]["domains"]["cs"]["images"] == 5
    pngs = sorted(pred_dir.rglob("*.png"))
    assert len(pngs) == 5 and pngs[0].relative_to(pred_dir).parts[0] == "cs"
    arr = np.asarray(Image.open(pngs[0]))
    assert arr.shape == (H, W) and arr.max() < 19


def test_plan_jobs_pairing():
    jobs, note = plan_jobs(["m.idd.pth", "m.cs.pth"], ["cs", "idd"], False)
    assert jobs == [Job("m (per-domain)", "m.cs.pth", "cs"), Job("m (per-domain)", "m.idd.pth", "idd")]
    assert "by file name" in note
    jobs, _ = plan_jobs(["x.pth", "y.pth"], ["cs", "idd"], False)
    assert len(jobs) == 4 and {j.row for j in jobs} == {"x", "y"}
    jobs, note = plan_jobs(["x.pth", "y.pth"], ["cs", "idd"], True)
    assert [(j.ckpt, j.domain) for j in jobs] == [("x.pth", "cs"), ("y.pth", "idd")] and "by order" in note


def test_merged_checkpoints_load_and_evaluate(world):
    base = world["base"]
    merged = base / "merged.pth"
    assert main(["merge", str(world["a"]), str(world["b"]), "-o", str(merged), "--quiet"]) == 0
    res = run_json([str(merged), *domains(world)], base / "merged.json")
    assert set(res["results"]["merged"]["domains"]) == {"cs", "idd"}

    heads = base / "heads" / "merged.pth"
    heads.parent.mkdir()
    assert main(["merge", str(world["a"]), str(world["b"]), "-o", str(heads), "--keep-heads", "decode_head.",
                 "--names", "cs", "idd", "--quiet"]) == 0
    files = [str(heads.with_name("merged.idd.pth")), str(heads.with_name("merged.cs.pth"))]
    paired = run_json([*files, *domains(world)], base / "paired.json")["results"]["merged (per-domain)"]
    assert paired["checkpoints"] == {"cs": files[1], "idd": files[0]}
    for dom, f in (("cs", files[1]), ("idd", files[0])):
        alone = run_json([f, "--domain", dom, "cityscapes", str(world[dom])], base / f"{dom}.json")
        assert paired["domains"][dom]["miou"] == next(iter(alone["results"].values()))["domains"][dom]["miou"]


def test_other_architectures_detected(world):
    for arch in ("tiny_daformer_mit", "tiny_hrda_r"):
        sd = tiny_state_dict(3, arch)
        path = write_training_checkpoint(world["base"] / f"{arch}.pth", sd)
        res = run_json([str(path), "--domain", "cs", "cityscapes", str(world["cs"])], world["base"] / "o.json")
        row = res["results"][arch]
        assert arch in row["arch"]["cs"]
        assert row["domains"]["cs"]["miou"] == pytest.approx(expected_scores(sd, world["cs"], arch), abs=1e-9)


def test_user_errors(world, tmp_path, capsys):
    assert main(["evaluate", str(world["a"]), "--domain", "cs", "cityscapes", str(tmp_path / "nope"), *FAST]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["evaluate", str(world["a"]), "--domain", "cs", "cityscapes", str(world["cs"]), "--arch",
                 "segformer_b9", *FAST]) == 2
    assert "unknown architecture" in capsys.readouterr().err
    assert main(["evaluate", str(world["a"]), "--domain", "cs", "cityscapes", *FAST]) == 2
    assert "NAME DATASET ROOT" in capsys.readouterr().err
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": {"foo.weight": torch.zeros(2)}}, bad)
    assert main(["evaluate", str(bad), "--domain", "cs", "cityscapes", str(world["cs"]), *FAST]) == 2
    assert "unknown backbone" in capsys.readouterr().err

def test_cuda_without_a_gpu_is_a_one_line_error(world, capsys, monkeypatch):
    # Pretend there is no GPU, so the check runs on every machine, GPU or not.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["evaluate", str(world["a"]), "--domain", "cs", "cityscapes", str(world["cs"]), "--workers", "0"]
    assert main([*argv, "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_two_gloo_processes_match_one(world, run_ranks):
    base = world["base"]
    args = [str(world["a"]), *domains(world), *FAST]
    single = run_json(args, base / "single.json")
    out = base / "ddp.json"
    run_ranks(["evaluate", *args, "--json", str(out)], 2)
    ddp = json.loads(out.read_text())
    # Equal results include equal pixel counts: every image scored exactly once across the ranks.
    assert ddp["results"] == single["results"]
    labelled = sum(int((np.array(Image.open(f)) != 255).sum())
                   for f in sorted((world["cs"] / "gtFine").rglob("*_labelTrainIds.png")))
    row = next(iter(single["results"].values()))
    assert row["domains"]["cs"]["pixels"] == labelled


def image_confusions(sd: dict[str, torch.Tensor], root: Path) -> np.ndarray:
    """Per-image confusion matrices [N, 19, 19] outside the package, images in the reader's
    (sorted path) order."""
    model = build_model("tiny_daformer_r")
    model.load_state_dict(sd)
    model.eval()
    mean = np.array([123.675, 116.28, 103.53])[:, None, None]
    std = np.array([58.395, 57.12, 57.375])[:, None, None]
    out = []
    for img_path in sorted((root / "leftImg8bit" / "val").rglob("*_leftImg8bit.png")):
        lab_path = Path(str(img_path).replace("leftImg8bit", "gtFine").replace("gtFine.png",
                                                                                   "gtFine_labelTrainIds.png"))
        img = np.asarray(Image.open(img_path).convert("RGB")).transpose(2, 0, 1).astype(np.float64)
        lab = np.asarray(Image.open(lab_path)).astype(np.int64)
        with torch.no_grad():
            logits = F.interpolate(model(torch.from_numpy((img - mean) / std).float()[None]), size=lab.shape,
                                   mode="bilinear", align_corners=False)
        pred = logits.argmax(1)[0].numpy()
        keep = lab != 255
        conf = np.zeros((19, 19), dtype=np.int64)
        np.add.at(conf, (lab[keep], pred[keep]), 1)
        out.append(conf)
    return np.stack(out)


def hand_bootstrap(confs: dict[str, np.ndarray], resamples: int, seed: int, level: float) -> dict[str, tuple]:
    """The resampling done with a loop: per domain in order, R draws of N image indices from one
    generator; each resample's split confusion is the sum of the drawn images' matrices."""
    rng = np.random.default_rng(seed)
    samples = {}
    for dom, conf in confs.items():
        draws = rng.integers(0, len(conf), size=(resamples, len(conf)))
        vals = []
        for idx in draws:
            total = conf[idx].sum(0).astype(float)
            tp = np.diag(total)
            union = total.sum(0) + total.sum(1) - tp
            vals.append(np.nanmean(np.where(union > 0, tp / np.maximum(union, 1), np.nan)) * 100)
        samples[dom] = np.array(vals)
    samples["H"] = len(confs) / sum(1 / samples[d] for d in confs)
    q = [(1 - level) / 2, (1 + level) / 2]
    return {k: tuple(np.quantile(v, q)) for k, v in samples.items()}, samples


def test_ci_intervals_and_paired_differences(world, capsys):
    res = run_json([str(world["a"]), str(world["b"]), *domains(world), "--ci", "--resamples", "300",
                    "--level", "0.9", "--ci-seed", "3"], world["base"] / "ci.json")
    assert res["settings"]["ci"]["resamples"] == 300 and res["settings"]["ci"]["reference"] == "a"
    confs = {m: {d: image_confusions(world[f"sd{m}"], world[d]) for d in ("cs", "idd")} for m in ("a", "b")}
    hand = {m: hand_bootstrap(confs[m], 300, 3, 0.9) for m in ("a", "b")}
    for m in ("a", "b"):
        row = res["results"][m]
        for key in ("cs", "idd", "H"):
            ci = row["ci"][key]
            assert (ci["low"], ci["high"]) == pytest.approx(hand[m][0][key], abs=1e-9)
            assert ci["estimate"] == pytest.approx(row["domains"][key]["miou"] if key != "H" else row["H"])
            assert ci["level"] == 0.9
    assert "difference_vs_reference" not in res["results"]["a"]
    diff = res["results"]["b"]["difference_vs_reference"]
    q = [0.05, 0.95]
    for key in ("cs", "idd", "H"):
        paired = hand["b"][1][key] - hand["a"][1][key]     # the same draws for both models
        assert (diff[key]["low"], diff[key]["high"]) == pytest.approx(tuple(np.quantile(paired, q)), abs=1e-9)
        assert diff[key]["estimate"] == pytest.approx(res["results"]["b"]["ci"][key]["estimate"]
                                                      - res["results"]["a"]["ci"][key]["estimate"])
    out = capsys.readouterr().out
    assert "90% bootstrap intervals over images (300 resamples" in out
    assert "Paired difference against a" in out
    d = diff["H"]
    assert f"{d['estimate']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]" in out
    a = res["results"]["a"]["ci"]["cs"]
    assert f"{a['estimate']:.1f} [{a['low']:.1f}, {a['high']:.1f}]" in out


def test_ci_bad_settings_and_two_gloo_processes(world, run_ranks, capsys):
    base = world["base"]
    assert main(["evaluate", str(world["a"]), *domains(world), "--ci", "--level", "95", *FAST]) == 2
    assert "--level 95" in capsys.readouterr().err
    assert main(["evaluate", str(world["a"]), *domains(world), "--ci", "--resamples", "0", *FAST]) == 2
    assert "--resamples 0" in capsys.readouterr().err
    # the interval settings without --ci would do nothing: refused, naming them
    assert main(["evaluate", str(world["a"]), *domains(world), "--level", "0.9", "--ci-seed", "3", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--level and --ci-seed only apply with --ci" in err, err
    # Under torchrun every rank's images are gathered in dataset order: identical intervals.
    args = [str(world["a"]), str(world["b"]), *domains(world), "--ci", "--resamples", "100", *FAST]
    single = run_json(args, base / "ci_single.json")
    run_ranks(["evaluate", *args, "--json", str(base / "ci_ddp.json")], 2)
    assert json.loads((base / "ci_ddp.json").read_text())["results"] == single["results"]

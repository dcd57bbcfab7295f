"""Linear mode connectivity: barrier by hand, grids, interpolation through the merge rules, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from domainmerge.analysis.lmc import barrier, barriers, dip_below_line, lambda_grid, scan, simplex_grid


def test_barrier_by_hand() -> None:
    # mIoU dips from end points 50 and 60 (mean 55) to 30: barrier 25.
    assert barrier([50.0, 40.0, 30.0, 45.0, 60.0]) == 25.0
    # A monotone curve has no dip, but Git Re-Basin's form still gives half the end-point gap.
    assert barrier([40.0, 45.0, 50.0]) == 5.0
    # A curve above both ends: the minimum is an end point.
    assert barrier([50.0, 58.0, 50.0]) == 0.0
    # Loss form: max 3 minus the mean of the end losses 1 and 2.
    assert barrier([1.0, 3.0, 2.0], higher_is_better=False) == 1.5
    # Simplex: mean of three vertices (30 + 60 + 90) / 3 = 60, minimum 20.
    assert barrier([30.0, 20.0, 60.0, 90.0], endpoints=[30.0, 60.0, 90.0]) == 40.0
    assert math.isnan(barrier([1.0, math.nan, 2.0]))


def test_dip_below_line_by_hand() -> None:
    lams = [0.0, 0.25, 0.5, 0.75, 1.0]
    w = [(1 - t, t) for t in lams]
    # Line from 40 to 60: 40, 45, 50, 55, 60; the curve sits 10 below it at 0.5.
    assert dip_below_line([40.0, 44.0, 40.0, 56.0, 60.0], w, [40.0, 60.0]) == pytest.approx(10.0)
    # Above the line everywhere: the largest "dip" is at an end point, 0.
    assert dip_below_line([40.0, 50.0, 55.0, 60.0, 60.0], w, [40.0, 60.0]) == pytest.approx(0.0)
    # Simplex: vertices 30, 60, 90; centre-of-edge point (0.5, 0, 0.5) scores 40 against a line value 60.
    assert dip_below_line([30.0, 60.0, 90.0, 40.0], [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0.5, 0, 0.5)],
                          [30.0, 60.0, 90.0]) == pytest.approx(20.0)


def test_paper_form_is_inflated_by_unequal_end_points() -> None:
    # A curve above its chord everywhere (20 -> 30, humped): no dip below the line, yet the lower
    # end point itself lies 5 below the mean of the ends, so the paper's form reports 5.
    values, lams = [20.0, 35.0, 40.0, 35.0, 30.0], [0.0, 0.25, 0.5, 0.75, 1.0]
    assert barrier(values) == pytest.approx(5.0)
    assert dip_below_line(values, [(1 - lam, lam) for lam in lams], [20.0, 30.0]) == pytest.approx(0.0)


def test_grids() -> None:
    assert lambda_grid(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    got = simplex_grid(3, 3)
    want = {(1, 0, 0), (0, 1, 0), (0, 0, 1), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)}
    assert set(got) == want and len(got) == 6
    assert len(simplex_grid(4, 5)) == math.comb(4 + 3, 3)  # compositions of 4 into 4 parts
    assert [w[1] for w in simplex_grid(2, 3)] == [0.0, 0.5, 1.0]


def test_scan_uses_the_merge_rules_for_parameters_and_bn_statistics() -> None:
    # One weight and one BN layer; A: w=0, mean 0, var 1; B: w=10, mean 2, var 1; equal batch counts.
    def sd(w: float, mean: float) -> dict[str, torch.Tensor]:
        return {"conv.weight": torch.tensor([w]), "bn.weight": torch.ones(1), "bn.bias": torch.zeros(1),
                "bn.running_mean": torch.tensor([mean]), "bn.running_var": torch.ones(1),
                "bn.num_batches_tracked": torch.tensor(100)}

    seen = []

    def score(m: dict[str, torch.Tensor]) -> dict[str, float]:
        seen.append((float(m["conv.weight"]), float(m["bn.running_mean"]), float(m["bn.running_var"])))
        return {"x": 50 - float(m["conv.weight"]), "y": 40 + float(m["conv.weight"])}

    rows = scan([sd(0.0, 0.0), sd(10.0, 2.0)], [(1 - lam, lam) for lam in lambda_grid(5)], score)
    for (w, mean, var), lam in zip(seen, lambda_grid(5)):
        assert w == pytest.approx(10 * lam)
        # Pooled Gaussian with shares (1 - lam, lam): mean 2 lam, var 1 + lam (1 - lam) 2^2.
        assert mean == pytest.approx(2 * lam) and var == pytest.approx(1 + 4 * lam * (1 - lam))
    # H by hand at lam = 0.5: x = y = 45.
    assert rows[2]["H"] == pytest.approx(45.0)
    s = barriers(rows)
    assert s["x"]["barrier"] == pytest.approx(5.0)  # linear 50 -> 40: half the gap
    assert s["x"]["dip_below_line"] == pytest.approx(0.0)  # ... but never below the line
    h = [2 * (50 - 10 * t) * (40 + 10 * t) / (90) for t in lambda_grid(5)]
    assert s["H"]["barrier"] == pytest.approx((h[0] + h[-1]) / 2 - min(h))
    assert s["H"]["argmax"] == [0.5, 0.5]


def write_cityscapes(root, n: int, seed: int) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    for sub in ("leftImg8bit/val/c", "gtFine/val/c"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)).save(
            root / f"leftImg8bit/val/c/{i}_leftImg8bit.png")
        label = np.where(rng.random((32, 64)) < 0.1, 255, rng.integers(0, 4, (32, 64))).astype(np.uint8)
        Image.fromarray(label).save(root / f"gtFine/val/c/{i}_gtFine_labelTrainIds.png")


@pytest.fixture(scope="module")
def world(tmp_path_factory):  # type: ignore[no-untyped-def]
    from domainmerge.models import build_model

    root = tmp_path_factory.mktemp("lmc")
    paths = []
    for i in range(3):
        torch.manual_seed(i)
        net = build_model("tiny_daformer_r", num_classes=19)
        paths.append(root / f"m{i}.pth")
        torch.save({"meta": {}, "state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}}, paths[-1])
    # Label each domain with one model's own predictions, so the curves run between ~100 and less.
    from domainmerge.data import build_dataset
    from domainmerge.evaluation.inference import evaluate_model
    from domainmerge.models import model_from_state_dict

    for domain, owner in (("cs", 0), ("idd", 1)):
        write_cityscapes(root / domain, 2, seed=owner + 1)
        net = model_from_state_dict({k[6:]: v for k, v in torch.load(paths[owner])["state_dict"].items()})
        preds: dict[str, torch.Tensor] = {}
        evaluate_model(net, build_dataset("cityscapes", root / domain, "val"), progress=False,
                       on_prediction=preds.__setitem__)
        for name, pred in preds.items():
            Image.fromarray(pred.numpy().astype(np.uint8)).save(
                root / domain / f"gtFine/val/{name}_gtFine_labelTrainIds.png")
    return root, paths


def independent_miou(path, lam_models, root, domains=("cs", "idd")):  # type: ignore[no-untyped-def]
    """Score a merge done by the merge engine, evaluated by the evaluation package (not lmc)."""
    from domainmerge.checkpoint import load_state_dict, strip_model_prefix
    from domainmerge.data import build_dataset
    from domainmerge.evaluation.inference import evaluate_model
    from domainmerge.merging import merge_state_dicts
    from domainmerge.models import model_from_state_dict

    sds = [strip_model_prefix(load_state_dict(p)) for p in path]
    merged = merge_state_dicts(sds, weights=lam_models)
    model = model_from_state_dict(merged)
    return {d: evaluate_model(model, build_dataset("cityscapes", root / d, "val"), progress=False).miou
            for d in domains}


def test_lmc_command_curve(world) -> None:  # type: ignore[no-untyped-def]
    from domainmerge.cli import main

    root, paths = world
    out = root / "curve"
    assert main(["lmc", str(paths[0]), str(paths[1]), "--steps", "3", "--out", str(out), "--quiet",
                 "--protocol", "custom",
                 "--device", "cpu", "--workers", "0", "--domain", "cs", "cityscapes", str(root / "cs"),
                 "--domain", "idd", "cityscapes", str(root / "idd")]) == 0
    data = json.loads((out / "lmc.json").read_text())
    assert [p["weights"][1] for p in data["points"]] == [0.0, 0.5, 1.0]
    for point in (data["points"][1], data["points"][2]):
        want = independent_miou(paths[:2], point["weights"], root)
        assert point["scores"] == pytest.approx(want, abs=1e-9)
    assert data["points"][0]["scores"]["cs"] == 100.0 and data["points"][2]["scores"]["idd"] == 100.0
    assert data["points"][0]["scores"]["idd"] < 100.0
    curve = [p["H"] for p in data["points"]]
    assert data["barriers"]["H"]["barrier"] == pytest.approx((curve[0] + curve[2]) / 2 - min(curve))
    assert (out / "lmc.png").read_bytes()[:4] == b"\x89PNG" and "barrier" in (out / "lmc.md").read_text()


def test_lmc_command_simplex(world) -> None:  # type: ignore[no-untyped-def]
    from domainmerge.cli import main

    root, paths = world
    out = root / "simplex"
    assert main(["lmc", *map(str, paths), "--grid", "3", "--out", str(out), "--quiet", "--protocol", "custom",
                 "--device", "cpu",
                 "--workers", "0", "--domain", "cs", "cityscapes", str(root / "cs")]) == 0
    data = json.loads((out / "lmc.json").read_text())
    assert len(data["points"]) == 6
    centre = next(p for p in data["points"] if p["weights"] == [0.5, 0.0, 0.5])
    # The point with no weight on the middle model is the two-model merge of the others.
    assert centre["scores"] == pytest.approx(independent_miou([paths[0], paths[2]], [0.5, 0.5], root, ("cs",)),
                                             abs=1e-9)
    assert (out / "lmc_ternary.png").read_bytes()[:4] == b"\x89PNG"
    # A second run without --force refuses to overwrite.
    assert main(["lmc", *map(str, paths), "--grid", "3", "--out", str(out), "--quiet", "--protocol", "custom",
                 "--domain", "cs", "cityscapes", str(root / "cs")]) == 2
    # --steps shapes the curve of two checkpoints; with three it would do nothing: refused
    assert main(["lmc", *map(str, paths), "--steps", "3", "--out", str(root / "steps"), "--quiet", "--protocol",
                 "custom", "--domain", "cs", "cityscapes", str(root / "cs")]) == 2
    assert not (root / "steps").exists()


def test_lmc_under_two_gloo_processes_matches_one(world, run_ranks) -> None:  # type: ignore[no-untyped-def]
    from domainmerge.cli import main

    root, paths = world
    argv = ["lmc", str(paths[0]), str(paths[1]), "--steps", "3", "--quiet", "--protocol", "custom",
            "--device", "cpu", "--workers", "0",
            "--domain", "cs", "cityscapes", str(root / "cs"), "--domain", "idd", "cityscapes", str(root / "idd")]
    assert main([*argv, "--out", str(root / "one")]) == 0
    run_ranks([*argv, "--out", str(root / "two")], 2)
    one = json.loads((root / "one" / "lmc.json").read_text())
    two = json.loads((root / "two" / "lmc.json").read_text())
    assert two["points"] == one["points"] and two["barriers"] == one["barriers"]

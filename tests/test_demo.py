"""A miniature of the whole demo pipeline (every stage, seconds) and its pure helpers."""

import json

import pytest
import torch

from domainmerge.checkpoint import load_state_dict, strip_model_prefix
from domainmerge.cli import main
from domainmerge.demo import PRESETS, line_barrier, mean_barrier, parse_targets
from domainmerge.errors import UserError
from domainmerge.models import build_model


def test_line_barrier_by_hand():
    lams = [0.0, 0.25, 0.5, 0.75, 1.0]
    # Straight line from 40 to 20: 35, 30, 25 on the line; the curve dips 10 below at 0.5.
    assert line_barrier(lams, [40, 35, 20, 25, 20]) == pytest.approx(10.0)
    assert line_barrier(lams, [40, 38, 36, 30, 20]) == 0.0          # above the line: no barrier
    assert line_barrier(lams, [30, 30, 30, 30, 30]) == 0.0


def test_mean_barrier_by_hand():
    # End points 40 and 20 average 30; the curve's minimum is 18: barrier 12.
    assert mean_barrier([40, 35, 18, 25, 20]) == pytest.approx(12.0)
    # A hump above equal end points: no barrier.
    assert mean_barrier([30, 35, 40, 35, 30]) == pytest.approx(0.0)
    # Unequal end points: the lower end itself lies below their mean, so even a curve that is
    # above the straight line everywhere has a positive barrier in this form (the line form has none).
    assert mean_barrier([20, 35, 40, 35, 30]) == pytest.approx(5.0)
    assert line_barrier([0, 0.25, 0.5, 0.75, 1], [20, 35, 40, 35, 30]) == 0.0


def test_parse_targets():
    assert parse_targets("idd, night", ("city",)) == ("idd", "night")
    assert parse_targets(None, ("city", "fog")) == ("city", "fog")
    with pytest.raises(UserError, match="mars"):
        parse_targets("city,mars", ())
    with pytest.raises(UserError, match="at least two"):
        parse_targets("city", ())


def test_tiny_demo_runs_every_stage_and_writes_everything(tmp_path, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "demo"
    assert main(["demo", "--preset", "tiny", "--out", str(out), "--threads", "1"]) == 0
    res = json.loads((out / "results.json").read_text())
    targets = PRESETS["tiny"].targets
    a, b = targets
    scores = res["scores"]
    for name in ["source_only", f"stda_{a}", f"stda_{b}", f"combined_{a}_{b}", f"merged_{a}+{b}_gaussian",
                 f"merged_{a}+{b}_mean", f"merged_{a}+{b}_first", f"merged_{a}+{b}_backbone_heads",
                 f"merged_{a}+{b}_recalibrated"]:
        assert set(scores[name]) == set(targets), name
        assert all(0.0 <= v <= 100.0 for v in scores[name].values())
    for stage in ["world", "pretrain", "source_only", f"stda_{a}", f"stda_{b}", "different_init",
                  "merge_evaluate", "interpolation"]:
        assert stage in res["timings_s"]
    curve = res["interpolation"]
    assert len(curve["lambda"]) == PRESETS["tiny"].lambdas
    for label in ("shared_init", "different_init"):
        assert len(curve[label]["H"]) == len(curve["lambda"]) and "barrier_miou" in curve[label]
    # The interpolation end points are the two models themselves (lambda 0 and 1).
    assert curve["shared_init"][a][0] == pytest.approx(scores[f"stda_{a}"][a])
    assert curve["shared_init"][b][-1] == pytest.approx(scores[f"stda_{b}"][b])
    assert {c["id"] for c in res["checks"]} >= {"1", "2", "3", "4", "5", "world-1", "world-2"}
    for f in ("results.md", "interpolation.png", "merging.png"):
        assert (out / f).stat().st_size > 0
    md = (out / "results.md").read_text()
    assert "Merged (params + buffers)" in md and "Merged backbone, separate heads" in md
    assert "(uses data)" in md  # the recalibration baseline is marked as not training-free
    printed = capsys.readouterr().out
    assert "PASS" in printed or "FAIL" in printed
    # Checkpoints are mmseg containers that load like users' files into the model package's network.
    sd = strip_model_prefix(load_state_dict(out / "checkpoints" / f"stda_{a}.pth"))
    net = build_model("tiny_daformer_r", num_classes=19)
    net.load_state_dict(sd)
    raw = torch.load(out / "checkpoints" / f"stda_{a}.pth", weights_only=True)
    assert set(raw) >= {"meta", "state_dict"} and all(k.startswith("model.") for k in raw["state_dict"])
    # A second run refuses to overwrite without --force.
    assert main(["demo", "--preset", "tiny", "--out", str(out), "--threads", "1"]) == 2


def test_tiny_demo_with_the_layernorm_backbone(tmp_path):
    """MiT backbone (LayerNorm, no running statistics) + BN head: the pipeline runs, and the only
    running statistics its checkpoints hold (so the only ones the buffer rules touch) are the head's."""
    torch.set_num_threads(1)
    out = tmp_path / "mit"
    assert main(["demo", "--preset", "tiny", "--arch", "tiny_daformer_mit", "--out", str(out), "--threads", "1"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["arch"] == "tiny_daformer_mit"
    sd = strip_model_prefix(load_state_dict(out / "checkpoints" / "stda_city.pth"))
    running = [k for k in sd if k.endswith("running_mean")]
    assert running and all(k.startswith("decode_head.") for k in running)

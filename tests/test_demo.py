"""A miniature of the whole demo pipeline (every stage, seconds) and its pure helpers."""

import json
from dataclasses import replace

import pytest
import torch

from domainmerge.checkpoint import load_state_dict, strip_model_prefix
from domainmerge.cli import main
from domainmerge.demo import PRESETS, parse_targets
from domainmerge.demo.records import DemoResults
from domainmerge.errors import UserError
from domainmerge.evaluation.bootstrap import verdict
from domainmerge.models import build_model


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
    assert set(res["timings_s"]) == {"world", "pretraining", "source", "adaptation", "merge_evaluate",
                                     "interpolation"}
    runs = ["pretrain", "source_only", "source_only_diffinit", f"stda_{a}", f"stda_{b}", f"stda_{b}_diffinit",
            f"combined_{a}_{b}"]
    assert sorted(res["training"]) == sorted(runs) and all(res["training"][r]["seconds"] > 0 for r in runs)
    curve = res["interpolation"]
    assert len(curve["lambda"]) == PRESETS["tiny"].lambdas
    for label in ("shared_init", "different_init"):
        assert len(curve[label]["H"]) == len(curve["lambda"])
    # Recomputed by hand from the recorded curves: the dip below the line (the largest drop below
    # the chord between the end points) and the barrier (mean of the end points minus the minimum).
    lams = curve["lambda"]
    for label in ("shared_init", "different_init"):
        for key in (a, b, "H"):
            v = curve[label][key]
            chord = max((1 - lam) * v[0] + lam * v[-1] - x for lam, x in zip(lams, v))
            assert curve[label]["dip_below_line"][key] == pytest.approx(chord)
            assert curve[label]["barrier"][key] == pytest.approx((v[0] + v[-1]) / 2 - min(v))
        assert curve[label]["dip_below_line_miou"] == max(curve[label]["dip_below_line"][d] for d in (a, b))
    # The interpolation end points are the two models themselves (lambda 0 and 1).
    assert curve["shared_init"][a][0] == pytest.approx(scores[f"stda_{a}"][a])
    assert curve["shared_init"][b][-1] == pytest.approx(scores[f"stda_{b}"][b])
    checks = {c["id"]: c for c in res["checks"]}
    assert set(checks) == {"1", "2", "3", "4", "5", "world-1", "world-2"}
    # Claim 5 needs four targets: the two-target preset says so instead of judging it, and what to give.
    assert checks["5"]["verdict"] == "SKIP" and checks["5"]["detail"] == \
        "not tested: needs 4 targets, this run has 2; give 4 targets (e.g. city,idd,fog,night)"
    # Each verdict follows from its conditions' intervals, and the differences are the table's numbers.
    for c in checks.values():
        if c["verdict"] != "SKIP":
            vs = [verdict(t["low"], t["high"], t["margin"], t["side"]) for t in c["tests"]]
            assert [t["verdict"] for t in c["tests"]] == vs
            assert c["verdict"] == ("FAIL" if "FAIL" in vs else "TIE" if "TIE" in vs else "PASS")
            assert all(t["low"] <= t["high"] for t in c["tests"])

    def h(name):
        return 2 * scores[name][a] * scores[name][b] / (scores[name][a] + scores[name][b])

    t1 = checks["1"]["tests"][0]
    assert t1["estimate"] == pytest.approx(h(f"merged_{a}+{b}_gaussian") - max(h(f"stda_{a}"), h(f"stda_{b}")))
    assert (t1["margin"], t1["side"]) == (2.0, ">=")
    t4 = {t["label"]: t for t in checks["4"]["tests"]}
    assert t4["shared-init dip below line"]["estimate"] == pytest.approx(curve["shared_init"]["dip_below_line_miou"])
    assert t4["different-init dip below line"]["estimate"] == pytest.approx(
        curve["different_init"]["dip_below_line_miou"])
    # The typed record reads results.json back field by field.
    back = DemoResults.from_dict(res)
    shared = back.check("4").condition("shared-init dip below line")
    assert shared.estimate == t4["shared-init dip below line"]["estimate"]
    assert back.interpolation is not None and back.interpolation.lambdas == lams
    assert back.to_dict()["interpolation"] == curve and back.scores == scores
    for f in ("results.md", "interpolation.png", "merging.png"):
        assert (out / f).stat().st_size > 0
    md = (out / "results.md").read_text()
    assert "Merged (params + buffers)" in md and "Merged backbone, separate heads" in md
    assert "(uses data)" in md  # the recalibration baseline is marked as not training-free
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if " [1] merged H" in x)
    assert line.startswith(checks["1"]["verdict"] + " [1] ")
    assert f"merged - best single {t1['estimate']:+.2f} [95% {t1['low']:+.2f}, {t1['high']:+.2f}]" in line
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


def test_tiny_demo_over_two_seeds(tmp_path, capsys, monkeypatch):
    """--seeds runs the pipeline per seed in its own folder and reports mean, std and verdicts;
    a claim the preset declares untested is printed as such."""
    torch.set_num_threads(1)
    monkeypatch.setitem(PRESETS, "tiny", replace(PRESETS["tiny"], claims=("1", "2", "4", "world-1", "world-2")))
    out = tmp_path / "seeds"
    assert main(["demo", "--preset", "tiny", "--seeds", "0,1", "--out", str(out), "--threads", "1"]) == 0
    runs = {s: json.loads((out / f"seed{s}" / "results.json").read_text()) for s in (0, 1)}
    assert [runs[s]["seed"] for s in (0, 1)] == [0, 1]
    summary = json.loads((out / "results.json").read_text())
    assert summary["seeds"] == [0, 1]
    a = PRESETS["tiny"].targets[0]
    values = [runs[s]["scores"][f"stda_{a}"][a] for s in (0, 1)]
    num = summary["numbers"][f"stda_{a} {a}"]
    assert num["values"] == pytest.approx(values)
    assert num["mean"] == pytest.approx((values[0] + values[1]) / 2)
    assert num["std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)   # n - 1 = 1
    for cid in ("1", "2", "4", "world-1", "world-2"):
        for s in (0, 1):
            own = next(c for c in runs[s]["checks"] if c["id"] == cid)
            # The verdict is the one its stored intervals and margins give (a test not judged says SKIP).
            vs = [verdict(t["low"], t["high"], t["margin"], t["side"]) for t in own["tests"]]
            assert own["tests"] and [t["verdict"] for t in own["tests"]] == vs
            assert own["verdict"] == ("FAIL" if "FAIL" in vs else "TIE" if "TIE" in vs else "PASS")
            assert summary["checks"][cid]["verdicts"][str(s)] == own["verdict"]
    assert summary["checks"]["3"]["verdicts"] == {"0": "SKIP", "1": "SKIP"}
    diffs = [next(c for c in runs[s]["checks"] if c["id"] == "1")["tests"][0]["estimate"] for s in (0, 1)]
    assert summary["checks"]["1"]["tests"]["merged - best single"]["mean"] == pytest.approx(sum(diffs) / 2)
    printed = capsys.readouterr().out
    assert "SKIP [3] gaussian >= mean >= first-model buffers in H (city+night): not tested by this preset, " \
           "run --preset full" in printed
    assert "| [1] merged H >= best single" in printed and "seed 0" in printed and "seed 1" in printed
    assert "## Checks: verdict per seed" in (out / "results.md").read_text()
    # Outputs are checked before any run starts.
    assert main(["demo", "--preset", "tiny", "--seeds", "0,1", "--out", str(out), "--threads", "1"]) == 2
    assert main(["demo", "--preset", "tiny", "--seeds", "0,x", "--out", str(tmp_path / "bad")]) == 2
    assert "--seeds" in capsys.readouterr().err


def test_a_check_this_run_cannot_test_says_why_and_does_not_send_to_another_preset():
    from domainmerge.demo.claims import not_tested

    # e.g. claim 5 in `--preset full --targets city,night`: the full preset would not help
    c = not_tested("5", "merging all four beats every single model", "needs 4 targets, this run has 2")
    assert c.verdict == "SKIP" and c.detail == "not tested: needs 4 targets, this run has 2"
    assert "preset" not in c.detail

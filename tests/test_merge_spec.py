"""The one merge specification (MergeSpec): built from Python, the command line or a recipe,
validated once, recorded; and the merge corners it closes (knobs that do nothing, rules that
match nothing, a rule's method named in its error, the rules in the summary, a base of another
architecture)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch

from domainmerge.checkpoint import load_state_dict
from domainmerge.cli import main
from domainmerge.errors import MergeError
from domainmerge.merging import KeyRule, merge_state_dicts
from domainmerge.merging.spec import DareTies, Linear, MergeSpec, TaskArithmetic, Ties, make_method


def _net(seed: int, count: int, width: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"backbone.conv.weight": torch.randn(width, 3, generator=g),
            "backbone.bn.weight": torch.rand(4, generator=g),
            "backbone.bn.running_mean": torch.randn(4, generator=g),
            "backbone.bn.running_var": torch.rand(4, generator=g) + 0.1,
            "backbone.bn.num_batches_tracked": torch.tensor(count),
            "decode_head.conv_seg.weight": torch.randn(19, 4, generator=g)}


@pytest.fixture()
def files(tmp_path: Path) -> Path:
    for name, seed, count in (("a", 1, 10), ("b", 2, 30)):
        torch.save({"meta": {"iter": 5}, "state_dict": {f"model.{k}": v for k, v in _net(seed, count).items()}},
                   tmp_path / f"{name}.pth")
    torch.save(_net(0, 0), tmp_path / "base.pth")
    torch.save(_net(0, 0, width=6), tmp_path / "other.pth")     # another architecture: a wider conv
    return tmp_path


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def _refused(argv: list[str], folder: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Run a command that must fail: exit 2, one line, no file added or changed; the line."""
    before = _digests(folder)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert _digests(folder) == before
    return err


# ---------------------------------------------------------------- the spec in Python


def test_spec_is_frozen_validated_once_and_equal_from_every_builder() -> None:
    spec = MergeSpec(method=DareTies(lam=0.8, density=0.5, drop=0.3, seed=4), weights=[1, 3], buffers="mean")
    assert spec.weights == (1.0, 3.0) and hash(spec) == hash(MergeSpec.build(
        "dare_ties", lam=0.8, density=0.5, drop=0.3, seed=4, weights=[1, 3], buffers="mean"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.buffers = "first"  # type: ignore[misc]
    with pytest.raises(MergeError, match="density"):
        Ties(density=0.0)
    with pytest.raises(MergeError, match="drop"):
        DareTies(drop=1.0)
    with pytest.raises(MergeError, match="buffer rule"):
        MergeSpec(buffers="median")
    with pytest.raises(MergeError, match="weights"):
        MergeSpec(weights=[1, float("nan")])
    with pytest.raises(MergeError, match="counts"):
        MergeSpec(counts=[1, 2], buffers="mean")                # counts weigh only the Gaussian pool
    with pytest.raises(MergeError, match="names"):
        MergeSpec(names=["a", "b"])                               # names without per-model outputs


@pytest.mark.parametrize(("method", "knob"), [
    ("linear", "density"), ("linear", "drop"), ("linear", "lam"), ("linear", "seed"), ("linear", "images"),
    ("ties", "drop"), ("ties", "seed"), ("task_arithmetic", "density"), ("dare_linear", "density"),
    ("fisher", "lam"), ("adamerging", "seed"), ("ties", "steps"),
])
def test_a_knob_the_method_does_not_read_is_refused(method: str, knob: str) -> None:
    with pytest.raises(MergeError) as info:
        MergeSpec.build(method, **{knob: 1})
    assert f"{knob} does nothing with method {method!r}" in str(info.value)


def test_a_rule_takes_its_knobs_else_the_methods() -> None:
    # Hand computation, base 0, two models [2, -1] and [4, 3] (uniform weights):
    # ties density 1 lambda 0.5 on 'a': signs +, + / -, + -> mass [3, 1]: disjoint mean [3, 3] * 0.5 = [1.5, 1.5]
    # the rule on 'b' is task arithmetic with its own lambda 2: 2 * mean = 2 * [3, 1] = [6, 2]
    a = {"a.w": torch.tensor([2.0, -1.0]), "b.w": torch.tensor([2.0, -1.0])}
    b = {"a.w": torch.tensor([4.0, 3.0]), "b.w": torch.tensor([4.0, 3.0])}
    base = {"a.w": torch.zeros(2), "b.w": torch.zeros(2)}
    spec = MergeSpec(method=Ties(lam=0.5, density=1.0), rules=[KeyRule("b.*", method="task_arithmetic", lam=2.0)])
    out = merge_state_dicts([a, b], base=base, spec=spec)
    torch.testing.assert_close(out["a.w"], torch.tensor([1.5, 1.5]))
    torch.testing.assert_close(out["b.w"], torch.tensor([6.0, 2.0]))
    # Without its own lambda the rule inherits the method's 0.5: 0.5 * [3, 1].
    inherited = spec.replace(rules=[KeyRule("b.*", method="task_arithmetic")])
    assert inherited.rule_method(inherited.rules[0]) == TaskArithmetic(lam=0.5)
    torch.testing.assert_close(merge_state_dicts([a, b], base=base, spec=inherited)["b.w"], torch.tensor([1.5, 0.5]))
    with pytest.raises(MergeError, match="does nothing"):
        MergeSpec(rules=[KeyRule("b.*", method="task_arithmetic", density=0.3)])
    with pytest.raises(TypeError):
        merge_state_dicts([a, b], base=base, spec=spec, method="ties")


def test_make_method_and_record() -> None:
    assert make_method("linear") == Linear() and make_method("ties", density=None) == Ties()
    spec = MergeSpec(method=Ties(density=0.3), rules=[KeyRule("x.*", keep_own=True)])
    record = spec.record(["/some/where/a.pth", "b.pth"], "/x/base.pth")
    assert record == {"models": ["a.pth", "b.pth"], "weights": None, "method": "ties", "buffers": "gaussian",
                      "counts": None, "only": None, "keep_heads": None, "allow_missing": False, "align": False,
                      "base": "base.pth", "lambda": 1.0, "density": 0.3, "drop": 0.9, "seed": 0,
                      "rules": [{"pattern": "x.*", "keep_own": True}]}


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize(("extra", "flag"), [
    (["--density", "0.3"], "--density"), (["--drop", "0.5"], "--drop"), (["--lambda", "2"], "--lambda"),
    (["--seed", "3"], "--seed"), (["--images", "8"], "--images"), (["--steps", "5"], "--steps"),
    (["--device", "cpu"], "--device"),
])
def test_merge_refuses_options_that_do_nothing_with_linear(files: Path, capsys: pytest.CaptureFixture[str],
                                                           extra: list[str], flag: str) -> None:
    err = _refused(["merge", str(files / "a.pth"), str(files / "b.pth"), "-o", str(files / "m.pth"), *extra],
                   files, capsys)
    assert flag in err


def test_merge_refuses_a_knob_of_another_method(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(["merge", str(files / "a.pth"), str(files / "b.pth"), "-o", str(files / "m.pth"), "--method",
                    "ties", "--base", str(files / "base.pth"), "--drop", "0.5"], files, capsys)
    assert "--drop does nothing with method 'ties'" in err and "dare_linear, dare_ties" in err


def test_recipe_rule_matching_no_key_is_refused(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (files / "r.yaml").write_text("models: [a.pth, b.pth]\nrules:\n  - {match: 'decoder.*', keep: own}\n")
    err = _refused(["merge", "--config", str(files / "r.yaml"), "-o", str(files / "m.pth")], files, capsys)
    assert "rule 'decoder.*'" in err and "matches no key" in err


def test_recipe_rule_needing_a_base_names_its_method(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (files / "r.yaml").write_text("models: [a.pth, b.pth]\nrules:\n  - {match: 'backbone.*', method: ties}\n")
    err = _refused(["merge", "--config", str(files / "r.yaml"), "-o", str(files / "m.pth")], files, capsys)
    assert "rule 'backbone.*': method 'ties'" in err and "--base" in err and "'linear'" not in err


def test_recipe_knob_that_does_nothing_is_refused(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (files / "r.yaml").write_text("models: [a.pth, b.pth]\ndensity: 0.3\n")
    err = _refused(["merge", "--config", str(files / "r.yaml"), "-o", str(files / "m.pth")], files, capsys)
    assert "field 'density' does nothing with method 'linear'" in err


def test_merge_summary_names_the_rules(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (files / "r.yaml").write_text(
        "models: [a.pth, b.pth]\nbase: base.pth\nrules:\n"
        "  - {match: 'backbone.conv.*', method: task_arithmetic, lambda: 2}\n"
        "  - {match: 'decode_head.*', keep: own}\n")
    assert main(["merge", "--config", str(files / "r.yaml"), "-o", str(files / "m.pth")]) == 0
    out = capsys.readouterr().out
    assert "rule 'backbone.conv.*' (task_arithmetic, lam 2): 1 key\n" in out
    assert "rule 'decode_head.*' (kept per model): 1 key\n" in out
    assert set(load_state_dict(files / "m.1.pth")) == {f"model.{k}" for k in _net(0, 0)}


def test_inspect_refuses_a_base_of_another_architecture(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(["inspect", str(files / "a.pth"), str(files / "b.pth"), "--base", str(files / "other.pth")],
                   files, capsys)
    assert "backbone.conv.weight" in err and "base" in err and "UNSAFE" not in err
    assert main(["inspect", str(files / "a.pth"), str(files / "b.pth"), "--base", str(files / "base.pth")]) == 0


def test_lmc_refuses_grid_with_two_models(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(["lmc", str(files / "a.pth"), str(files / "b.pth"), "--domain", "x", "synthetic", "none",
                    "--grid", "4"], files, capsys)
    assert "--grid" in err and "--steps" in err


def test_evaluate_refuses_resamples_without_ci(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(["evaluate", str(files / "a.pth"), "--domain", "x", "synthetic", "none", "--resamples", "50"],
                   files, capsys)
    assert "--resamples" in err and "--ci" in err

"""`merge --config recipe.yaml`: equal to the command line, per-module rules, every bad field refused."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from domainmerge.checkpoint import load_state_dict
from domainmerge.cli import main


def _net(seed: int, count: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"backbone.conv.weight": torch.randn(4, 3, generator=g),
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
    return tmp_path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_recipe_equal_to_command_line_is_bit_identical(files: Path, suffix: str) -> None:
    cli = ["merge", str(files / "a.pth"), str(files / "b.pth"), "-o", str(files / f"cli{suffix}"),
           "--weights", "1", "3", "--method", "dare_ties", "--base", str(files / "base.pth"),
           "--density", "0.5", "--drop", "0.3", "--seed", "4", "--lambda", "0.8", "--buffers", "mean",
           "--only", "model.", "--quiet"]
    assert main(cli) == 0
    (files / "r.yaml").write_text(
        "models:\n  - {path: a.pth, weight: 1}\n  - {path: b.pth, weight: 3}\nbase: base.pth\n"
        "method: dare_ties\ndensity: 0.5\ndrop: 0.3\nseed: 4\nlambda: 0.8\nbuffers: mean\nonly: model.\n")
    assert main(["merge", "--config", str(files / "r.yaml"), "-o", str(files / f"rec{suffix}"), "--quiet"]) == 0
    assert _sha(files / f"cli{suffix}") == _sha(files / f"rec{suffix}")


def test_recipe_rules_per_module(files: Path) -> None:
    # backbone.conv.* by task arithmetic with lambda 2, other parameters averaged, heads kept per model
    (files / "r.yaml").write_text(
        "models: [a.pth, b.pth]\nbase: base.pth\nrules:\n"
        "  - {match: 'backbone.conv.*', method: task_arithmetic, lambda: 2}\n"
        "  - {match: 'decode_head.*', keep: own}\n"
        "names: [a, b]\n")
    assert main(["merge", "--config", str(files / "r.yaml"), "-o", str(files / "m.pth"), "--quiet"]) == 0
    a, b, base = _net(1, 10), _net(2, 30), _net(0, 0)
    for name, own in (("a", a), ("b", b)):
        out = load_state_dict(files / f"m.{name}.pth")
        k = "backbone.conv.weight"
        torch.testing.assert_close(out[f"model.{k}"], base[k] + 2 * ((a[k] + b[k]) / 2 - base[k]))
        k = "backbone.bn.weight"
        torch.testing.assert_close(out[f"model.{k}"], (a[k] + b[k]) / 2)
        k = "decode_head.conv_seg.weight"
        torch.testing.assert_close(out[f"model.{k}"], own[k])
    record = torch.load(files / "m.a.pth", weights_only=True)["meta"]["domainmerge"]["recipe"]
    assert record["rules"][0] == {"pattern": "backbone.conv.*", "method": "task_arithmetic", "lam": 2.0}


BAD = [
    ("models: [a.pth]\n", "'models'"),
    ("method: ties\n", "'models' is missing"),
    ("models: [a.pth, b.pth]\nmethod: magic\n", "'method'"),
    ("models: [a.pth, b.pth]\nmethod: ties\n", "--base"),
    ("models: [a.pth, b.pth]\nbase: base.pth\nmethod: ties\ndensity: 2\n", "density"),
    ("models: [a.pth, b.pth]\nbase: base.pth\nmethod: dare_linear\ndrop: 1.0\n", "drop"),
    ("models: [a.pth, b.pth]\nlambda: abc\n", "'lambda'"),
    ("models: [a.pth, b.pth]\nseed: 1.5\n", "'seed'"),
    ("models: [a.pth, b.pth]\nbuffers: median\n", "'buffers'"),
    ("models: [a.pth, b.pth]\ncounts: [1]\n", "'counts'"),
    ("models: [a.pth, b.pth]\ncounts: [1, -2]\n", "'counts'"),
    ("models: [a.pth, b.pth]\nallow_missing: yes please\n", "'allow_missing'"),
    ("models: [a.pth, b.pth]\nmethd: ties\n", "unknown field 'methd'"),
    ("models: [{path: a.pth, weight: -1}, b.pth]\n", "weight"),
    ("models: [{path: a.pth, wieght: 1}, b.pth]\n", "unknown field 'wieght'"),
    ("models: [{path: a.pth, weight: 0}, {path: b.pth, weight: 0}]\n", "sum to zero"),
    ("models: [a.pth, b.pth]\nrules: [{method: ties}]\n", "rules[0].match"),
    ("models: [a.pth, b.pth]\nrules: [{match: 'x*'}]\n", "needs 'method' or 'keep: own'"),
    ("models: [a.pth, b.pth]\nrules: [{match: 'x*', keep: mine}]\n", "keep"),
    ("models: [a.pth, b.pth]\nrules: [{match: 'x*', method: ties, keep: own}]\n", "both"),
    ("models: [a.pth, b.pth]\nrules: [{match: 'x*', method: ties}]\n", "--base"),
    ("models: [a.pth, b.pth]\nrules: [{match: 'x*', method: wild}]\n", "rules[0].method"),
    ("models: [a.pth, b.pth]\nrules: {match: x}\n", "'rules'"),
    ("- a.pth\n- b.pth\n", "mapping of fields"),
    ("models: [a.pth, b.pth\n", "not valid YAML"),
    ("models: [a.pth, missing.pth]\n", "missing.pth"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_malformed_recipe_is_refused(files: Path, capsys: pytest.CaptureFixture[str], text: str,
                                     message: str) -> None:
    (files / "r.yaml").write_text(text)
    before = {p.name: _sha(p) for p in files.iterdir()}
    rc = main(["merge", "--config", str(files / "r.yaml"), "-o", str(files / "m.pth")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and message in err, err
    assert sorted(p.name for p in files.iterdir()) == sorted(before)     # no output, no temporary file
    assert {p.name: _sha(p) for p in files.iterdir()} == before          # inputs unchanged


def test_recipe_and_command_line_options_do_not_mix(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (files / "r.yaml").write_text("models: [a.pth, b.pth]\n")
    assert main(["merge", "--config", str(files / "r.yaml"), "-o", str(files / "m.pth"), "--method", "ties"]) == 2
    assert "--method" in capsys.readouterr().err
    assert main(["merge", str(files / "a.pth"), "--config", str(files / "r.yaml"), "-o", str(files / "m.pth")]) == 2
    assert "give no checkpoints" in capsys.readouterr().err
    assert main(["merge", "--config", str(files / "nope.yaml"), "-o", str(files / "m.pth")]) == 2
    assert "recipe not found" in capsys.readouterr().err


def test_merge_recipe_in_python_equals_the_command(files: Path) -> None:
    from domainmerge.merging.recipe import load_recipe, merge_recipe

    (files / "r.yaml").write_text("models: [a.pth, b.pth]\nbase: base.pth\nmethod: ties\ndensity: 0.5\n"
                                  "rules:\n  - {match: 'decode_head.*', keep: own}\n")
    outs = merge_recipe(load_recipe(files / "r.yaml"))
    assert main(["merge", "--config", str(files / "r.yaml"), "-o", str(files / "m.pth"), "--quiet"]) == 0
    assert len(outs) == 2
    for i, out in enumerate(outs, 1):
        written = load_state_dict(files / f"m.{i}.pth")
        assert set(written) == set(out)
        for k in out:
            torch.testing.assert_close(written[k], out[k])

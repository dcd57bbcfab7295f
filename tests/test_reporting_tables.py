"""The inspect and align reports rendered by ``reporting`` from plain data (expected lines by hand)."""

from __future__ import annotations

from types import SimpleNamespace

from domainmerge.reporting import alignment_markdown, inspect_markdown


def summary(name: str) -> dict[str, object]:
    return {"file": name, "format": "mmseg .pth", "extras": ["optimizer"], "prefixes": ["model."], "tensors": 3,
            "parameters": 1234567, "dtypes": {"float32": 3}, "bn_layers": 1, "bn_counts": [40000],
            "bn_layers_without_count": 0, "modules": {"backbone": {"tensors": 2, "parameters": 1234500},
                                                     "decode_head": {"tensors": 1, "parameters": 67}}}


def test_inspect_markdown_lists_each_checkpoint_its_warning_and_the_distances() -> None:
    comparison = {"mergeable": False, "reason": "shapes differ at backbone.w",
                  "distances": {"b.pth": {"backbone": {"rel_l2": 0.123456, "bn_mean_abs_diff": None}}}}
    text = inspect_markdown([summary("a.pth"), summary("b.pth")], comparison, "## diagnostics",
                            ["warning: a.pth has NaN", None])
    lines = text.splitlines()
    assert lines[:6] == ["## a.pth", "format: mmseg .pth; other entries: optimizer", "prefixes: model.",
                         "tensors: 3; parameters: 1,234,567; dtypes: float32 x3",
                         "BatchNorm layers: 1; num_batches_tracked: 40000", "**warning: a.pth has NaN**"]
    assert "| backbone | 2 | 1,234,500 |" in lines
    assert text.count("**warning") == 1                      # b.pth has none
    assert "no: shapes differ at backbone.w" in lines
    assert "| backbone | 0.1235 | - |" in lines
    assert text.endswith("## diagnostics\n")


def test_alignment_markdown_rows_and_unit_weighted_total() -> None:
    report = SimpleNamespace(prefix="backbone.", family="resnet", rounds=3, seconds=1.25, fixed=["decode_head.x"],
                             sizes={"P_a": 3, "P_b": 1}, identity={"P_a": 1 / 3, "P_b": 1.0}, overall=0.5)
    lines = alignment_markdown(report).splitlines()
    assert lines[0] == "Weight matching under 'backbone.' (resnet): 2 permutations, 3 rounds, 1.2 s"
    assert [ln.replace(" ", "") for ln in lines if ln.startswith("| P_") or ln.startswith("| all")] == [
        "|P_a|3|33.3|", "|P_b|1|100.0|", "|all(unit-weighted)|4|50.0|"]
    assert lines[-1] == "Kept fixed (read outside the backbone): decode_head.x"

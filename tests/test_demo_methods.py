"""The demo's methods table on tiny models: every method runs, rows and sweeps are what they say."""

from __future__ import annotations

import pytest
import torch

from domainmerge.demo.methods import METHOD_ROWS, SWEEPS, MethodRow, methods_table, plot_sweeps, render_methods
from domainmerge.models import build_model

KEY = "decode_head.conv_seg.weight"


def test_methods_table_rows_sweeps_and_rendering(tmp_path) -> None:
    torch.manual_seed(0)
    net = build_model("tiny_daformer_r", num_classes=19)
    base = {k: v.clone() for k, v in net.state_dict().items()}
    models = {}
    for i, t in enumerate(("city", "idd", "fog")):
        g = torch.Generator().manual_seed(i)
        models[f"stda_{t}"] = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point()
                               and "running" not in k else v.clone() for k, v in base.items()}

    # a scorer whose value can be computed by hand: 50 + 100 * mean of the classifier weights
    def score(sd, domains):
        return {d: 50.0 + 100.0 * float(sd[KEY].mean()) + i for i, d in enumerate(domains)}

    images = {t: torch.randn(2, 3, 32, 64, generator=torch.Generator().manual_seed(10 + i))
              for i, t in enumerate(("city", "idd", "fog"))}
    extra = {"city+idd": {"heads": MethodRow("separate heads", "heads", {"city": 1.0, "idd": 2.0})}}
    result = methods_table(models, base, {"city+idd": ["city", "idd"], "all": ["city", "idd", "fog"]}, score,
                           net, images, extra=extra, adamerging_steps=1)
    linear = result.rows["all"][0]
    mean_key = sum(float(models[f"stda_{t}"][KEY].mean()) for t in ("city", "idd", "fog")) / 3
    assert linear.method == "linear"
    assert abs(linear.scores["city"] - (50 + 100 * mean_key)) < 1e-3
    labels = [r.method for r in result.rows["city+idd"]]
    assert labels == [m for _, m, _ in METHOD_ROWS] + ["fisher", "adamerging", "heads"]
    assert [r.uses_data for r in result.rows["all"]] == [False] * len(METHOD_ROWS) + [True, True]
    assert result.sweep_group == "all"
    for method, (_, _, values) in SWEEPS.items():
        assert result.sweeps[method]["values"] == list(values) and len(result.sweeps[method]["H"]) == len(values)
    # lambda 1 task arithmetic is the linear merge: same H
    ta = result.sweeps["task_arithmetic"]
    assert abs(ta["H"][ta["values"].index(1.0)] - linear.h(["city", "idd", "fog"])) < 1e-3
    text = render_methods(result)
    lines = [line.replace(" ", "") for line in text.splitlines()]
    assert sum(line.startswith("|linear(thepaper's)|") and "|+0.0|no|" in line for line in lines) == 2
    assert sum(line.endswith("|yes|") for line in lines) == 4          # Fisher and AdaMerging in both groups
    assert plot_sweeps(result, tmp_path).exists()


def test_demo_pipeline_writes_the_methods_table(tmp_path) -> None:
    from dataclasses import replace

    from domainmerge.demo.pipeline import PRESETS, run_demo

    out = tmp_path / "demo"
    res = run_demo(replace(PRESETS["tiny"], methods=True), out, log=lambda _: None)
    assert res.methods is not None
    rows = res.methods.rows["city+night"]
    assert [r.method for r in rows][-2:] == ["linear_heads", "recalibrated"]
    # the table's linear row is the pipeline's own Gaussian merge, scored on the same images
    linear = next(r for r in rows if r.method == "linear")
    assert linear.scores == pytest.approx(res.scores["merged_city+night_gaussian"], abs=1e-9)
    assert "## Merge methods, city+night" in (out / "results.md").read_text()
    assert (out / "methods.png").exists()
    # Two worker processes (training runs side by side, the methods table beside the evaluation)
    # give the same numbers, bit for bit: every run is a pure function of its seed.
    two = run_demo(replace(PRESETS["tiny"], methods=True), tmp_path / "two", jobs=2, log=lambda _: None).to_dict()
    one = res.to_dict()
    for r in (one, two):
        r.pop("timings_s"), r.pop("wall_time_s")
        for run in r["training"].values():
            run.pop("seconds")
    assert two == one

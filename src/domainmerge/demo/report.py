"""The demo's outputs for people: results.md (the paper's table layouts, checks) and the plots.

What each table and figure shows is chosen here, from a :class:`DemoResults`; the Markdown and
the figures themselves are drawn by ``domainmerge.reporting``.
"""

from __future__ import annotations

from pathlib import Path

from domainmerge.data.synthetic import SOURCE
from domainmerge.demo.claims import format_check
from domainmerge.demo.records import COMBINED_ALL, SOURCE_ONLY, DemoResults, combined, group, merged, stda
from domainmerge.reporting import domain_table, markdown_table, plot_bars, plot_panels
from domainmerge.tensors import harmonic_mean

CURVES = ("shared_init", "different_init")


def render_markdown(results: DemoResults) -> str:
    """results.md: the paper's two-target table, the buffer rules, the all-subsets table, the
    interpolation curves' barriers and dips, the methods table, the checks."""
    s, targets = results.scores, results.targets
    a, b = targets[:2]
    pair = group([a, b])
    two = {
        f"Data combination ({pair})": s[combined([a, b])],
        f"STDA {SOURCE}->{a}": s[stda(a)],
        f"STDA {SOURCE}->{b}": s[stda(b)],
        "Merged (params + buffers)": s[merged(pair, "gaussian")],
        "Merged backbone, separate heads": s[merged(pair, "backbone_heads")],
    }
    two = {k: {d: v[d] for d in (a, b)} for k, v in two.items()}
    parts = [f"# domainmerge demo ({results.preset} preset, seed {results.seed})", "",
             f"mIoU (%) on each target's val split; H = harmonic mean. Source: {SOURCE}.", "",
             f"## Two targets ({a}, {b})", "", domain_table(two, domains=[a, b], name="Method"), ""]
    for g in [pair] + (["all"] if len(targets) > 2 else []):
        doms = [a, b] if g == pair else list(targets)
        rows = {r: {d: s[merged(g, r)][d] for d in doms} for r in ("gaussian", "mean")}
        rows[f"first, {doms[0]}'s statistics"] = {d: s[merged(g, "first")][d] for d in doms}
        for t in doms[1:]:
            if merged(g, f"first={t}") in s:
                rows[f"first, {t}'s statistics"] = {d: s[merged(g, f"first={t}")][d] for d in doms}
        recal = s.get(merged(g, "recalibrated"))
        if recal is not None:  # older results.json files lack the baseline
            rows[f"recalibrated on {results.config['recal_images']} target images (uses data)"] = {
                d: recal[d] for d in doms}
        title = "all targets" if g == "all" else pair
        parts += [f"## Buffer rules, merging {title}", "", domain_table(rows, domains=doms, name="Buffers"), ""]
    if len(targets) > 2:
        rows = {"Source only": s[SOURCE_ONLY]}
        rows.update({f"STDA ->{t}": s[stda(t)] for t in targets})
        if COMBINED_ALL in s:
            rows["Data combination (all)"] = s[COMBINED_ALL]
        for key in results.subsets:
            rows[f"Merged {key}"] = s[merged(key, "gaussian")]
        parts += [f"## {len(targets)} targets (Gaussian buffers)", "",
                  domain_table(rows, domains=list(targets), name="Model"), ""]
    if results.interpolation is not None:
        curves = results.interpolation.curves
        keys = (a, b, "H")
        parts += ["## Interpolation: dip below the line and barrier (mIoU points)", "",
                  "Dip below the line: the largest drop below the straight line between the end points (max over "
                  "lambda). Barrier: the mean of the end points minus the curve's minimum (Git Re-Basin's form, "
                  "the paper's).", "",
                  markdown_table(["Curve", *(f"{k} (dip below line)" for k in keys), *(f"{k} (barrier)" for k in keys)],
                                 [[label.replace("_", " "), *(f"{curves[label].dip_below_line[k]:.2f}" for k in keys),
                                   *(f"{curves[label].barrier[k]:.2f}" for k in keys)] for label in CURVES])]
    if results.methods is not None:
        from domainmerge.demo.methods import render_methods

        parts += ["", render_methods(results.methods)]
    parts += ["", "## Checks", ""]
    level = results.config.get("level", 0.95)
    parts.append(f"Each claim is judged from the {level * 100:g}% bootstrap interval over val images of its paired "
                 "difference: PASS when the interval lies on the claimed side of the margin, FAIL when on the other "
                 "side, TIE when it straddles the margin.")
    parts.append("")
    parts += [f"- {format_check(c)}" for c in results.checks]
    runs = {name: run["seconds"] for name, run in results.training.items() if "seconds" in run}
    parts += ["", f"Wall time {results.wall_time_s:.0f} s. Stages: "
              + ", ".join(f"{k} {v:.0f}s" for k, v in results.timings_s.items())
              + " (with more than one job the methods table runs beside the evaluation). Training runs "
              "(each in one process, side by side with more than one job): "
              + ", ".join(f"{k} {v:.0f}s" for k, v in runs.items()), ""]
    return "\n".join(parts)


def plot(results: DemoResults, out: Path) -> list[Path]:
    """interpolation.png (shared vs different init), merging.png (bar chart of the variants) and,
    with the methods table, methods.png."""
    s, targets = results.scores, results.targets
    a, b = targets[:2]
    written = []
    if results.interpolation is not None:
        lams, curves = results.interpolation.lambdas, results.interpolation.curves
        panels = {}
        for label in CURVES:
            c = curves[label]
            series = {d: c.miou[d] for d in (a, b)} | {"H": c.h}
            panels[f"{label.replace('_', ' ')}: STDA->{a} to STDA->{b}"] = {
                f"{k} (dip {c.dip_below_line[k]:.1f})": (lams, ys, style)
                for (k, ys), style in zip(series.items(), ("-o", "-s", "-k^"))}
        path = out / "interpolation.png"
        plot_panels(panels, path, xlabel="lambda", ylabel="mIoU (%)")
        written.append(path)

    pair = group([a, b])
    bars = {f"STDA->{a}": s[stda(a)], f"STDA->{b}": s[stda(b)], "data comb.": s[combined([a, b])],
            "gaussian": s[merged(pair, "gaussian")], "mean": s[merged(pair, "mean")],
            "first": s[merged(pair, "first")], "backbone+heads": s[merged(pair, "backbone_heads")],
            "BN recal. (data)": s[merged(pair, "recalibrated")]}
    path = out / "merging.png"
    plot_bars({name: {a: v[a], b: v[b], "H": harmonic_mean([v[a], v[b]])} for name, v in bars.items()}, path,
              title=f"Merging variants, {pair}", ylabel="mIoU (%)")
    written.append(path)
    if results.methods is not None:
        from domainmerge.demo.methods import plot_sweeps

        written.append(plot_sweeps(results.methods, out))
    return written


__all__ = ["plot", "render_markdown"]

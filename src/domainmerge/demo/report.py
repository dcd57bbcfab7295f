"""The demo's outputs for people: results.md (the paper's table layouts, checks) and the plots."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from domainmerge.data.synthetic import SOURCE
from domainmerge.demo.claims import format_check
from domainmerge.evaluation.metrics import harmonic_mean
from domainmerge.reporting import save_figure


def render_markdown(results: Mapping[str, Any]) -> str:
    """results.md: the paper's two-target table, the buffer rules, the all-subsets table, checks."""
    from domainmerge.reporting import domain_table

    s, targets = results["scores"], results["targets"]
    a, b = targets[:2]
    pair = f"{a}+{b}"
    two = {
        f"Data combination ({pair})": s[f"combined_{a}_{b}"],
        f"STDA {SOURCE}->{a}": s[f"stda_{a}"],
        f"STDA {SOURCE}->{b}": s[f"stda_{b}"],
        "Merged (params + buffers)": s[f"merged_{pair}_gaussian"],
        "Merged backbone, separate heads": s[f"merged_{pair}_backbone_heads"],
    }
    two = {k: {d: v[d] for d in (a, b)} for k, v in two.items()}
    parts = [f"# domainmerge demo ({results['preset']} preset, seed {results['seed']})", "",
             f"mIoU (%) on each target's val split; H = harmonic mean. Source: {SOURCE}.", "",
             f"## Two targets ({a}, {b})", "", domain_table(two, domains=[a, b], name="Method"), ""]
    groups = [pair] + (["all"] if len(targets) > 2 else [])
    for g in groups:
        doms = [a, b] if g == pair else list(targets)
        rows = {r: {d: s[f"merged_{g}_{r}"][d] for d in doms} for r in ("gaussian", "mean")}
        rows[f"first, {doms[0]}'s statistics"] = {d: s[f"merged_{g}_first"][d] for d in doms}
        for t in doms[1:]:
            if f"merged_{g}_first={t}" in s:
                rows[f"first, {t}'s statistics"] = {d: s[f"merged_{g}_first={t}"][d] for d in doms}
        recal = s.get(f"merged_{g}_recalibrated")
        if recal is not None:  # older results.json files lack the baseline
            rows[f"recalibrated on {results['config']['recal_images']} target images (uses data)"] = {
                d: recal[d] for d in doms}
        title = "all targets" if g == "all" else pair
        parts += [f"## Buffer rules, merging {title}", "", domain_table(rows, domains=doms, name="Buffers"), ""]
    if len(targets) > 2:
        rows = {"Source only": s["source_only"]}
        rows.update({f"STDA ->{t}": s[f"stda_{t}"] for t in targets})
        if "combined_all" in s:
            rows["Data combination (all)"] = s["combined_all"]
        for key in results["subsets"]:
            rows[f"Merged {key}"] = s[f"merged_{key}_gaussian"]
        parts += [f"## {len(targets)} targets (Gaussian buffers)", "",
                  domain_table(rows, domains=list(targets), name="Model"), ""]
    cur = results["interpolation"]
    parts += ["## Interpolation barriers (mIoU points)", "",
              "Below the straight line between the end points (max over lambda), and in PAPER.md's form "
              "(mean of the end points minus the curve's minimum).", "",
              "| Curve | " + " | ".join([f"{k} (line)" for k in (a, b, "H")] + [f"{k} (paper)" for k in (a, b, "H")])
              + " |", "|---|" + "---:|" * 6]
    for label in ("shared_init", "different_init"):
        bar, pap = cur[label]["barrier"], cur[label].get("barrier_paper", {})
        cells = [f"{bar[k]:.2f}" for k in (a, b, "H")] + [f"{pap[k]:.2f}" if k in pap else "-" for k in (a, b, "H")]
        parts.append(f"| {label.replace('_', ' ')} | " + " | ".join(cells) + " |")
    if "methods" in results:
        from domainmerge.demo.methods import MethodsResult, render_methods

        parts += ["", render_methods(MethodsResult.from_dict(results["methods"]))]
    parts += ["", "## Checks", ""]
    level = results["config"].get("level", 0.95)
    parts.append(f"Each claim is judged from the {level * 100:g}% bootstrap interval over val images of its paired "
                 "difference: PASS when the interval lies on the claimed side of the margin, FAIL when on the other "
                 "side, TIE when it straddles the margin.")
    parts.append("")
    for c in results["checks"]:
        parts.append(f"- {format_check(c)}")
    t = results["timings_s"]
    parts += ["", f"Wall time {sum(t.values()):.0f} s: " + ", ".join(f"{k} {v:.0f}s" for k, v in t.items()), ""]
    return "\n".join(parts)


def plot(results: Mapping[str, Any], out: Path) -> list[Path]:
    """interpolation.png (shared vs different init) and merging.png (bar chart of the variants)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, targets = results["scores"], results["targets"]
    a, b = targets[:2]
    cur = results["interpolation"]
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, label in zip(axes, ("shared_init", "different_init")):
        for key, style in ((a, "-o"), (b, "-s"), ("H", "-k^")):
            ax.plot(cur["lambda"], cur[label][key], style, label=f"{key} (barrier {cur[label]['barrier'][key]:.1f})")
        ax.set_title(f"{label.replace('_', ' ')}: STDA->{a} to STDA->{b}")
        ax.set_xlabel("lambda")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("mIoU (%)")
    fig.tight_layout()
    path = out / "interpolation.png"
    save_figure(fig, path, dpi=110)
    written.append(path)

    pair = f"{a}+{b}"
    bars = {f"STDA->{a}": s[f"stda_{a}"], f"STDA->{b}": s[f"stda_{b}"], "data comb.": s[f"combined_{a}_{b}"],
            "gaussian": s[f"merged_{pair}_gaussian"], "mean": s[f"merged_{pair}_mean"],
            "first": s[f"merged_{pair}_first"], "backbone+heads": s[f"merged_{pair}_backbone_heads"],
            "BN recal. (data)": s[f"merged_{pair}_recalibrated"]}
    names = list(bars)
    fig, ax = plt.subplots(figsize=(10, 3.8))
    width = 0.27
    for i, key in enumerate((a, b, "H")):
        vals = [harmonic_mean([v[a], v[b]]) if key == "H" else v[key] for v in bars.values()]
        ax.bar([x + (i - 1) * width for x in range(len(names))], vals, width, label=key)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("mIoU (%)")
    ax.set_title(f"Merging variants, {pair}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / "merging.png"
    save_figure(fig, path, dpi=110)
    written.append(path)
    if "methods" in results:
        from domainmerge.demo.methods import MethodsResult, plot_sweeps

        written.append(plot_sweeps(MethodsResult.from_dict(results["methods"]), out))
    return written


__all__ = ["plot", "render_markdown"]

"""The demo repeated over several seeds (``domainmerge demo --seeds 0,1,2``).

Each seed is a complete run of the pipeline (world, initialisation, training, bootstrap) in
``OUT/seedS/``; ``OUT/results.json`` and ``OUT/results.md`` gather every number's mean and
standard deviation over the seeds and each check's verdict per seed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from domainmerge.demo.pipeline import Preset, run_demo
from domainmerge.demo.records import DemoResults, combined, group, merged, stda
from domainmerge.errors import Option, UserError
from domainmerge.reporting import fmt, markdown_table
from domainmerge.tensors import harmonic_mean


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]: integers, no repeats, at least one."""
    try:
        seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(Option("seeds", text), ": give comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(Option("seeds", text), ": give one or more different integers, e.g. 0,1,2")
    return seeds


def numbers(results: DemoResults) -> dict[str, float]:
    """The numbers of one run worth comparing across seeds, by a readable key: every score, H of
    every model over the first two targets (and over all targets), the interpolation curves'
    dips below the line and barriers, every check's difference, the wall time."""
    out: dict[str, float] = {}
    targets = results.targets
    pair = targets[:2]
    for model, per in results.scores.items():
        for d, v in per.items():
            out[f"{model} {d}"] = v
        if all(d in per for d in pair):
            out[f"{model} H({group(pair)})"] = harmonic_mean([per[d] for d in pair])
        if len(targets) > 2 and all(d in per for d in targets):
            out[f"{model} H(all)"] = harmonic_mean([per[d] for d in targets])
    if results.interpolation is not None:
        for label, curve in results.interpolation.curves.items():
            for form, values in (("dip_below_line", curve.dip_below_line), ("barrier", curve.barrier)):
                for k, v in values.items():
                    out[f"{label} {form} {k}"] = v
    for c in results.checks:
        for t in c.tests:
            out[f"check {c.id}: {t.label}"] = t.estimate
    out["wall time (s)"] = results.wall_time_s
    return out


def _mean_std(values: Sequence[float]) -> dict[str, Any]:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    mean = statistics.fmean(finite) if len(finite) == len(values) and finite else math.nan
    std = statistics.stdev(finite) if len(finite) == len(values) and len(finite) > 1 else math.nan
    return {"mean": mean, "std": std, "values": list(values)}


def summarize_seeds(runs: Mapping[int, DemoResults]) -> dict[str, Any]:
    """Mean and sample standard deviation (n - 1) of every number over the seeds, and each
    check's verdict per seed."""
    seeds = list(runs)
    per_seed = {s: numbers(r) for s, r in runs.items()}
    keys: list[str] = []
    for nums in per_seed.values():
        keys += [k for k in nums if k not in keys]
    first = runs[seeds[0]]
    checks = {}
    for c in first.checks:
        by_seed = {s: runs[s].check(c.id) for s in seeds}
        checks[c.id] = {"claim": c.claim, "kind": c.kind,
                        "verdicts": {str(s): by_seed[s].verdict for s in seeds},
                        "tests": {t.label: _mean_std([by_seed[s].condition(t.label).estimate for s in seeds])
                                  for t in c.tests}}
    return {"preset": first.preset, "targets": first.targets, "seeds": seeds,
            "numbers": {k: _mean_std([per_seed[s].get(k, math.nan) for s in seeds]) for k in keys},
            "checks": checks}


def checks_table(summary: Mapping[str, Any]) -> str:
    """Markdown: one row per check, its verdict at each seed, each condition's mean +- std."""
    seeds = summary["seeds"]
    rows = []
    for cid, c in summary["checks"].items():
        diffs = "; ".join(f"{label} {fmt(v['mean'], 2)} ± {fmt(v['std'], 2)}" for label, v in c["tests"].items())
        rows.append([f"[{cid}] {c['claim']}", *(c["verdicts"][str(s)] for s in seeds), diffs or "-"])
    return markdown_table(["Check", *(f"seed {s}" for s in seeds), "difference, mean ± std"], rows)


def numbers_table(summary: Mapping[str, Any], keep: Callable[[str], bool] = lambda k: True) -> str:
    """Markdown: one row per number (those ``keep`` accepts), mean, std and each seed's value."""
    seeds = summary["seeds"]
    rows = [[k, fmt(v["mean"], 2), fmt(v["std"], 2), *(fmt(x, 2) for x in v["values"])]
            for k, v in summary["numbers"].items() if keep(k)]
    return markdown_table(["Number", "mean", "std", *(f"seed {s}" for s in seeds)], rows)


def render_seeds_markdown(summary: Mapping[str, Any]) -> str:
    """results.md of a several-seed run."""
    seeds = ", ".join(str(s) for s in summary["seeds"])
    return "\n".join([
        f"# domainmerge demo ({summary['preset']} preset, seeds {seeds})", "",
        "Each seed is a full run of the pipeline (its own world, initialisation, training and bootstrap) in "
        "`seedS/`. Std is the sample standard deviation over the seeds (n - 1).", "",
        "## Checks: verdict per seed", "", checks_table(summary), "",
        "## Every number: mean and std over the seeds", "", numbers_table(summary), ""])


def run_seeds(preset: Preset, out: str | Path, seeds: Sequence[int], *, force: bool = False, jobs: int = 1,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo once per seed into ``out/seedS``; write and return the summary over seeds."""
    from domainmerge.reporting import write_json, write_markdown

    out = Path(out)
    # Every output is checked before the first run starts, not after an hour of training.
    for target in [out / "results.json", *(out / f"seed{s}" / "results.json" for s in seeds)]:
        if target.exists() and not force:
            raise UserError(f"{target} exists; pass ", Option("force", switch=True), " to overwrite the demo's outputs")
    runs = {}
    for s in seeds:
        log(f"=== seed {s} ===")
        runs[s] = run_demo(preset, out / f"seed{s}", seed=s, force=force, jobs=jobs, log=log)
    summary = summarize_seeds(runs)
    write_json(out / "results.json", summary)
    write_markdown(out / "results.md", render_seeds_markdown(summary))
    log("")
    log(checks_table(summary))
    log("")
    a, b = summary["targets"][:2]
    pair = f"H({group([a, b])})"
    headline = {f"{stda(a)} {pair}", f"{stda(b)} {pair}", f"{combined([a, b])} {pair}",
                f"{merged(group([a, b]), 'gaussian')} {pair}", f"{merged(group([a, b]), 'backbone_heads')} {pair}",
                f"{merged('all', 'gaussian')} H(all)"}
    log(numbers_table(summary, keep=lambda k: k in headline or k.startswith("check ")))
    log(f"wrote {out / 'results.json'}, {out / 'results.md'} and one folder per seed")
    return summary


__all__ = ["checks_table", "numbers", "numbers_table", "parse_seeds", "render_seeds_markdown", "run_seeds",
           "summarize_seeds"]

"""The demo's methods table: every merge method of domainmerge on the built-in world.

For a group of STDA models (the two-target pair and all targets) each method merges the same
models; every merged model is scored on each target's labeled val split. The task-vector
methods take the source-only model as their base (it is the shared start of every adaptation
run). Fisher merging and AdaMerging read unlabeled target *training* images (never labels, never
the val split) and are marked so. The knob sweeps (TIES density, DARE drop rate, task-arithmetic
lambda) are run on the largest group.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from domainmerge.demo.records import MethodRow, MethodsResult, stda
from domainmerge.merging import MergeSpec, merge_state_dicts
from domainmerge.merging.learned import adamerging, fisher_diagonal, fisher_merge
from domainmerge.tensors import harmonic_mean

StateDict = dict[str, Tensor]
Scorer = Callable[[Mapping[str, Tensor], Sequence[str]], dict[str, float]]

# (label, method, knobs): the defaults of the methods' papers (TIES density 0.2, DARE 0.9).
METHOD_ROWS: tuple[tuple[str, str, dict[str, float]], ...] = (
    ("linear (the paper's)", "linear", {}),
    ("task arithmetic, lambda 1.5", "task_arithmetic", {"lam": 1.5}),
    ("TIES, density 0.2", "ties", {"density": 0.2}),
    ("DARE + linear, drop 0.9", "dare_linear", {"drop": 0.9}),
    ("DARE + TIES, drop 0.9, density 0.2", "dare_ties", {"drop": 0.9, "density": 0.2}),
)
SWEEPS: dict[str, tuple[str, str, tuple[float, ...]]] = {
    "task_arithmetic": ("lam", "lambda", (0.5, 1.0, 1.5, 2.0, 3.0)),
    "ties": ("density", "density", (0.05, 0.1, 0.2, 0.5, 1.0)),
    "dare_linear": ("drop", "drop rate", (0.0, 0.3, 0.5, 0.7, 0.9)),
}


def _spec(method: str, knobs: Mapping[str, float], seed: int) -> MergeSpec:
    """The merge of a row: the method with its knobs, and the seed where it reads one (DARE)."""
    given: dict[str, Any] = {**knobs, **({"seed": seed} if method.startswith("dare") else {})}
    return MergeSpec.build(method, **given)


def methods_table(models: Mapping[str, Mapping[str, Tensor]], base: Mapping[str, Tensor],
                  groups: Mapping[str, Sequence[str]], score: Scorer, net: nn.Module,
                  images: Mapping[str, Tensor], *, extra: Mapping[str, Mapping[str, MethodRow]] | None = None,
                  adamerging_steps: int = 60, seed: int = 0) -> MethodsResult:
    """Merge each group's STDA models with every method and score them.

    Args:
        models: 'stda_<target>' -> state dict.
        base: the source-only state dict (task vectors are taken against it).
        groups: label -> targets merged in that group (e.g. {'city+idd': [...], 'all': [...]}).
        score: (state dict, domains) -> mIoU per domain on the labeled val splits.
        net: a network of the models' architecture (Fisher and AdaMerging run it).
        images: target -> normalised unlabeled training images [N, 3, H, W] (data-using methods only).
        extra: rows measured elsewhere to show in the table (group -> label -> row), e.g. the
            separate-heads variant and BN recalibration.
        adamerging_steps: AdaMerging's optimisation steps.
        seed: DARE's seed.

    Returns:
        The rows per group and the knob sweeps on the largest group.
    """
    result = MethodsResult(groups={g: list(t) for g, t in groups.items()})
    for g, targets in groups.items():
        sds = [models[stda(t)] for t in targets]
        rows = []
        for label, method, knobs in METHOD_ROWS:
            merged = merge_state_dicts(sds, base=None if method == "linear" else base,
                                       spec=_spec(method, knobs, seed))
            rows.append(MethodRow(label, method, score(merged, targets)))
        fishers = [fisher_diagonal(net, sd, images[t].split(8)) for sd, t in zip(sds, targets)]
        rows.append(MethodRow("Fisher merging", "fisher", score(fisher_merge(sds, fishers), targets), True))
        ada = adamerging(net, sds, base, [list(images[t].split(8)) for t in targets], steps=adamerging_steps)
        rows.append(MethodRow(f"AdaMerging (layer-wise, {adamerging_steps} steps)", "adamerging",
                              score(ada.state_dict, targets), True))
        result.rows[g] = rows
    result.add_rows(extra or {})
    largest = max(groups, key=lambda g: len(groups[g]))
    result.sweep_group = largest
    sds = [models[stda(t)] for t in groups[largest]]
    for method, (knob, _, values) in SWEEPS.items():
        hs = []
        for v in values:
            merged = merge_state_dicts(sds, base=base, spec=_spec(method, {knob: v}, seed))
            hs.append(harmonic_mean(list(score(merged, groups[largest]).values())))
        result.sweeps[method] = {"values": list(values), "H": hs}
    return result


def render_methods(result: MethodsResult) -> str:
    """Markdown: one table per group (mIoU per target, H, gain over linear in H, reads data?)."""
    from domainmerge.reporting import fmt, markdown_table

    parts: list[str] = []
    for g, rows in result.rows.items():
        doms = result.groups[g]
        linear = next(r.h(doms) for r in rows if r.method == "linear")
        header = ["Method", *doms, "H", "H - linear", "reads target data"]
        body = [[r.label, *(fmt(r.scores[d]) for d in doms), fmt(r.h(doms)), f"{r.h(doms) - linear:+.1f}",
                 "yes" if r.uses_data else "no"] for r in rows]
        title = "all targets" if g == "all" else g
        parts += [f"## Merge methods, {title}", "", markdown_table(header, body), ""]
    if result.sweeps:
        parts += [f"## Knob sweeps ({result.sweep_group}, H)", ""]
        for method, sweep in result.sweeps.items():
            name = SWEEPS[method][1]
            parts.append(f"- {method}: " + ", ".join(f"{name} {v:g}: {h:.1f}"
                                                     for v, h in zip(sweep["values"], sweep["H"])))
        parts.append("")
    return "\n".join(parts)


def plot_sweeps(result: MethodsResult, out: str | Path) -> Path:
    """methods.png: H against each method's main knob, with the linear merge as a dashed line."""
    from domainmerge.reporting import plot_panels

    doms = result.groups[result.sweep_group]
    linear = next(r.h(doms) for r in result.rows[result.sweep_group] if r.method == "linear")
    path = Path(out) / "methods.png"
    plot_panels({method: {method: (sweep["values"], sweep["H"], "-o")} for method, sweep in result.sweeps.items()},
                path, xlabel={method: SWEEPS[method][1] for method in result.sweeps},
                ylabel=f"H over {len(doms)} targets (mIoU %)", reference=("linear", linear), width=4.0)
    return path


__all__ = ["METHOD_ROWS", "SWEEPS", "MethodRow", "MethodsResult", "methods_table",
           "plot_sweeps", "render_methods"]

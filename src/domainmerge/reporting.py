"""How results are shown and saved: Markdown tables like the paper's, plots, JSON and CSV files.

Every command, ``analysis.lmc`` and ``alignment.diagnostics`` render through this module so
tables look the same everywhere: scores in percent with one decimal, one column per domain
followed by the harmonic mean H (the paper's primary number) and the arithmetic mean. NaN (a
score that does not exist) prints as "n/a" and is saved as JSON null / an empty CSV cell.

Layer: reporting sits below evaluation, alignment, training and the demo (docs/CONTRACTS.md,
"Layers"): it takes plain data (mappings, sequences, floats) and objects by their attributes
(a ``SegScores`` is anything with ``iou``, ``miou``, ``class_names``; a result with ``to_dict()``
is saved as that dict), and imports none of the modules whose results it renders.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from domainmerge.fsutil import atomic_path, write_text_atomic
from domainmerge.tensors import arithmetic_mean, harmonic_mean

MISSING = "n/a"


class ClassScores(Protocol):
    """What the class tables read of ``domainmerge.evaluation.SegScores``."""

    @property
    def iou(self) -> Any: ...            # per class, indexable
    @property
    def miou(self) -> float: ...
    @property
    def class_names(self) -> tuple[str, ...]: ...


def fmt(value: float | None, digits: int = 1) -> str:
    """A score with ``digits`` decimals; None or NaN as 'n/a'."""
    if value is None or math.isnan(value):
        return MISSING
    return f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table; the first column left-aligned, the others right-aligned."""
    cells = [list(header)] + [list(r) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join([":" + "-" * (widths[0] + 1)] + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|"
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def summarize(per_domain: Mapping[str, float]) -> dict[str, float]:
    """H and the arithmetic mean of per-domain scores (NaN when a domain's score is NaN)."""
    values = list(per_domain.values())
    return {"H": harmonic_mean(values), "mean": arithmetic_mean(values)}


def _domains_of(results: Mapping[str, Mapping[str, float]], domains: Sequence[str] | None) -> list[str]:
    if domains is not None:
        return list(domains)
    order: list[str] = []
    for per_domain in results.values():
        order += [d for d in per_domain if d not in order]
    return order


def domain_rows(results: Mapping[str, Mapping[str, float]], *, domains: Sequence[str] | None = None,
                with_h: bool = True, name: str = "model") -> list[dict[str, Any]]:
    """One dict per model: its per-domain scores, then H and mean (over 2+ domains, if asked).

    A model missing a domain gets NaN there and NaN for H and mean.
    """
    cols = _domains_of(results, domains)
    out = []
    for model, per_domain in results.items():
        row: dict[str, Any] = {name: model}
        values = {d: float(per_domain.get(d, math.nan)) for d in cols}
        row.update(values)
        if with_h and len(cols) > 1:
            row.update(summarize(values))
        out.append(row)
    return out


def domain_table(results: Mapping[str, Mapping[str, float]], *, domains: Sequence[str] | None = None,
                 with_h: bool = True, name: str = "Model") -> str:
    """Markdown: one row per model, one column per domain, then H and Mean (paper-style).

    ``results[model][domain]`` is a score in percent, typically mIoU.
    """
    rows = domain_rows(results, domains=domains, with_h=with_h, name=name)
    cols = _domains_of(results, domains)
    extra = ["H", "mean"] if with_h and len(cols) > 1 else []
    header = [name] + cols + [("Mean" if c == "mean" else c) for c in extra]
    body = [[str(r[name])] + [fmt(r[c]) for c in cols + extra] for r in rows]
    return markdown_table(header, body)


def interval_table(intervals: Mapping[str, Mapping[str, Any]], *, columns: Sequence[str] | None = None,
                   name: str = "Model", signed: bool = False) -> str:
    """Markdown: one row per model, one cell per column, each 'estimate [low, high]'.

    ``intervals[model][column]`` is a ``domainmerge.evaluation.bootstrap.Interval`` (a
    difference when ``signed``: '+1.2 [-0.3, +2.8]'); a missing cell prints as n/a.
    """
    cols = _domains_of(intervals, columns)
    body = [[str(model)] + [per[c].format(signed=signed) if c in per else MISSING for c in cols]
            for model, per in intervals.items()]
    return markdown_table([name, *cols], body)


def class_rows(scores_by_domain: Mapping[str, ClassScores]) -> list[dict[str, Any]]:
    """One dict per class with its IoU in each domain, then an 'mIoU' row."""
    domains = list(scores_by_domain)
    names = _class_names(scores_by_domain)
    rows: list[dict[str, Any]] = [
        {"class": n, **{d: scores_by_domain[d].iou[i] for d in domains}} for i, n in enumerate(names)
    ]
    rows.append({"class": "mIoU", **{d: scores_by_domain[d].miou for d in domains}})
    return rows


def class_table(scores_by_domain: Mapping[str, ClassScores]) -> str:
    """Markdown: per-class IoU rows (and a final mIoU row) by domain columns."""
    domains = list(scores_by_domain)
    body = [[str(r["class"])] + [fmt(r[d]) for d in domains] for r in class_rows(scores_by_domain)]
    return markdown_table(["Class"] + domains, body)


def _class_names(scores_by_domain: Mapping[str, ClassScores]) -> tuple[str, ...]:
    names = {s.class_names for s in scores_by_domain.values()}
    if len(names) != 1:
        raise ValueError("all domains must be scored over the same classes")
    return names.pop()


def jsonable(obj: Any) -> Any:
    """``obj`` with NaN/inf floats as None, results with ``to_dict()`` (SegScores, Interval ...)
    as that dict, dataclasses as dicts of their fields, tuples and mappings made plain."""
    to_dict = getattr(obj, "to_dict", None)
    if callable(to_dict) and not isinstance(obj, type):
        return jsonable(to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else obj
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return jsonable(obj.item())
    return obj


def to_json(obj: Any) -> str:
    """Strict JSON text (no NaN tokens: they become null), indented, newline-terminated."""
    return json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n"


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """CSV text with a header of every key in first-seen order; floats with 4 decimals, NaN empty."""
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(v) for k, v in row.items()})
    return buf.getvalue()


def _csv_cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}"
    return value


def write_json(path: str | os.PathLike[str], obj: Any, *, replace: bool | None = None) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (``replace``: see fsutil.atomic_path)."""
    write_text_atomic(path, to_json(obj), replace=replace)


def write_csv(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]], *,
              replace: bool | None = None) -> None:
    """Write ``rows`` as CSV to ``path`` atomically."""
    write_text_atomic(path, to_csv(rows), replace=replace)


def write_markdown(path: str | os.PathLike[str], text: str, *, replace: bool | None = None) -> None:
    """Write Markdown ``text`` to ``path`` atomically (newline-terminated)."""
    write_text_atomic(path, text if text.endswith("\n") else text + "\n", replace=replace)


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 120, *, replace: bool | None = None) -> None:
    """Write a matplotlib figure as PNG atomically (temporary file, then rename) and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path, replace=replace) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        plt.close(fig)


# -- linear mode connectivity (analysis.lmc) --------------------------------------------------
def point_label(weights: Sequence[float]) -> str:
    """'0.30' (lambda, the weight of the second model) for two models, '0.50/0.25/0.25' beyond."""
    return f"{weights[1]:.2f}" if len(weights) == 2 else "/".join(f"{w:.2f}" for w in weights)


def lmc_markdown(rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Mapping[str, Any]],
                 names: Sequence[str]) -> str:
    """Markdown of ``analysis.lmc.scan`` rows and ``barriers`` summary: the scores at every point
    (mIoU per domain, H), then per metric the barrier and the dip below the line."""
    domains = list(rows[0]["scores"])
    k = len(names)
    first = "lambda" if k == 2 else "weights (" + " / ".join(names) + ")"
    body = [[point_label(r["weights"])] + [fmt(r["scores"][d]) for d in domains] + [fmt(r["H"])] for r in rows]
    table = markdown_table([first, *domains, "H"], body)
    where = "lambda" if k == 2 else "weights"
    brows = [[m, fmt(s["endpoint_mean"]), fmt(s["min"]), point_label(s["argmin"]), fmt(s["barrier"]),
              fmt(s["dip_below_line"]), fmt(s["max"]), point_label(s["argmax"])] for m, s in summary.items()]
    btable = markdown_table(["metric", "mean of ends", "min", f"min at {where}", "barrier", "dip below line",
                             "max", f"max at {where}"], brows)
    ends = "end points" if k == 2 else "vertices"
    head = (f"Interpolation between {' and '.join(names)}" if k == 2
            else f"Simplex of {', '.join(names)}")
    return (f"{head} (mIoU %, H = harmonic mean over domains)\n\n{table}\n\n"
            f"Barrier = mean of the {ends} - minimum over the {'curve' if k == 2 else 'grid'} (Git Re-Basin's "
            f"form). Dip below line = largest drop below the linear interpolation of the {ends}' own scores "
            f"(<= 0: never below it).\n\n{btable}\n")


def plot_lmc_curve(rows: Sequence[Mapping[str, Any]], names: Sequence[str], path: str | Path) -> None:
    """PNG: mIoU per domain and H against lambda; dashed, the straight line between each curve's
    end points (its midpoint is the level the barrier is measured from)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lams = [r["weights"][1] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for metric in [*rows[0]["scores"], "H"]:
        ys = [r["H"] if metric == "H" else r["scores"][metric] for r in rows]
        line, = ax.plot(lams, ys, marker="o", lw=2.5 if metric == "H" else 1.5, label=metric)
        ax.plot([0, 1], [ys[0], ys[-1]], ls="--", lw=0.8, color=line.get_color())
    ax.set_xlabel(f"lambda  ({names[0]} -> {names[1]})")
    ax.set_ylabel("mIoU (%)")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def plot_lmc_simplex(rows: Sequence[Mapping[str, Any]], names: Sequence[str], path: str | Path) -> None:
    """PNG: one ternary heat map per domain and for H over the 3-model simplex."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.tri as mtri

    corners = [(0.0, 0.0), (1.0, 0.0), (0.5, math.sqrt(3) / 2)]
    xs = [sum(w * c[0] for w, c in zip(r["weights"], corners)) for r in rows]
    ys = [sum(w * c[1] for w, c in zip(r["weights"], corners)) for r in rows]
    tri = mtri.Triangulation(xs, ys)
    metrics = [*rows[0]["scores"], "H"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        zs = [r["H"] if metric == "H" else r["scores"][metric] for r in rows]
        art = ax.tripcolor(tri, zs, shading="gouraud", cmap="viridis")
        ax.plot([c[0] for c in [*corners, corners[0]]], [c[1] for c in [*corners, corners[0]]], color="k", lw=0.8)
        for (cx, cy), name in zip(corners, names):
            ax.annotate(name, (cx, cy), ha="center", va="top" if cy == 0 else "bottom", fontsize=8)
        ax.set_title(f"{metric} (mIoU %)" if metric != "H" else "H")
        ax.set_aspect("equal")
        ax.axis("off")
        fig.colorbar(art, ax=ax, shrink=0.8)
    fig.tight_layout()
    save_figure(fig, path)


# -- task-vector diagnostics (alignment.diagnostics) -------------------------------------------
def _fmt_or_dash(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def inspect_markdown(summaries: Sequence[Mapping[str, Any]], comparison: Mapping[str, Any] | None,
                     diagnostics: str | None, warnings: Sequence[str | None] = ()) -> str:
    """``domainmerge inspect``'s report: per checkpoint its format, prefixes, dtypes, BatchNorm
    layers, warning (``warnings[i]`` for ``summaries[i]``, in bold) and a module table; then
    whether they can be merged with per-module distances; then the task-vector diagnostics."""
    lines: list[str] = []
    for s, warning in zip(summaries, [*warnings, *[None] * len(summaries)]):
        lines.append(f"## {s['file']}")
        lines.append(f"format: {s['format']}" + (f"; other entries: {', '.join(s['extras'])}" if s["extras"] else ""))
        lines.append(f"prefixes: {', '.join(s['prefixes']) or 'none'}")
        lines.append(f"tensors: {s['tensors']}; parameters: {s['parameters']:,}; dtypes: "
                     + ", ".join(f"{d} x{n}" for d, n in s["dtypes"].items()))
        bn = f"BatchNorm layers: {s['bn_layers']}"
        if s["bn_layers"]:
            bn += f"; num_batches_tracked: {', '.join(map(str, s['bn_counts'])) or 'none'}"
            if s["bn_layers_without_count"]:
                bn += f" ({s['bn_layers_without_count']} layers without a count)"
        lines.append(bn)
        if warning:
            lines.append(f"**{warning}**")
        lines.append("")
        lines.append("| module | tensors | parameters |")
        lines.append("|---|---:|---:|")
        for name, m in s["modules"].items():
            lines.append(f"| {name} | {m['tensors']} | {m['parameters']:,} |")
        lines.append("")
    if comparison is not None:
        lines.append("## can they be merged?")
        lines.append(("yes: " if comparison["mergeable"] else "no: ") + comparison["reason"])
        for other, groups in comparison["distances"].items():
            lines.append("")
            lines.append(f"distance of {other} from {summaries[0]['file']}:")
            lines.append("")
            lines.append("| module | relative L2 of parameters | mean abs diff of BN means |")
            lines.append("|---|---:|---:|")
            for g, d in groups.items():
                rel, bn = _fmt_or_dash(d["rel_l2"], ".4f"), _fmt_or_dash(d["bn_mean_abs_diff"], ".4g")
                lines.append(f"| {g} | {rel} | {bn} |")
        lines.append("")
    if diagnostics:
        lines.append(diagnostics)
    return "\n".join(lines).rstrip() + "\n"


def alignment_markdown(report: Any) -> str:
    """``domainmerge align``'s report of an ``AlignmentReport``: one row per permutation (units,
    identity %), then the unit-weighted total and the tensors kept fixed."""
    rows = [[p, str(n), f"{100 * report.identity[p]:.1f}"] for p, n in report.sizes.items()]
    rows.append(["all (unit-weighted)", str(sum(report.sizes.values())), f"{100 * report.overall:.1f}"])
    fixed = f"\nKept fixed (read outside the backbone): {', '.join(report.fixed)}\n" if report.fixed else ""
    return (f"Weight matching under {report.prefix!r} ({report.family}): {len(report.sizes)} permutations, "
            f"{report.rounds} rounds, {report.seconds:.1f} s\n\n"
            + markdown_table(["permutation", "units", "identity %"], rows) + "\n" + fixed)


def task_vector_markdown(report: Mapping[str, Any]) -> str:
    """Markdown of ``alignment.diagnostics.task_vector_report``: per-module relative task-vector
    norms and cosines, identity fractions, verdict."""
    names = report["models"]
    pairs = [(c["a"], c["b"]) for c in report["overall"]["cosine"]]
    short = {n: Path(n).name for n in names} if len({Path(n).name for n in names}) == len(names) else {}

    def cell(x: float | None, scale: float = 1.0, digits: int = 3) -> str:
        return "n/a" if x is None else f"{scale * x:.{digits}f}"

    def label(n: str) -> str:
        return short.get(n, n)

    header = (["module", "params"] + [f"rel. norm % {label(n)}" for n in names]
              + [f"cos {label(a)} / {label(b)}" for a, b in pairs])
    rows = []
    for m in [*report["modules"], report["overall"]]:
        rows.append([m["module"], str(m["params"])] + [cell(m["relative"][n], 100, 2) for n in names]
                    + [cell(c["cosine"]) for c in m["cosine"]])
    lines = ["Task vectors (model - base), norms relative to the base weights:", "",
             markdown_table(header, rows), ""]
    if report["excluded_keys"]:
        lines.append(f"Not in the base (left out): {len(report['excluded_keys'])} tensors, e.g. "
                     f"{report['excluded_keys'][0]}")
    ident = ", ".join(f"{label(n)} {cell(f, 100, 1)}%" for n, f in report["identity"].items())
    lines.append(f"Weight matching to {label(report['identity_reference'])}, units kept in place: {ident} "
                 f"({report['identity_note']})")
    lines += ["", f"Verdict: {report['verdict']['text']}", ""]
    return "\n".join(lines)


# -- generic plots (the demo's figures) ---------------------------------------------------------
def plot_panels(panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float], str]]],
                path: str | os.PathLike[str], *, xlabel: str | Mapping[str, str], ylabel: str,
                reference: tuple[str, float] | None = None, width: float = 5.0, dpi: int = 110,
                replace: bool | None = None) -> None:
    """PNG: side by side, one panel per ``panels`` entry (its title), each a line plot of its
    series ``{label: (x, y, matplotlib format such as '-o')}`` on a shared y axis; ``xlabel``
    one for all or per panel; ``reference`` (label, y) a dashed horizontal line in every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 3.8), sharey=True, squeeze=False)
    for ax, (title, series) in zip(axes[0], panels.items()):
        for label, (xs, ys, style) in series.items():
            ax.plot(list(xs), list(ys), style, label=label)
        if reference is not None:
            ax.axhline(reference[1], color="k", ls="--", lw=1, label=reference[0])
        ax.set_title(title)
        ax.set_xlabel(xlabel if isinstance(xlabel, str) else xlabel[title])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(ylabel)
    fig.tight_layout()
    save_figure(fig, path, dpi=dpi, replace=replace)


def plot_bars(values: Mapping[str, Mapping[str, float]], path: str | os.PathLike[str], *, title: str, ylabel: str,
              dpi: int = 110, replace: bool | None = None) -> None:
    """PNG: grouped bars, one group per ``values`` entry (its x tick label) with one bar per
    series ``values[group][series]`` (series in first-seen order, a legend entry each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(values)
    series: list[str] = []
    for per in values.values():
        series += [k for k in per if k not in series]
    fig, ax = plt.subplots(figsize=(10, 3.8))
    width = 0.8 / max(1, len(series))
    for i, key in enumerate(series):
        offset = (i - (len(series) - 1) / 2) * width
        ax.bar([x + offset for x in range(len(groups))], [values[g].get(key, math.nan) for g in groups], width,
               label=key)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=dpi, replace=replace)

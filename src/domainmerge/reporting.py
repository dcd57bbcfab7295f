"""How results are shown and saved: Markdown tables like the paper's, JSON and CSV files.

Every command prints through this module so tables look the same everywhere: scores in
percent with one decimal, one column per domain followed by the harmonic mean H (the paper's
primary number) and the arithmetic mean. NaN (a score that does not exist) prints as "n/a"
and is saved as JSON null / an empty CSV cell.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from domainmerge.evaluation.metrics import SegScores, arithmetic_mean, harmonic_mean
from domainmerge.fsutil import write_text_atomic

MISSING = "n/a"


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


def class_rows(scores_by_domain: Mapping[str, SegScores]) -> list[dict[str, Any]]:
    """One dict per class with its IoU in each domain, then an 'mIoU' row."""
    domains = list(scores_by_domain)
    names = _class_names(scores_by_domain)
    rows: list[dict[str, Any]] = [
        {"class": n, **{d: scores_by_domain[d].iou[i] for d in domains}} for i, n in enumerate(names)
    ]
    rows.append({"class": "mIoU", **{d: scores_by_domain[d].miou for d in domains}})
    return rows


def class_table(scores_by_domain: Mapping[str, SegScores]) -> str:
    """Markdown: per-class IoU rows (and a final mIoU row) by domain columns."""
    domains = list(scores_by_domain)
    body = [[str(r["class"])] + [fmt(r[d]) for d in domains] for r in class_rows(scores_by_domain)]
    return markdown_table(["Class"] + domains, body)


def _class_names(scores_by_domain: Mapping[str, SegScores]) -> tuple[str, ...]:
    names = {s.class_names for s in scores_by_domain.values()}
    if len(names) != 1:
        raise ValueError("all domains must be scored over the same classes")
    return names.pop()


def jsonable(obj: Any) -> Any:
    """``obj`` with NaN/inf floats as None and SegScores/tuples/mappings made plain."""
    if isinstance(obj, SegScores):
        return obj.to_dict()
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

    from domainmerge.fsutil import atomic_path

    try:
        with atomic_path(path, replace=replace) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        plt.close(fig)

"""Linear mode connectivity: scores along the segment (or simplex) between models, and barriers.

Interpolated models come from the merge kernels (``domainmerge.merging.interpolate`` /
``merge_state_dicts``), never from a second averaging implementation, so a curve's point at
lambda = 0.5 is exactly what ``domainmerge merge`` writes.

Barrier, Git Re-Basin's form (PAPER.md): for a loss, B = max_lambda L(theta_lambda) -
(L(theta_0) + L(theta_1)) / 2; for an accuracy-like score such as mIoU, the drop of the curve's
minimum below the mean of its end points, B = (m_0 + m_1) / 2 - min_lambda m_lambda. Since the
end points lie on the curve, B >= 0, and B equals |m_0 - m_1| / 2 for a monotone curve without
a dip. Over a simplex of K models the end points become its K vertices.

Because per-domain curves of models adapted to different domains have very different end
points, the tables also give the dip below the straight line between the end points
(Frankle et al.'s form): max_lambda ((1 - lambda) m_0 + lambda m_1 - m_lambda), over a simplex
max_w (sum_k w_k m_k - m_w); <= 0 when the curve never falls below that line.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from domainmerge.errors import UserError


def barrier(values: Sequence[float], endpoints: Sequence[float] | None = None, *,
            higher_is_better: bool = True) -> float:
    """Git Re-Basin barrier of a curve ``values`` (end points ``values[0]``, ``values[-1]`` unless
    ``endpoints`` are given): mean(endpoints) - min(values) for scores, max(values) - mean(endpoints)
    for losses. NaN if any value is NaN."""
    if not values:
        raise ValueError("barrier of an empty curve")
    ends = [values[0], values[-1]] if endpoints is None else list(endpoints)
    if any(math.isnan(v) for v in [*values, *ends]):
        return math.nan
    mean_ends = sum(ends) / len(ends)
    return mean_ends - min(values) if higher_is_better else max(values) - mean_ends


def dip_below_line(values: Sequence[float], weights: Sequence[Sequence[float]],
                   vertex_values: Sequence[float]) -> float:
    """max over points of (sum_k w_k * vertex_values[k] - value): how far the scores fall below the
    linear interpolation of the models' own scores (NaN if any value is NaN)."""
    if any(math.isnan(v) for v in [*values, *vertex_values]):
        return math.nan
    return max(sum(wk * vk for wk, vk in zip(w, vertex_values)) - v for v, w in zip(values, weights))


def lambda_grid(steps: int) -> list[float]:
    """``steps`` evenly spaced lambdas from 0 to 1 inclusive."""
    if steps < 2:
        raise UserError(f"--steps {steps}: need at least 2 (the two end points)")
    return [i / (steps - 1) for i in range(steps)]


def simplex_grid(k: int, points_per_edge: int) -> list[tuple[float, ...]]:
    """Weight vectors (w_1..w_k >= 0, sum 1) on a regular grid over the simplex, with
    ``points_per_edge`` points along each edge (vertices included): all w = c / (g - 1) with
    integer c summing to g - 1."""
    if k < 2:
        raise UserError("need at least 2 models")
    if points_per_edge < 2:
        raise UserError(f"--grid {points_per_edge}: need at least 2 points per edge")
    n = points_per_edge - 1
    out = []
    for cuts in itertools.combinations(range(n + k - 1), k - 1):  # stars and bars
        parts = [b - a - 1 for a, b in zip((-1, *cuts), (*cuts, n + k - 1))]
        out.append(tuple(c / n for c in parts))
    return sorted(out, reverse=True)


def interpolated(state_dicts: Sequence[Mapping[str, Tensor]], weights: Sequence[float],
                 buffers: str = "gaussian") -> dict[str, Tensor]:
    """The model at ``weights`` on the segment/simplex spanned by ``state_dicts`` (merge kernels)."""
    from domainmerge.merging import interpolate, merge_state_dicts

    if len(state_dicts) == 2:
        return interpolate(state_dicts[0], state_dicts[1], weights[1], buffers=buffers)
    return merge_state_dicts(state_dicts, weights=list(weights), buffers=buffers)


def scan(state_dicts: Sequence[Mapping[str, Tensor]], points: Iterable[Sequence[float]],
         score: Callable[[dict[str, Tensor]], Mapping[str, float]], buffers: str = "gaussian",
         ) -> list[dict[str, Any]]:
    """Score each interpolated model: one row per point with 'weights', per-domain scores and H."""
    from domainmerge.evaluation.metrics import harmonic_mean

    rows = []
    for w in points:
        per_domain = dict(score(interpolated(state_dicts, w, buffers)))
        rows.append({"weights": list(w), "scores": per_domain, "H": harmonic_mean(per_domain.values())})
    return rows


def barriers(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per domain and for H: the barrier, the mean of the end points (the simplex's vertices),
    the curve's minimum and where it lies, and the best point."""
    k = len(rows[0]["weights"])
    vertices = sorted((r for r in rows if max(r["weights"]) == 1.0), key=lambda r: list(r["weights"]).index(1.0))
    if len(vertices) != k:
        raise ValueError("the grid must contain every model itself (its vertices)")
    out = {}
    for metric in [*rows[0]["scores"], "H"]:
        def value(r: Mapping[str, Any], m: str = metric) -> float:
            return float(r["H"] if m == "H" else r["scores"][m])
        values = [value(r) for r in rows]
        ends = [value(r) for r in vertices]
        finite = [r for r in rows if not math.isnan(value(r))]
        worst = min(finite, key=value) if finite else rows[0]
        best = max(finite, key=value) if finite else rows[0]
        out[metric] = {"barrier": barrier(values, ends), "endpoint_mean": sum(ends) / k,
                       "dip_below_line": dip_below_line(values, [r["weights"] for r in rows], ends),
                       "min": value(worst),
                       "argmin": worst["weights"], "max": value(best), "argmax": best["weights"]}
    return out


def point_label(weights: Sequence[float]) -> str:
    """'0.30' (lambda, the weight of the second model) for two models, '0.50/0.25/0.25' beyond."""
    return f"{weights[1]:.2f}" if len(weights) == 2 else "/".join(f"{w:.2f}" for w in weights)


def render(rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Mapping[str, Any]],
           names: Sequence[str]) -> str:
    """Markdown: the scores at every point (mIoU per domain, H), then the barriers."""
    from domainmerge.reporting import fmt, markdown_table

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


def plot_curve(rows: Sequence[Mapping[str, Any]], names: Sequence[str], path: str | Path) -> None:
    """PNG: mIoU per domain and H against lambda; dashed, the straight line between each curve's
    end points (its midpoint is the level the barrier is measured from)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from domainmerge.reporting import save_figure

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


def plot_ternary(rows: Sequence[Mapping[str, Any]], names: Sequence[str], path: str | Path) -> None:
    """PNG: one ternary heat map per domain and for H over the 3-model simplex."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.tri as mtri

    from domainmerge.reporting import save_figure

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

"""Linear mode connectivity: scores along the segment (or simplex) between models, and barriers.

Interpolated models come from the merge kernels (``domainmerge.merging.interpolate`` /
``merge_state_dicts``), never from a second averaging implementation, so a curve's point at
lambda = 0.5 is exactly what ``domainmerge merge`` writes.

Two quantities, one name each, here, in the demo, the reports and the README:

*Barrier* (:func:`barrier`): Git Re-Basin's form (Ainsworth et al., ICLR 2023), the one the
paper's linear-mode-connectivity analysis states (arXiv 2407.13771, "Empirical Analysis for
Linear Mode Connectivity"): for a loss, B = max_lambda L(theta_lambda) - (L(theta_0) +
L(theta_1)) / 2; for an accuracy-like score such as mIoU, the drop of the curve's minimum
below the mean of its end points, B = (m_0 + m_1) / 2 - min_lambda m_lambda. Since the end
points lie on the curve, B >= 0, and B equals |m_0 - m_1| / 2 for a monotone curve without a
dip. Over a simplex of K models the end points become its K vertices.

*Dip below the line* (:func:`dip_below_line`): per-domain curves of models adapted to
different domains have very different end points, so the tables also give how far the curve
falls below the straight line between its end points (Frankle et al.'s form):
max_lambda ((1 - lambda) m_0 + lambda m_1 - m_lambda), over a simplex max_w (sum_k w_k m_k -
m_w); <= 0 when the curve never falls below that line.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TypedDict

from torch import Tensor

from domainmerge.errors import Option, UserError


class ScanRow(TypedDict):
    """One point of a scan (:func:`scan`): its weights over the models, mIoU per domain and their H."""

    weights: list[float]
    scores: dict[str, float]
    H: float


class CurveSummary(TypedDict):
    """One domain's (or H's) numbers over a scan (:func:`barriers`)."""

    barrier: float
    endpoint_mean: float
    dip_below_line: float
    min: float
    argmin: list[float]
    max: float
    argmax: list[float]


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
        raise UserError(Option("steps", steps), ": need at least 2 (the two end points)")
    return [i / (steps - 1) for i in range(steps)]


def simplex_grid(k: int, points_per_edge: int) -> list[tuple[float, ...]]:
    """Weight vectors (w_1..w_k >= 0, sum 1) on a regular grid over the simplex, with
    ``points_per_edge`` points along each edge (vertices included): all w = c / (g - 1) with
    integer c summing to g - 1."""
    if k < 2:
        raise UserError("need at least 2 models")
    if points_per_edge < 2:
        raise UserError(Option("grid", points_per_edge), ": need at least 2 points per edge")
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
         ) -> list[ScanRow]:
    """Score each interpolated model: one row per point with 'weights', per-domain scores and H."""
    from domainmerge.evaluation.metrics import harmonic_mean

    rows: list[ScanRow] = []
    for w in points:
        per_domain = dict(score(interpolated(state_dicts, w, buffers)))
        rows.append(ScanRow(weights=list(w), scores=per_domain, H=harmonic_mean(per_domain.values())))
    return rows


def barriers(rows: Sequence[ScanRow]) -> dict[str, CurveSummary]:
    """Per domain and for H: the barrier, the mean of the end points (the simplex's vertices),
    the curve's minimum and where it lies, and the best point."""
    k = len(rows[0]["weights"])
    vertices = sorted((r for r in rows if max(r["weights"]) == 1.0), key=lambda r: list(r["weights"]).index(1.0))
    if len(vertices) != k:
        raise ValueError("the grid must contain every model itself (its vertices)")
    out: dict[str, CurveSummary] = {}
    for metric in [*rows[0]["scores"], "H"]:
        def value(r: ScanRow, m: str = metric) -> float:
            return float(r["H"] if m == "H" else r["scores"][m])
        values = [value(r) for r in rows]
        ends = [value(r) for r in vertices]
        finite = [r for r in rows if not math.isnan(value(r))]
        worst = min(finite, key=value) if finite else rows[0]
        best = max(finite, key=value) if finite else rows[0]
        out[metric] = CurveSummary(barrier=barrier(values, ends), endpoint_mean=sum(ends) / k,
                                   dip_below_line=dip_below_line(values, [r["weights"] for r in rows], ends),
                                   min=value(worst), argmin=worst["weights"], max=value(best),
                                   argmax=best["weights"])
    return out


def render(rows: Sequence[ScanRow], summary: Mapping[str, CurveSummary],
           names: Sequence[str]) -> str:
    """Markdown of a scan and its barriers (:func:`domainmerge.reporting.lmc_markdown`)."""
    from domainmerge.reporting import lmc_markdown

    return lmc_markdown(rows, summary, names)


def plot_curve(rows: Sequence[ScanRow], names: Sequence[str], path: str | Path) -> None:
    """PNG of a two-model scan (:func:`domainmerge.reporting.plot_lmc_curve`)."""
    from domainmerge.reporting import plot_lmc_curve

    plot_lmc_curve(rows, names, path)


def plot_ternary(rows: Sequence[ScanRow], names: Sequence[str], path: str | Path) -> None:
    """PNG of a three-model scan (:func:`domainmerge.reporting.plot_lmc_simplex`)."""
    from domainmerge.reporting import plot_lmc_simplex

    plot_lmc_simplex(rows, names, path)

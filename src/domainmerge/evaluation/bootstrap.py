"""Bootstrap confidence intervals over validation images: mIoU, H across domains, and the paired
difference of two models scored on the same images.

A resample draws N images with replacement from a domain's N val images; it is a vector of
counts (how often each image was drawn), so the resampled split's counts are
``counts @ ImageStats.intersection`` and ``counts @ ImageStats.union`` and its mIoU follows
exactly as for the real split (split-level counts, classes with an empty union excluded). R
resamples are one [R, N] count matrix times the [N, C] statistics: no loop over resamples.

- Every model scored on a domain sees the *same* resamples of that domain's images, so the
  difference of two models is paired (its interval is much narrower than the two intervals
  suggest when the models err on the same images; a model against itself gives exactly 0).
- Domains are resampled independently of each other; H of a resample is the harmonic mean of
  its per-domain mIoUs.
- Intervals are percentile intervals (Efron & Tibshirani 1993, ch. 13): the (1 - level) / 2 and
  (1 + level) / 2 quantiles of the R resampled statistics. Not BCa: its bias correction
  z0 = Phi^-1(share of resamples below the estimate) is undefined or erratic for the statistics
  this project compares most, paired differences of nearly identical models, where many or all
  resamples equal the estimate exactly (z0 = -inf for a model against itself); the percentile
  interval stays exact there (zero width), and its coverage for a mean over 50 images is
  checked in the tests.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from domainmerge.errors import Option, UserError
from domainmerge.evaluation.metrics import ImageStats, harmonic_mean

VERDICTS = ("PASS", "FAIL", "TIE")
SIDES = (">=", ">", "<=", "<")


@dataclass(frozen=True)
class Interval:
    """A point estimate (the statistic on the real split) and its bootstrap interval."""

    estimate: float
    low: float
    high: float
    level: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: estimate, low, high, level (NaN as None)."""
        return {k: (None if math.isnan(v) else float(v))
                for k, v in (("estimate", self.estimate), ("low", self.low), ("high", self.high),
                             ("level", self.level))}

    def format(self, digits: int = 1, signed: bool = False) -> str:
        """'34.1 [32.0, 36.3]' (``signed``: '+1.2 [-0.3, +2.8]', for differences)."""
        spec = f"{'+' if signed else ''}.{digits}f"
        if any(math.isnan(v) for v in (self.estimate, self.low, self.high)):
            return "n/a"
        return f"{self.estimate:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"


def check_settings(resamples: int, level: float) -> None:
    """UserError unless ``resamples`` >= 1 and 0 < ``level`` < 1."""
    if resamples < 1:
        raise UserError(Option("resamples", resamples), ": must be at least 1 (1000 is usual)")
    if not 0.0 < level < 1.0:
        raise UserError(Option("level", level), ": must lie strictly between 0 and 1, e.g. 0.95")


def resample_counts(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[R, n] int64: how often each of ``n`` images is drawn in each of R resamples of size n."""
    if n < 1:
        raise UserError("cannot bootstrap a split without images")
    draws = rng.integers(0, n, size=(resamples, n))
    # One bincount over (resample, image) keys turns the draws into counts.
    keys = (np.arange(resamples)[:, None] * n + draws).ravel()
    return np.bincount(keys, minlength=resamples * n).reshape(resamples, n)


def miou_from_sums(intersection: np.ndarray, union: np.ndarray) -> np.ndarray:
    """mIoU (percent) per row of summed counts [..., C]: classes with an empty union excluded
    (mmseg's nanmean), NaN where every class is excluded."""
    inter, uni = np.asarray(intersection, dtype=np.float64), np.asarray(union, dtype=np.float64)
    present = uni > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(present, inter / np.where(present, uni, 1.0), 0.0) * 100.0
        return iou.sum(-1) / present.sum(-1)


def miou_samples(stats: ImageStats, counts: np.ndarray) -> np.ndarray:
    """[R] mIoU of each resample (rows of ``counts`` [R, N], N = len(stats))."""
    if counts.shape[-1] != len(stats):
        raise ValueError(f"counts cover {counts.shape[-1]} images, the statistics {len(stats)}")
    # float64 products of integer counts are exact below 2^53 pixels.
    c = counts.astype(np.float64)
    return miou_from_sums(c @ stats.intersection.astype(np.float64), c @ stats.union.astype(np.float64))


def harmonic_mean_samples(samples: Sequence[np.ndarray]) -> np.ndarray:
    """Element-wise harmonic mean of per-domain sample vectors: K / sum 1/m_k, 0 where any m_k is 0."""
    stack = np.stack([np.asarray(s, dtype=np.float64) for s in samples])
    zero = (stack == 0).any(axis=0)
    with np.errstate(divide="ignore"):
        h = len(stack) / (1.0 / np.where(stack == 0, 1.0, stack)).sum(axis=0)
    return np.where(zero, 0.0, h)


def percentile_interval(estimate: float, samples: np.ndarray, level: float = 0.95) -> Interval:
    """The percentile interval of ``samples`` around ``estimate`` (NaN if any sample is NaN)."""
    s = np.asarray(samples, dtype=np.float64)
    if np.isnan(s).any():
        return Interval(float(estimate), math.nan, math.nan, level)
    low, high = np.quantile(s, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return Interval(float(estimate), float(low), float(high), level)


class PairedBootstrap:
    """One matrix of resampled image counts per domain, shared by every model scored there.

    ``sizes`` maps each domain to its number of val images; domains are drawn independently,
    in the order given, from one generator seeded with ``seed``.
    """

    def __init__(self, sizes: Mapping[str, int], *, resamples: int = 1000, seed: int = 0) -> None:
        check_settings(resamples, 0.5)
        rng = np.random.default_rng(seed)
        self.resamples = resamples
        self.counts = {d: resample_counts(n, resamples, rng) for d, n in sizes.items()}

    def miou(self, stats: ImageStats, domain: str) -> np.ndarray:
        """[R] mIoU of ``stats`` (one model on ``domain``) in each resample."""
        if domain not in self.counts:
            raise KeyError(f"domain {domain!r} was not set up for resampling")
        if len(stats) != self.counts[domain].shape[1]:
            raise UserError(f"domain {domain}: {len(stats)} per-image rows, but the domain has "
                            f"{self.counts[domain].shape[1]} images; score every model on the same images")
        return miou_samples(stats, self.counts[domain])

    def h(self, stats: Mapping[str, ImageStats]) -> np.ndarray:
        """[R] harmonic mean over the domains of ``stats`` (domain -> one model's statistics)."""
        return harmonic_mean_samples([self.miou(s, d) for d, s in stats.items()])


def _as_domains(stats: ImageStats | Sequence[ImageStats]) -> dict[str, ImageStats]:
    return {"0": stats} if isinstance(stats, ImageStats) else {str(i): s for i, s in enumerate(stats)}


def _statistic(boot: PairedBootstrap, stats: Mapping[str, ImageStats]) -> tuple[float, np.ndarray]:
    """(estimate, samples): mIoU for one domain, H over several."""
    if len(stats) == 1:
        (d, s), = stats.items()
        return s.miou(), boot.miou(s, d)
    return harmonic_mean([s.miou() for s in stats.values()]), boot.h(stats)


def interval(stats: ImageStats | Sequence[ImageStats], *, resamples: int = 1000, level: float = 0.95,
             seed: int = 0) -> Interval:
    """Interval of one model's mIoU (``stats`` of one domain) or H (a sequence: one per domain,
    each resampled independently)."""
    check_settings(resamples, level)
    doms = _as_domains(stats)
    boot = PairedBootstrap({d: len(s) for d, s in doms.items()}, resamples=resamples, seed=seed)
    est, samples = _statistic(boot, doms)
    return percentile_interval(est, samples, level)


def paired_difference(a: ImageStats | Sequence[ImageStats], b: ImageStats | Sequence[ImageStats], *,
                      resamples: int = 1000, level: float = 0.95, seed: int = 0) -> Interval:
    """Interval of (model a) - (model b) on the same images: mIoU for one domain's statistics, H
    for a sequence of domains (same order for both). Both models see the same resamples."""
    check_settings(resamples, level)
    da, db = _as_domains(a), _as_domains(b)
    if len(da) != len(db):
        raise ValueError(f"{len(da)} domains for the first model, {len(db)} for the second")
    boot = PairedBootstrap({d: len(s) for d, s in da.items()}, resamples=resamples, seed=seed)
    (ea, sa), (eb, sb) = _statistic(boot, da), _statistic(boot, db)
    return percentile_interval(ea - eb, sa - sb, level)


def compare(stats: Mapping[str, Mapping[str, ImageStats]], *, resamples: int = 1000, level: float = 0.95,
            seed: int = 0) -> dict[str, Any]:
    """Intervals for a set of models scored on the same domains' images.

    ``stats[model][domain]``. Returns ``{"intervals": {model: {domain: Interval, ..., "H": Interval}},
    "differences": {model: {...}}, "reference": first model}``: every mIoU and (over two or more
    domains) H with its interval, and for every model after the first its paired difference
    against the first. One set of resamples serves every number.
    """
    check_settings(resamples, level)
    models = list(stats)
    if not models:
        raise ValueError("no models to compare")
    domains = list(stats[models[0]])
    sizes = {d: len(stats[models[0]][d]) for d in domains}
    boot = PairedBootstrap(sizes, resamples=resamples, seed=seed)
    est: dict[str, dict[str, float]] = {}
    samples: dict[str, dict[str, np.ndarray]] = {}
    for m in models:
        if list(stats[m]) != domains:
            raise ValueError(f"model {m} is scored on {list(stats[m])}, the first model on {domains}")
        est[m] = {d: stats[m][d].miou() for d in domains}
        samples[m] = {d: boot.miou(stats[m][d], d) for d in domains}
        if len(domains) > 1:
            est[m]["H"] = harmonic_mean([est[m][d] for d in domains])
            samples[m]["H"] = harmonic_mean_samples([samples[m][d] for d in domains])
    ref = models[0]
    return {
        "reference": ref,
        "intervals": {m: {k: percentile_interval(est[m][k], samples[m][k], level) for k in est[m]} for m in models},
        "differences": {m: {k: percentile_interval(est[m][k] - est[ref][k], samples[m][k] - samples[ref][k], level)
                            for k in est[m]} for m in models[1:]},
    }


def verdict(low: float, high: float, margin: float = 0.0, side: str = ">=") -> str:
    """Judge the claim 'difference ``side`` ``margin``' from the difference's interval [low, high].

    PASS when the whole interval satisfies the claim, FAIL when the whole interval violates it,
    TIE (inconclusive) when it straddles the margin. A NaN bound gives TIE.
    """
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    if low > high:
        raise ValueError(f"interval [{low}, {high}] has low > high")
    if math.isnan(low) or math.isnan(high):
        return "TIE"
    holds = {">=": lambda v: v >= margin, ">": lambda v: v > margin,
             "<=": lambda v: v <= margin, "<": lambda v: v < margin}[side]
    if holds(low) and holds(high):
        return "PASS"
    if not holds(low) and not holds(high):
        return "FAIL"
    return "TIE"


def combine_verdicts(verdicts: Sequence[str]) -> str:
    """A claim made of several conditions: FAIL if any fails, else TIE if any ties, else PASS."""
    if not verdicts:
        raise ValueError("no verdicts to combine")
    return "FAIL" if "FAIL" in verdicts else ("TIE" if "TIE" in verdicts else "PASS")


__all__ = ["Interval", "PairedBootstrap", "check_settings", "combine_verdicts", "compare", "harmonic_mean_samples",
           "interval", "miou_from_sums", "miou_samples", "paired_difference", "percentile_interval",
           "resample_counts", "verdict"]

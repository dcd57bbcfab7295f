"""The demo's claims judged from bootstrap intervals of paired differences.

Every model of a run is scored on the same val images of each target, and each image's counts
are kept (``ImageStats``), so one set of resampled images per target (``PairedBootstrap``) gives
every score in every resample. A claim is a condition on a difference of scores ("merged H minus
the best single model's H >= 2"); its interval is the percentile interval of that difference
over the resamples, and ``verdict`` turns it into PASS (the whole interval on the claimed side
of the margin), FAIL (the whole interval on the other side) or TIE (it straddles the margin: the
run cannot tell). A claim made of several conditions is PASS only if every condition passes.

Maxima and minima over models (the best single model, the smallest gap) are taken inside each
resample, so the selection of the best model is itself resampled. An interpolation curve's dip
below the line (claim 4) is a threshold on a whole curve: each
resample re-scores every point of the curve on the same resampled images and takes the curve's
dip, which gives the dip's interval.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from domainmerge.analysis.lmc import dip_below_line
from domainmerge.demo.records import Check, Condition
from domainmerge.evaluation.bootstrap import (
    PairedBootstrap,
    combine_verdicts,
    harmonic_mean_samples,
    percentile_interval,
    verdict,
)
from domainmerge.evaluation.metrics import ImageStats, harmonic_mean

ALL_CHECKS = ("1", "2", "3", "4", "5", "world-1", "world-2")
NOT_TESTED = "not tested by this preset, run --preset full"
STATUSES = ("PASS", "FAIL", "TIE", "SKIP")


@dataclass(frozen=True)
class Stat:
    """A score on the real val images (``est``) and the same score in every resample (``samples``)."""

    est: float
    samples: np.ndarray

    def __sub__(self, other: Stat) -> Stat:
        return Stat(self.est - other.est, self.samples - other.samples)

    @staticmethod
    def reduce(stats: Sequence[Stat], how: str) -> Stat:
        """Element-wise 'max', 'min' or 'mean' over several stats (in each resample separately)."""
        fns: dict[str, Callable[..., Any]] = {"max": np.max, "min": np.min, "mean": np.mean}
        fn = fns[how]
        return Stat(float(fn([s.est for s in stats])), fn(np.stack([s.samples for s in stats]), axis=0))


class Judge:
    """Scores and their resamples for one demo run; ``test`` judges one condition."""

    def __init__(self, stats: Mapping[str, Mapping[str, ImageStats]], sizes: Mapping[str, int], *,
                 resamples: int, level: float, seed: int) -> None:
        self.stats, self.level = stats, level
        self.boot = PairedBootstrap(sizes, resamples=resamples, seed=seed)

    def miou(self, name: str, domain: str) -> Stat:
        """Model ``name``'s mIoU on ``domain``."""
        s = self.stats[name][domain]
        return Stat(s.miou(), self.boot.miou(s, domain))

    def h(self, name: str, domains: Sequence[str]) -> Stat:
        """Model ``name``'s harmonic mean over ``domains``."""
        per = [self.miou(name, d) for d in domains]
        return Stat(harmonic_mean([p.est for p in per]),
                    harmonic_mean_samples([p.samples for p in per]))

    def dip_below_line(self, curve: Sequence[Mapping[str, ImageStats]], lambdas: Sequence[float],
                       domains: Sequence[str]) -> Stat:
        """Max over ``domains`` of the dip below the chord (``lmc.dip_below_line``) of the mIoU curve
        whose point i is scored by ``curve[i][domain]``, in each resample."""
        weights = [(1 - lam, lam) for lam in lambdas]
        per_domain = []
        for d in domains:
            values = np.stack([self.boot.miou(point[d], d) for point in curve])          # [L, R]
            chord = np.outer([w[0] for w in weights], values[0]) + np.outer([w[1] for w in weights], values[-1])
            ests = [point[d].miou() for point in curve]
            per_domain.append(Stat(dip_below_line(ests, weights, [ests[0], ests[-1]]), (chord - values).max(0)))
        return Stat.reduce(per_domain, "max")

    def test(self, label: str, stat: Stat, margin: float, side: str) -> Condition:
        """One condition 'stat side margin' judged from the stat's interval."""
        ci = percentile_interval(stat.est, stat.samples, self.level)
        return Condition(label, ci.estimate, ci.low, ci.high, self.level, margin, side,
                         verdict(ci.low, ci.high, margin, side))


def judged(cid: str, text: str, tests: Sequence[Condition], detail: str, kind: str = "claim") -> Check:
    """A check's record: its conditions with their intervals and the combined verdict."""
    return Check(cid, kind, text, combine_verdicts([t.verdict for t in tests]), list(tests), detail)


def not_tested(cid: str, text: str, why: str = "", kind: str = "claim") -> Check:
    """A check the preset does not test (by declaration: :data:`NOT_TESTED`) or that this run
    cannot test (``why``, e.g. too few targets: another preset would not help)."""
    return Check(cid, kind, text, "SKIP", [], f"not tested: {why}" if why else NOT_TESTED)


def format_test(t: Condition) -> str:
    """'merged - best single +6.6 [+4.1, +9.0] (needs >= +2.0)'."""
    pct = f"{t.level * 100:g}%"
    return f"{t.label} {t.estimate:+.2f} [{pct} {t.low:+.2f}, {t.high:+.2f}] (claim {t.side} {t.margin:g})"


def format_check(c: Check) -> str:
    """The printed line: verdict, id, claim, then each condition's difference and interval."""
    if c.verdict == "SKIP":
        return f"SKIP [{c.id}] {c.claim}: {c.detail}"
    tests = "; ".join(format_test(t) for t in c.tests)
    return f"{c.verdict} [{c.id}] {c.claim}: {tests}; {c.detail}"


__all__ = ["ALL_CHECKS", "NOT_TESTED", "Judge", "Stat", "format_check", "format_test", "judged", "not_tested"]

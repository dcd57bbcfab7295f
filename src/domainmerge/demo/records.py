"""The demo's results as typed records, and the one place model names are made.

``pipeline`` fills a :class:`DemoResults`; ``report``, ``seeds`` and the tests read its fields
instead of string keys. ``results.json`` is ``DemoResults.to_dict()`` and reads back with
``DemoResults.from_dict``. Model names (the keys of ``scores``) come only from :func:`stda`,
:func:`combined` and :func:`merged`.

Interpolation curves carry two quantities under one name each, as in ``analysis.lmc``: the
*barrier* (mean of the end points minus the curve's minimum, the paper's form) and the *dip
below the line* (largest drop below the straight line between the end points).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from domainmerge.tensors import harmonic_mean

# -- model names ---------------------------------------------------------------------------------
SOURCE_ONLY = "source_only"
DIFFINIT = "_diffinit"     # name suffix of the runs from a different random initialisation
BUFFER_RULES = ("gaussian", "mean", "first")


def stda(target: str, suffix: str = "") -> str:
    """'stda_city' (``suffix`` DIFFINIT: 'stda_city_diffinit')."""
    return f"stda_{target}{suffix}"


COMBINED_ALL = "combined_all"      # the data-combination run over every target (four-target table)


def combined(targets: Sequence[str]) -> str:
    """The data-combination run on ``targets``: 'combined_city_idd'."""
    return "combined_" + "_".join(targets)


def group(targets: Sequence[str]) -> str:
    """A merge group's label: 'city+idd'."""
    return "+".join(targets)


def merged(group_label: str, variant: str) -> str:
    """'merged_city+idd_gaussian'; variants: a buffer rule, 'first=<target>', 'recalibrated',
    'backbone_heads'."""
    return f"merged_{group_label}_{variant}"


# -- records ------------------------------------------------------------------------------------
@dataclass
class MethodRow:
    """One merged model: its scores per domain, H, and whether the method read target images."""

    label: str
    method: str
    scores: dict[str, float]
    uses_data: bool = False

    def h(self, domains: Sequence[str]) -> float:
        return harmonic_mean([self.scores[d] for d in domains])


@dataclass
class MethodsResult:
    """The methods table per group, and the knob sweeps on the largest group."""

    groups: dict[str, list[str]] = field(default_factory=dict)           # group label -> targets
    rows: dict[str, list[MethodRow]] = field(default_factory=dict)       # group label -> rows
    sweeps: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # method -> {values, H}
    sweep_group: str = ""

    def add_rows(self, extra: Mapping[str, Mapping[str, MethodRow]]) -> None:
        """Append rows measured elsewhere (group -> label -> row) to their groups' tables."""
        for g, rows in extra.items():
            self.rows[g].extend(rows.values())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MethodsResult:
        """The result back from its JSON form (``dataclasses.asdict``)."""
        rows = {g: [MethodRow(**r) for r in rs] for g, rs in data["rows"].items()}
        return cls(dict(data["groups"]), rows, dict(data["sweeps"]), data["sweep_group"])


@dataclass
class Condition:
    """One condition of a check, 'estimate side margin', judged from its bootstrap interval."""

    label: str
    estimate: float
    low: float
    high: float
    level: float
    margin: float
    side: str
    verdict: str


@dataclass
class Check:
    """A claim (or a sanity check of the world) and its verdict: PASS, FAIL, TIE or SKIP."""

    id: str
    kind: str
    claim: str
    verdict: str
    tests: list[Condition]
    detail: str

    def condition(self, label: str) -> Condition:
        """The condition called ``label``."""
        return next(t for t in self.tests if t.label == label)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Check:
        return cls(**{**data, "tests": [Condition(**t) for t in data["tests"]]})


@dataclass
class Curve:
    """An interpolation curve over the lambdas: mIoU per domain, H, and per domain and H the
    barrier and the dip below the line (``analysis.lmc.barrier`` / ``dip_below_line``)."""

    miou: dict[str, list[float]]
    h: list[float]
    barrier: dict[str, float]
    dip_below_line: dict[str, float]

    @property
    def dip_below_line_miou(self) -> float:
        """The largest dip below the line over the domains' mIoU curves (claim 4)."""
        return max(self.dip_below_line[d] for d in self.miou)

    def to_dict(self) -> dict[str, Any]:
        """JSON: ``{domain: [...], 'H': [...], 'barrier': {...}, 'dip_below_line': {...},
        'dip_below_line_miou': x}``."""
        return {**self.miou, "H": self.h, "barrier": self.barrier, "dip_below_line": self.dip_below_line,
                "dip_below_line_miou": self.dip_below_line_miou}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Curve:
        domains = [k for k in data["barrier"] if k != "H"]
        return cls({d: list(data[d]) for d in domains}, list(data["H"]), dict(data["barrier"]),
                   dict(data["dip_below_line"]))


@dataclass
class InterpolationCurves:
    """The two curves between the first two targets' STDA models: 'shared_init' and 'different_init'."""

    lambdas: list[float]
    curves: dict[str, Curve]

    def to_dict(self) -> dict[str, Any]:
        return {"lambda": self.lambdas, **{k: c.to_dict() for k, c in self.curves.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InterpolationCurves:
        return cls(list(data["lambda"]), {k: Curve.from_dict(v) for k, v in data.items() if k != "lambda"})


@dataclass
class DemoResults:
    """Everything one run measured (``results.json``)."""

    preset: str
    seed: int
    targets: list[str]
    config: dict[str, Any]
    timings_s: dict[str, float] = field(default_factory=dict)
    world: dict[str, Any] = field(default_factory=dict)
    training: dict[str, dict[str, Any]] = field(default_factory=dict)
    pretrain_loss: dict[str, float] = field(default_factory=dict)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)     # model name -> domain -> mIoU
    subsets: dict[str, list[str]] = field(default_factory=dict)           # group label -> targets
    interpolation: InterpolationCurves | None = None
    methods: MethodsResult | None = None
    checks: list[Check] = field(default_factory=list)
    wall_time_s: float = 0.0

    def check(self, cid: str) -> Check:
        """The check with id ``cid``."""
        return next(c for c in self.checks if c.id == cid)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (no NaN handling here: ``reporting.write_json`` does it)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["interpolation"] = self.interpolation.to_dict() if self.interpolation else None
        out["methods"] = dataclasses.asdict(self.methods) if self.methods else None
        out["checks"] = [dataclasses.asdict(c) for c in self.checks]
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DemoResults:
        """A results.json read back."""
        kw = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
        if data.get("interpolation") is not None:
            kw["interpolation"] = InterpolationCurves.from_dict(data["interpolation"])
        if data.get("methods") is not None:
            kw["methods"] = MethodsResult.from_dict(data["methods"])
        kw["checks"] = [Check.from_dict(c) for c in data.get("checks", [])]
        return cls(**kw)


__all__ = ["BUFFER_RULES", "COMBINED_ALL", "DIFFINIT", "SOURCE_ONLY", "Check", "Condition", "Curve", "DemoResults",
           "InterpolationCurves", "MethodRow", "MethodsResult", "combined", "group", "merged", "stda"]

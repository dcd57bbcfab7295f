"""The merge specification: what a merge does, as one frozen, validated value.

A :class:`MergeSpec` is built from Python, from the command line (:meth:`MergeSpec.build`,
flat option names as the flags) or from a YAML recipe (:mod:`domainmerge.merging.recipe`); it is
validated once, when it is made, and the merged file records it (:meth:`MergeSpec.record`).
The method is a tagged union: one small frozen class per method holding exactly the knobs that
method reads, so a knob that would do nothing (``density`` with ``linear``) cannot be given.

Example:
    >>> spec = MergeSpec(method=Ties(density=0.3), weights=(2, 1))
    >>> spec.method.name, spec.method.lam, spec.weights
    ('ties', 1.0, (2.0, 1.0))
    >>> MergeSpec.build(method="ties", density=0.3, weights=[2, 1]) == spec
    True
    >>> MergeSpec.build(method="linear", density=0.3)
    Traceback (most recent call last):
    ...
    domainmerge.errors.MergeError: density does nothing with method 'linear'; it is read by ties, dare_ties
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

from domainmerge.errors import MergeError, Option
from domainmerge.merging.roles import KeyRule, rule_for

BUFFER_RULES = ("gaussian", "mean", "first")


def _finite(value: float, name: str, where: str) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value)):
        raise MergeError(where, Option(name), f" must be a finite number, got {value}")


class _Method:
    """A method's knobs are checked when it is made (``check`` raises a MergeError naming the knob)."""

    def __post_init__(self) -> None:
        self.check()

    def check(self, where: str = "") -> None:
        """Refuse knob values outside their range (``where`` goes before the message)."""


@dataclass(frozen=True)
class Linear(_Method):
    """The paper's merge: the weighted average of the models' parameters."""

    name: ClassVar[str] = "linear"


@dataclass(frozen=True)
class TaskArithmetic(_Method):
    """``base + lam * sum_k w_k tau_k`` (Ilharco et al., ICLR 2023); needs a base."""

    lam: float = 1.0
    name: ClassVar[str] = "task_arithmetic"

    def check(self, where: str = "") -> None:
        _finite(self.lam, "lam", where)


@dataclass(frozen=True)
class Ties(_Method):
    """TIES-Merging (Yadav et al., NeurIPS 2023): trim to ``density``, elect sign, disjoint mean."""

    lam: float = 1.0
    density: float = 0.2
    name: ClassVar[str] = "ties"

    def check(self, where: str = "") -> None:
        _finite(self.lam, "lam", where)
        _check_density(self.density, where)


@dataclass(frozen=True)
class DareLinear(_Method):
    """DARE (Yu et al., ICML 2024): drop with probability ``drop``, rescale, task arithmetic."""

    lam: float = 1.0
    drop: float = 0.9
    seed: int = 0
    name: ClassVar[str] = "dare_linear"

    def check(self, where: str = "") -> None:
        _finite(self.lam, "lam", where)
        _check_drop(self.drop, where)


@dataclass(frozen=True)
class DareTies(_Method):
    """DARE's drop and rescale, then TIES' trim, sign election and disjoint mean."""

    lam: float = 1.0
    density: float = 0.2
    drop: float = 0.9
    seed: int = 0
    name: ClassVar[str] = "dare_ties"

    def check(self, where: str = "") -> None:
        _finite(self.lam, "lam", where)
        _check_density(self.density, where)
        _check_drop(self.drop, where)


@dataclass(frozen=True)
class Fisher(_Method):
    """Fisher merging (reads ``images`` unlabeled target images, ``batch_size`` at a time)."""

    images: int = 64
    batch_size: int = 4
    name: ClassVar[str] = "fisher"

    def check(self, where: str = "") -> None:
        _check_images(self.images, self.batch_size, where)


@dataclass(frozen=True)
class AdaMerging(_Method):
    """AdaMerging (learns task-vector coefficients on unlabeled target images); needs a base."""

    images: int = 64
    batch_size: int = 4
    steps: int = 100
    lr: float = 1e-3
    granularity: str = "layer"
    name: ClassVar[str] = "adamerging"

    def check(self, where: str = "") -> None:
        _check_images(self.images, self.batch_size, where)
        if self.steps < 0 or not self.lr > 0:
            raise MergeError(where, Option("steps"), " must be >= 0 and ", Option("lr"),
                             f" > 0, got {self.steps} and {self.lr}")
        if self.granularity not in ("layer", "model"):
            raise MergeError(where, Option("granularity", self.granularity), ": use 'layer' or 'model'")


def _check_density(density: float, where: str) -> None:
    if not 0.0 < density <= 1.0:
        raise MergeError(where, Option("density"), f" must lie in (0, 1], got {density}")


def _check_drop(drop: float, where: str) -> None:
    if not 0.0 <= drop < 1.0:
        raise MergeError(where, Option("drop"), f" must lie in [0, 1), got {drop}")


def _check_images(images: int, batch_size: int, where: str) -> None:
    for name, value in (("images", images), ("batch_size", batch_size)):
        if value < 1:
            raise MergeError(where, Option(name, value), ": must be at least 1")


MergeMethod = Linear | TaskArithmetic | Ties | DareLinear | DareTies | Fisher | AdaMerging
METHOD_TYPES: dict[str, type[MergeMethod]] = {
    cls.name: cls for cls in (Linear, TaskArithmetic, Ties, DareLinear, DareTies, Fisher, AdaMerging)}
# The methods the streaming engine runs (the paper's and the task-vector ones) ...
METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")
# ... and those that read unlabeled target images and need whole networks (each output says so).
DATA_METHODS = ("fisher", "adamerging")
# Every knob of any method (the flat names of MergeSpec.build and the command line).
KNOBS = ("lam", "density", "drop", "seed", "images", "batch_size", "steps", "lr", "granularity")


def knobs_of(method: str) -> tuple[str, ...]:
    """The knobs a method reads (``'ties'`` -> ``('lam', 'density')``)."""
    return tuple(f.name for f in fields(METHOD_TYPES[method]))


def uses_base(method: str) -> bool:
    """Whether a method merges task vectors taken against a base."""
    return method not in ("linear", "fisher")


def make_method(name: str, where: str = "", **knobs: Any) -> MergeMethod:
    """The method called ``name`` with the given knobs (None: not given, the method's default);
    a given knob the method does not read is refused, naming it and the methods that read it."""
    if name not in METHOD_TYPES:
        raise MergeError(f"{where}unknown merge method {name!r}; use one of {', '.join(METHOD_TYPES)}")
    given = {k: v for k, v in knobs.items() if v is not None}
    own = knobs_of(name)
    for knob in given:
        if knob not in own:
            readers = [m for m in METHOD_TYPES if knob in knobs_of(m)]
            raise MergeError(where, Option(knob), f" does nothing with method {name!r}; it is read by "
                             f"{', '.join(readers)}")
    try:
        return METHOD_TYPES[name](**given)
    except MergeError as exc:
        raise exc.prefixed(where) from None


def _weights(values: Sequence[float] | None) -> tuple[float, ...] | None:
    from domainmerge.merging.parameters import normalise_weights

    if values is None:
        return None
    try:
        normalise_weights(values, len(values))
    except ValueError as exc:
        raise MergeError(Option("weights"), f": {exc}") from exc
    return tuple(float(v) for v in values)


def _counts(values: Sequence[float] | None) -> tuple[float, ...] | None:
    if values is None:
        return None
    if any(not math.isfinite(c) or c < 0 for c in values):
        raise MergeError(Option("counts"), f": counts must be finite non-negative numbers, got {list(values)}")
    return tuple(float(c) for c in values)


@dataclass(frozen=True)
class MergeSpec:
    """What a merge does (not which files: models, base and the file options are given beside it).

    Attributes:
        method: the parameter rule (:class:`Linear`, :class:`TaskArithmetic`, :class:`Ties`,
            :class:`DareLinear`, :class:`DareTies`, :class:`Fisher`, :class:`AdaMerging`).
        weights: one non-negative weight per model (normalised to sum 1); None: uniform.
        buffers: BatchNorm statistics: ``'gaussian'`` (pooled Gaussians weighted by
            num_batches_tracked, the paper's), ``'mean'`` or ``'first'``.
        counts: images behind each model's BatchNorm statistics (``'gaussian'``); None: the
            stored ``num_batches_tracked``.
        keep_heads: merge everything outside this key prefix, one output per model with its own
            tensors under it (the paper's dagger variant); ``names`` label those outputs.
        only: merge only the keys under this prefix; copy the others from the first model.
        allow_missing: merge the keys every model holds, copy the others from the first holder.
        align: permute every model onto the first (Git Re-Basin weight matching) first.
        rules: per-module overrides (:class:`~domainmerge.merging.roles.KeyRule`), first match
            wins; a rule's method takes its knobs from the rule, else from ``method``.
    """

    method: MergeMethod = field(default_factory=Linear)
    # Sequences are stored as tuples (see __post_init__), so a spec is hashable and cannot change.
    weights: Sequence[float] | None = None
    buffers: str = "gaussian"
    counts: Sequence[float] | None = None
    keep_heads: str | None = None
    names: Sequence[str] | None = None
    only: str | None = None
    allow_missing: bool = False
    align: bool = False
    rules: Sequence[KeyRule] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", _weights(self.weights))
        object.__setattr__(self, "counts", _counts(self.counts))
        if self.names is not None:
            object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "rules", tuple(self.rules))
        self._check()

    def _check(self) -> None:
        if not isinstance(self.method, tuple(METHOD_TYPES.values())):
            raise MergeError(Option("method"), f": not a merge method: {self.method!r}; use one of "
                             f"{', '.join(c.__name__ for c in METHOD_TYPES.values())}")
        if self.buffers not in BUFFER_RULES:
            raise MergeError(f"unknown buffer rule {self.buffers!r}; use one of {', '.join(BUFFER_RULES)}")
        for rule in self.rules:
            self._check_rule(rule)
        if self.names and not self.per_model:
            raise MergeError(Option("names"), " only applies with ", Option("keep_heads"),
                             " (or a rule that keeps each model's own tensors)")
        if self.method.name in DATA_METHODS and (self.keep_heads or self.align or self.only or self.rules):
            raise MergeError(Option("method", self.method.name), " merges whole networks: it does not combine "
                             "with ", Option("keep_heads"), ", ", Option("align"), ", ", Option("only"),
                             " or rules")
        if self.counts is not None and self.buffers != "gaussian":
            raise MergeError(Option("counts"), " weigh the pooled BatchNorm statistics: they do nothing with ",
                             Option("buffers", self.buffers))

    def _check_rule(self, rule: KeyRule) -> None:
        where = f"rule {rule.pattern!r}: "
        if rule.method is not None and rule.keep_own:
            raise MergeError(f"{where}give either a method or keep_own, not both")
        if rule.method is None:
            if not rule.keep_own:
                raise MergeError(f"{where}give a method or keep_own")
            if any(v is not None for v in rule.knobs().values()):
                raise MergeError(f"{where}a rule that keeps each model's own tensors takes no knobs")
            return
        if rule.method not in METHODS:
            raise MergeError(f"{where}unknown merge method {rule.method!r}; use one of {', '.join(METHODS)}")
        if self.method.name in DATA_METHODS:
            return   # refused by _check with a clearer message
        make_method(rule.method, where, **rule.knobs())

    @property
    def per_model(self) -> bool:
        """Whether the merge writes one output per model (``keep_heads`` or a keep-own rule)."""
        return bool(self.keep_heads) or any(r.keep_own for r in self.rules)

    @property
    def uses_base(self) -> bool:
        """Whether the method or a rule's method merges task vectors (needs a base)."""
        return uses_base(self.method.name) or any(r.method not in (None, "linear") for r in self.rules)

    def method_for(self, key: str) -> MergeMethod:
        """The method that merges the parameter ``key``: the first matching rule's, else the spec's."""
        rule = rule_for(key, self.rules)
        return self.method if rule is None or rule.method is None else self.rule_method(rule)

    def rule_method(self, rule: KeyRule) -> MergeMethod:
        """A rule's method with its knobs: the rule's, else the spec method's where it has them."""
        assert rule.method is not None
        inherited = {k: getattr(self.method, k, None) for k in knobs_of(rule.method)}
        given = {k: v for k, v in rule.knobs().items() if v is not None}
        return make_method(rule.method, f"rule {rule.pattern!r}: ", **{**inherited, **given})

    def check_inputs(self, n: int, has_base: bool) -> list[float]:
        """Check the spec against ``n`` models and whether a base is given, before any file is
        read; returns the normalised weights."""
        from domainmerge.merging.parameters import normalise_weights

        try:
            weights = normalise_weights(self.weights, n)
        except ValueError as exc:
            raise MergeError(Option("weights"), f": {exc}") from exc
        if self.counts is not None and len(self.counts) != n:
            raise MergeError(Option("counts"), f": got {len(self.counts)} counts for {n} models")
        if self.names is not None and len(self.names) != n:
            raise MergeError(Option("names"), f": got {len(self.names)} names for {n} inputs; give one name per "
                             "input")
        if self.uses_base and not has_base:
            # Name the method that needs the base: the spec's, else the first rule's that does.
            rule = None if uses_base(self.method.name) else \
                next(r for r in self.rules if r.method not in (None, "linear"))
            name = self.method.name if rule is None else rule.method
            where = "" if rule is None else f"rule {rule.pattern!r}: "
            what = "learns coefficients of task vectors" if name == "adamerging" else "merges task vectors"
            raise MergeError(f"{where}method {name!r} {what} and needs the base weights the models were "
                             "adapted from (", Option("base"), ")")
        if has_base and not self.uses_base:
            raise MergeError("a base checkpoint is only used by the task-vector methods; pick a ", Option("method"))
        return weights

    @classmethod
    def build(cls, method: str = "linear", *, weights: Sequence[float] | None = None, buffers: str = "gaussian",
              counts: Sequence[float] | None = None, keep_heads: str | None = None,
              names: Sequence[str] | None = None, only: str | None = None, allow_missing: bool = False,
              align: bool = False, rules: Sequence[KeyRule] = (), **knobs: Any) -> MergeSpec:
        """The spec of flat options, as the command line gives them: the method by name and its
        knobs (``lam``, ``density``, ``drop``, ``seed``, ``images``, ``batch_size``, ``steps``,
        ``lr``, ``granularity``; None: not given). A given knob the method does not read is
        refused."""
        unknown = sorted(set(knobs) - set(KNOBS))
        if unknown:
            raise TypeError(f"MergeSpec.build() got an unexpected keyword argument {unknown[0]!r}")
        return cls(method=make_method(method, **knobs), weights=weights, buffers=buffers, counts=counts,
                   keep_heads=keep_heads, names=names, only=only, allow_missing=allow_missing, align=align,
                   rules=rules)

    def replace(self, **changes: Any) -> MergeSpec:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def record(self, models: Sequence[str | Path], base: str | Path | None = None) -> dict[str, Any]:
        """The spec as written into a merged file's ``meta['domainmerge']['recipe']`` (file
        names, not folders; the task-vector knobs at their values or defaults)."""
        m = self.method
        out: dict[str, Any] = {
            "models": [Path(p).name for p in models], "weights": list(self.weights) if self.weights else None,
            "method": m.name, "buffers": self.buffers, "counts": list(self.counts) if self.counts else None,
            "only": self.only, "keep_heads": self.keep_heads, "allow_missing": self.allow_missing,
            "align": self.align}
        if m.name != "linear" or base:
            # The same four knobs for every method, as the records written before the spec.
            out.update({"base": Path(base).name if base else None, "lambda": getattr(m, "lam", 1.0),
                        "density": getattr(m, "density", 0.2), "drop": getattr(m, "drop", 0.9),
                        "seed": getattr(m, "seed", 0)})
        if self.rules:
            out["rules"] = [{k: v for k, v in vars(r).items() if v not in (None, False)} for r in self.rules]
        return out

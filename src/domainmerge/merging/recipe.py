"""Merge recipes: a YAML (or JSON) file that says which models to merge and how.

```yaml
models:                       # two or more; a path, or {path: ..., weight: ...}
  - {path: cs.pth, weight: 2}
  - idd.pth
base: source_only.pth         # for the task-vector methods
method: ties                  # linear | task_arithmetic | ties | dare_linear | dare_ties
lambda: 1.0
density: 0.2
buffers: gaussian             # gaussian | mean | first
only: model.
rules:                        # per-module overrides, first match wins
  - {match: "backbone.*", method: ties, density: 0.3}
  - {match: "decode_head.*", keep: own}     # each model keeps its own head: one output per model
```

Relative paths are read from the recipe's folder. Every field is validated before any tensor is
read; a wrong one is a one-line error naming the field and the file. A knob (``lambda``,
``density``, ``drop``, ``seed``, at the top or in a rule) is only accepted where its method reads
it. A recipe is loaded as a :class:`MergeRecipe`: the models, the base and the
:class:`~domainmerge.merging.spec.MergeSpec` the command line would build.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from domainmerge.errors import MergeError, UserError
from domainmerge.merging.roles import KeyRule
from domainmerge.merging.spec import BUFFER_RULES, METHODS, MergeSpec, knobs_of

_TOP = {"models", "base", "method", "lambda", "density", "drop", "seed", "buffers", "counts", "only",
        "allow_missing", "align", "keep_heads", "names", "rules"}
_RULE = {"match", "method", "lambda", "density", "drop", "seed", "keep"}
# A recipe's knob fields and the spec's names for them.
_KNOBS = (("lambda", "lam"), ("density", "density"), ("drop", "drop"), ("seed", "seed"))


@dataclass(frozen=True)
class MergeRecipe:
    """A validated merge recipe: the models and base (paths absolute or relative to the working
    folder) and the :class:`~domainmerge.merging.spec.MergeSpec` of the merge."""

    models: list[str]
    spec: MergeSpec = field(default_factory=MergeSpec)
    base: str | None = None

    def record(self) -> dict[str, Any]:
        """The resolved recipe as written into a merged file (file names, not folders)."""
        return self.spec.record(self.models, self.base)


def _number(value: Any, name: str, where: str, *, integer: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a finite number"
        raise UserError(f"{where}: field {name!r} must be {kind}, got {value!r}")
    return value


def _text(value: Any, name: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise UserError(f"{where}: field {name!r} must be a non-empty string, got {value!r}")
    return value


def _flag(value: Any, name: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{where}: field {name!r} must be true or false, got {value!r}")
    return value


def _unknown(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(data) - allowed)
    if extra:
        raise UserError(f"{where}: unknown field {extra[0]!r}; known fields: {', '.join(sorted(allowed))}")


def _models(value: Any, where: str, folder: Path) -> tuple[list[str], list[float] | None]:
    if not isinstance(value, list) or len(value) < 2:
        raise UserError(f"{where}: field 'models' must list two or more checkpoints")
    paths: list[str] = []
    weights: list[float] = []
    for i, item in enumerate(value):
        at = f"models[{i}]"
        if isinstance(item, str):
            path, weight = item, None
        elif isinstance(item, dict):
            _unknown(item, {"path", "weight"}, f"{where}: {at}")
            path = _text(item.get("path"), f"{at}.path", where)
            weight = _number(item["weight"], f"{at}.weight", where) if "weight" in item else None
            if weight is not None and weight < 0:
                raise UserError(f"{where}: field '{at}.weight' must be non-negative, got {weight}")
        else:
            raise UserError(f"{where}: field {at!r} must be a path or {{path, weight}}, got {item!r}")
        resolved = Path(path) if Path(path).is_absolute() else folder / path
        paths.append(str(resolved))
        weights.append(1.0 if weight is None else float(weight))
    given = any(isinstance(m, dict) and "weight" in m for m in value)
    return paths, (weights if given else None)


def _knobs(data: Mapping[str, Any], method: str, where: str, at: str = "") -> dict[str, Any]:
    """The knob fields given (spec names -> values), each refused when ``method`` does not read it."""
    knobs: dict[str, Any] = {}
    for key, name in _KNOBS:
        if key in data:
            value = _number(data[key], at + key, where, integer=name == "seed")
            if name not in knobs_of(method):
                readers = [m for m in METHODS if name in knobs_of(m)]
                raise UserError(f"{where}: field {at + key!r} does nothing with method {method!r}; it is read by "
                                f"{', '.join(readers)}")
            knobs[name] = int(value) if name == "seed" else float(value)
    return knobs


def _rule(item: Any, i: int, where: str) -> KeyRule:
    at = f"rules[{i}]"
    if not isinstance(item, dict):
        raise UserError(f"{where}: field {at!r} must be a mapping with 'match', got {item!r}")
    _unknown(item, _RULE, f"{where}: {at}")
    pattern = _text(item.get("match"), f"{at}.match", where)
    keep = item.get("keep")
    if keep is not None and keep != "own":
        raise UserError(f"{where}: field '{at}.keep' must be 'own', got {keep!r}")
    method = item.get("method")
    if method is not None and method not in METHODS:
        raise UserError(f"{where}: field '{at}.method': unknown method {method!r}; use one of {', '.join(METHODS)}")
    if method is None and keep is None:
        raise UserError(f"{where}: field {at!r} needs 'method' or 'keep: own'")
    if method is not None and keep is not None:
        raise UserError(f"{where}: field {at!r} gives both 'method' and 'keep'; choose one")
    knobs = _knobs(item, method or "linear", where, f"{at}.")
    return KeyRule(pattern=pattern, method=method, keep_own=keep == "own", **knobs)


def parse_recipe(data: Any, where: str = "<recipe>", folder: str | Path = ".") -> MergeRecipe:
    """Validate a recipe already loaded into Python objects (see the module docstring)."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: a recipe is a mapping of fields (models, method, ...), got {type(data).__name__}")
    _unknown(data, _TOP, where)
    folder = Path(folder)
    if "models" not in data:
        raise UserError(f"{where}: field 'models' is missing; list two or more checkpoints")
    models, weights = _models(data["models"], where, folder)
    if weights is not None and sum(weights) <= 0:
        raise UserError(f"{where}: the models' weights sum to zero; give at least one positive weight")
    base = None
    if "base" in data:
        base = _text(data["base"], "base", where)
        base = base if Path(base).is_absolute() else str(folder / base)
    method = "linear"
    if "method" in data:
        method = _text(data["method"], "method", where)
        if method not in METHODS:
            raise UserError(f"{where}: field 'method': unknown method {method!r}; use one of {', '.join(METHODS)}")
    knobs = _knobs(data, method, where)
    fields: dict[str, Any] = {}
    if "buffers" in data:
        fields["buffers"] = _text(data["buffers"], "buffers", where)
        if fields["buffers"] not in BUFFER_RULES:
            raise UserError(f"{where}: field 'buffers' must be one of {', '.join(BUFFER_RULES)}, "
                            f"got {fields['buffers']!r}")
    if "counts" in data:
        counts = data["counts"]
        if not isinstance(counts, list) or len(counts) != len(models):
            raise UserError(f"{where}: field 'counts' must list one number per model ({len(models)})")
        fields["counts"] = [float(_number(c, f"counts[{i}]", where)) for i, c in enumerate(counts)]
        if any(c < 0 for c in fields["counts"]):
            raise UserError(f"{where}: field 'counts' must be non-negative, got {fields['counts']}")
    for key in ("only", "keep_heads"):
        if key in data:
            fields[key] = _text(data[key], key, where)
    for key in ("allow_missing", "align"):
        if key in data:
            fields[key] = _flag(data[key], key, where)
    if "names" in data:
        names = data["names"]
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise UserError(f"{where}: field 'names' must list one name per model")
        fields["names"] = list(names)
    rules = data.get("rules", [])
    if not isinstance(rules, list):
        raise UserError(f"{where}: field 'rules' must be a list of {{match: ..., method: ...}} mappings")
    fields["rules"] = [_rule(item, i, where) for i, item in enumerate(rules)]
    try:
        spec = MergeSpec.build(method, weights=weights, **fields, **knobs)
    except MergeError as exc:
        raise exc.prefixed(f"{where}: ") from None
    return MergeRecipe(models=models, spec=spec, base=base)


def load_recipe(path: str | Path) -> MergeRecipe:
    """Read and validate a YAML (or JSON) recipe; relative paths are taken from its folder."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{p}: recipe not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{p}: cannot read the recipe ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{p}: not valid YAML{at}; check the recipe's syntax") from None
    return parse_recipe(data, str(p), p.parent)


def merge_recipe(recipe: MergeRecipe | str | Path, *, trust_pickle: bool = False) -> list[dict[str, Any]]:
    """Merge in memory as a recipe says (a :class:`MergeRecipe` or the path of a YAML file).

    Returns one state dict, or one per model when a rule keeps each model's own tensors
    (``keep: own``) or ``keep_heads`` is set. ``align`` is not applied here (use
    :func:`domainmerge.alignment.matching.align_state_dicts` first); the command does both.

    Example:
        >>> import torch
        >>> r = parse_recipe({"models": ["a.pth", "b.pth"]})
        >>> r.spec.method.name, r.spec.buffers
        ('linear', 'gaussian')
    """
    from domainmerge.checkpoint import load_state_dict
    from domainmerge.merging.plan import plan_merge
    from domainmerge.merging.sources import DictSource
    from domainmerge.merging.stream import iter_merged

    r = recipe if isinstance(recipe, MergeRecipe) else load_recipe(recipe)
    sources = [DictSource(load_state_dict(m, trust_pickle=trust_pickle), m) for m in r.models]
    base = DictSource(load_state_dict(r.base, trust_pickle=trust_pickle), r.base) if r.base else None
    plan = plan_merge(sources, r.spec, base=base)
    outs: list[dict[str, Any]] = [{} for _ in range(plan.n_outputs)]
    for key, tensors in iter_merged(sources, plan):
        for out, t in zip(outs, tensors):
            out[key] = t
    return outs

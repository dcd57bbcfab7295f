"""The merge engine: check the inputs agree, give every key a rule, stream tensors through it.

Inputs are *sources* (opened checkpoints or in-memory state dicts) read one tensor at a time,
so merging K large checkpoints holds a handful of tensors, not K models.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from domainmerge.checkpoint import WRAPPER_PREFIXES
from domainmerge.errors import INSPECT, MergeError, Option, Part, UserError
from domainmerge.merging.buffers import gaussian_pool, mixture_proportions, pooled_count
from domainmerge.merging.parameters import common_dtype, normalise_weights, weighted_average
from domainmerge.merging.roles import (
    COUNT_SUFFIX,
    MEAN_SUFFIX,
    VAR_SUFFIX,
    KeyRule,
    Role,
    assign_roles,
    layer_of,
    rule_for,
    under_prefix,
)
from domainmerge.merging.taskvector import dare, key_generator, task_arithmetic, ties
from domainmerge.tensors import all_finite

BUFFER_RULES = ("gaussian", "mean", "first")
# Parameter rules: the paper's weighted average, and the task-vector rules (they need a base).
METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")
# What the "keys differ" error suggests by default.
ALLOW_MISSING_ADVICE: tuple[Part, ...] = ("pass ", Option("allow_missing", switch=True),
                                         " to merge the shared keys and copy the rest")


class Source(Protocol):
    """Anything with named tensors readable one at a time (a Checkpoint, a DictSource)."""

    def keys(self) -> list[str]: ...
    def get(self, key: str) -> torch.Tensor: ...


class DictSource:
    """A state dict seen as a source."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], name: str = "<state dict>"):
        self._sd = state_dict
        self.path = name

    def keys(self) -> list[str]:
        return list(self._sd)

    def get(self, key: str) -> torch.Tensor:
        return self._sd[key]


class StrippedSource:
    """A source seen without a wrapper prefix ('model.', 'module.' ...): only its keys under the
    prefix, renamed without it (``'auto'``: 'model.' when present, else 'module.', else none)."""

    def __init__(self, source: Source, prefix: str = "auto"):
        keys = source.keys()
        if prefix == "auto":
            self.names = _strip_keys(keys)
        else:
            self.names = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
        name = getattr(source, "path", "<state dict>")
        if not self.names:
            raise MergeError(f"{name}: no tensor key starts with {prefix!r}; check the prefixes with ", INSPECT,
                             input=name)
        self.source, self.path = source, name
        infos = getattr(source, "infos", None)
        if infos is not None:
            self.infos = {k: infos[full] for k, full in self.names.items()}

    def keys(self) -> list[str]:
        return list(self.names)

    def get(self, key: str) -> torch.Tensor:
        return self.source.get(self.names[key])

    def release(self, key: str) -> None:
        release = getattr(self.source, "release", None)
        if release is not None:
            release(self.names[key])


@dataclass
class MergeOptions:
    """How to merge. ``weights``/``counts`` have one entry per input (None: uniform / stored)."""

    weights: Sequence[float] | None = None
    buffers: str = "gaussian"
    counts: Sequence[float] | None = None
    keep_heads: str | None = None
    only: str | None = None
    allow_missing: bool = False
    check_finite: bool = True
    method: str = "linear"           # one of METHODS; all but 'linear' read task vectors from a base
    lam: float = 1.0                 # task-vector scaling (1: weighted average of the models)
    density: float = 0.2             # TIES: share of each task vector kept
    drop: float = 0.9                # DARE: drop probability
    seed: int = 0                    # DARE: masks are a function of (seed, key, model)
    rules: Sequence[KeyRule] = ()    # per-module overrides, first match wins (see KeyRule)
    # Floating tensors of the output: None keeps the widest dtype of the inputs holding each key.
    dtype: torch.dtype | None = None
    # What to suggest when the key sets differ (a caller without allow_missing says otherwise).
    mismatch_advice: tuple[Part, ...] = ALLOW_MISSING_ADVICE

    def for_key(self, key: str) -> MergeOptions:
        """These options with the first matching rule's method and knobs applied."""
        rule = rule_for(key, self.rules)
        return self if rule is None or rule.method is None else self.with_rule(rule)

    def with_rule(self, rule: KeyRule) -> MergeOptions:
        """These options with ``rule``'s method and the knobs it sets."""
        knobs = {k: v for k, v in (("lam", rule.lam), ("density", rule.density), ("drop", rule.drop))
                 if v is not None}
        return replace(self, method=rule.method or self.method, rules=(), **knobs)  # type: ignore[arg-type]


@dataclass
class MergePlan:
    """Every key of the output with its rule, decided before any data is read."""

    keys: list[str]
    roles: dict[str, Role]
    merged: dict[str, bool]          # False: copied (outside `only`) or per-model (heads)
    per_model: dict[str, bool]       # True: each output keeps its own model's tensor (heads)
    holders: dict[str, list[int]]    # which inputs hold the key
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]   # of the output; floating tensors merged in float32 or wider
    weights: list[float]
    options: MergeOptions
    stats: Counter[str] = field(default_factory=Counter)
    base: Source | None = None       # the weights task vectors are taken from (method != 'linear')
    base_keys: dict[str, str] = field(default_factory=dict)  # output key -> the base's key for it

    @property
    def n_outputs(self) -> int:
        return len(self.weights) if any(self.per_model.values()) else 1


def _name(src: object, i: int) -> str:
    return str(getattr(src, "path", f"input {i + 1}"))


def _infos(src: Source) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    infos = getattr(src, "infos", None)
    if infos is not None:
        return {k: (tuple(v.shape), v.dtype) for k, v in infos.items()}
    return {k: (tuple(src.get(k).shape), src.get(k).dtype) for k in src.keys()}


def _examples(keys: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(repr(k) for k in list(keys)[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def check_methods(options: MergeOptions, has_base: bool) -> None:
    """The merge method, its knobs and every rule's method, checked before any tensor is read
    (``has_base``: a base checkpoint is given)."""
    _check_method(options, has_base)
    for rule in options.rules:
        if rule.method is not None and rule.keep_own:
            raise MergeError(f"rule {rule.pattern!r}: give either a method or keep_own, not both")
        if rule.method is not None:
            _check_method(options.with_rule(rule), has_base, where=f"rule {rule.pattern!r}: ")


def _check_method(options: MergeOptions, has_base: bool, where: str = "") -> None:
    if options.method not in METHODS:
        raise MergeError(f"{where}unknown merge method {options.method!r}; use one of {', '.join(METHODS)}")
    uses_base = options.method != "linear" or any(r.method not in (None, "linear") for r in options.rules)
    if uses_base and not has_base:
        raise MergeError(f"{where}method {options.method!r} merges task vectors and needs the base weights the "
                         "models were adapted from (", Option("base"), ")")
    if not uses_base and has_base and not where:
        raise MergeError("a base checkpoint is only used by the task-vector methods; pick a ", Option("method"))
    if not (options.lam == options.lam and abs(options.lam) != float("inf")):
        raise MergeError(where, Option("lam"), f" must be a finite number, got {options.lam}")
    if not 0.0 < options.density <= 1.0:
        raise MergeError(where, Option("density"), f" must lie in (0, 1], got {options.density}")
    if not 0.0 <= options.drop < 1.0:
        raise MergeError(where, Option("drop"), f" must lie in [0, 1), got {options.drop}")


def _strip_keys(keys: Sequence[str]) -> dict[str, str]:
    """Key without its wrapper prefix -> key, with the prefix ``strip_model_prefix('auto')`` takes."""
    from domainmerge.checkpoint import network_prefix

    prefix = network_prefix(keys)
    return {k[len(prefix):]: k for k in keys if k.startswith(prefix)}


def _prefix_note(names: Sequence[str], infos: Sequence[Mapping[str, object]], i: int) -> MergeError | None:
    """When two inputs hold the same network under different wrapper prefixes, say so."""
    from domainmerge.checkpoint import detect_prefixes

    pa, pb = detect_prefixes(infos[0]), detect_prefixes(infos[i])
    if pa == pb:
        return None
    sa, sb = _strip_keys(list(infos[0])), _strip_keys(list(infos[i]))
    same_tensors = len(sa.keys() & sb.keys())
    same_names = len(infos[0].keys() & infos[i].keys())
    if same_tensors < max(1, min(len(sa), len(sb)) // 2) or same_names >= same_tensors // 2:
        return None
    return MergeError(f"{names[i]}: its keys carry the prefix {', '.join(pb) or 'none'} while those of {names[0]} "
                      f"carry {', '.join(pa) or 'none'}: the prefixes differ, so the same tensors have different "
                      "names; pass ", Option("prefix", "auto"), " (or ", Option("prefix", "PREFIX"),
                      ") to merge the networks without their wrappers", input=names[i])


def _arch_note(names: Sequence[str], infos: Sequence[Mapping[str, tuple[tuple[int, ...], torch.dtype]]],
               i: int) -> MergeError | None:
    """When the architectures of input 0 and input i can be detected and differ, say which."""
    from domainmerge.models.detect import detect_arch

    specs = []
    for info in (infos[0], infos[i]):
        stripped = _strip_keys(list(info))
        meta = {k: torch.empty(info[full][0], dtype=info[full][1], device="meta") for k, full in stripped.items()}
        try:
            specs.append(detect_arch(meta).describe())
        except (UserError, KeyError, IndexError):
            return None
    if specs[0] == specs[1]:
        return None
    return MergeError(f"{names[0]} holds {specs[0]} but {names[i]} holds {specs[1]}: the architectures differ, "
                      "so the models cannot be merged", input=names[i])


def check_options(options: MergeOptions, k: int) -> list[float]:
    """Validate the options for ``k`` inputs before any file is read (non-finite or negative
    weights and counts, unknown buffer rule or dtype); returns the normalised weights."""
    if options.buffers not in BUFFER_RULES:
        raise MergeError(f"unknown buffer rule {options.buffers!r}; use one of {', '.join(BUFFER_RULES)}")
    if options.dtype is not None and not options.dtype.is_floating_point:
        raise MergeError(Option("dtype", str(options.dtype).replace("torch.", "")), ": not a floating-point dtype")
    try:
        weights = normalise_weights(options.weights, k)
    except ValueError as exc:
        raise MergeError(Option("weights"), f": {exc}") from exc
    if options.counts is not None:
        if len(options.counts) != k:
            raise MergeError(Option("counts"), f": got {len(options.counts)} counts for {k} models")
        if any(not math.isfinite(c) or c < 0 for c in options.counts):
            raise MergeError(Option("counts"), ": counts must be finite non-negative numbers, got "
                             f"{list(options.counts)}")
    return weights


def plan_merge(sources: Sequence[Source], options: MergeOptions, base: Source | None = None) -> MergePlan:
    """Check that the inputs (and ``base``, for the task-vector methods) can be merged and decide
    the rule for every key."""
    if not sources:
        raise MergeError("no inputs to merge")
    weights = check_options(options, len(sources))
    check_methods(options, base is not None)
    infos = [_infos(s) for s in sources]
    names = [_name(s, i) for i, s in enumerate(sources)]
    first = infos[0]
    order = list(first) + [k for info in infos[1:] for k in info if k not in first]
    order = list(dict.fromkeys(order))
    for i, info in enumerate(infos[1:], start=1):
        missing = [k for k in first if k not in info]
        extra = [k for k in info if k not in first]
        if not (missing or extra):
            continue
        note = _prefix_note(names, infos, i) or _arch_note(names, infos, i)
        if note:
            raise note
        if not options.allow_missing:
            parts = []
            if missing:
                parts.append(f"lacks {len(missing)} keys of {names[0]} ({_examples(missing)})")
            if extra:
                parts.append(f"has {len(extra)} keys {names[0]} lacks ({_examples(extra)})")
            raise MergeError(f"{names[i]}: {'; '.join(parts)}; ", *options.mismatch_advice, input=names[i],
                             key=(missing or extra)[0])
    holders = {k: [i for i, info in enumerate(infos) if k in info] for k in order}
    if len(sources) > 1 and not any(len(h) == len(sources) for h in holders.values()):
        raise MergeError(f"no tensor name is shared by all {len(sources)} inputs, so nothing would be merged; "
                        "check the key prefixes with ", INSPECT)
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, torch.dtype] = {}
    for k in order:
        h0 = holders[k][0]
        shapes[k], dtypes[k] = infos[h0][k]
        for i in holders[k][1:]:
            shape, dtype = infos[i][k]
            if shape != shapes[k]:
                note = _arch_note(names, infos, i) if h0 == 0 else None
                raise note or MergeError(f"key {k!r}: shape {list(shapes[k])} in {names[h0]} but "
                                         f"{list(shape)} in {names[i]}; the models have different "
                                         "architectures and cannot be merged", key=k, input=names[i])
            if dtype.is_floating_point != dtypes[k].is_floating_point:
                raise MergeError(f"key {k!r}: dtype {dtypes[k]} in {names[h0]} but {dtype} "
                                 f"in {names[i]}; convert one of them", key=k, input=names[i])
    roles = assign_roles(dtypes)
    # A BatchNorm pair is pooled only from inputs holding both of its statistics; with
    # allow_missing a layer some input has only half of is copied from the first holder.
    unpaired: set[str] = set()
    for k, role in roles.items():
        if role == Role.BN_MEAN:
            var = k[:-len(MEAN_SUFFIX)] + VAR_SUFFIX
            if holders[k] != holders[var]:
                unpaired.update((k, var))
    merged, per_model = {}, {}
    for k in order:
        matched = rule_for(k, options.rules)
        head = (bool(options.keep_heads) and under_prefix(k, options.keep_heads or "")) or \
            (matched is not None and matched.keep_own)
        outside = bool(options.only) and not under_prefix(k, options.only or "")
        shared = len(holders[k]) == len(sources)
        per_model[k] = head
        merged[k] = shared and not head and not outside and k not in unpaired
        if dtypes[k].is_floating_point:
            combined = head or merged[k]
            dtypes[k] = options.dtype or (common_dtype([infos[i][k][1] for i in holders[k]]) if combined
                                          else dtypes[k])
    if options.keep_heads and not any(per_model.values()):
        raise MergeError(Option("keep_heads", options.keep_heads), ": no key lies under this prefix; "
                         "check the head's prefix with ", INSPECT)
    if options.only and not any(under_prefix(k, options.only) for k in order):
        raise MergeError(Option("only", options.only), ": no key lies under this prefix; "
                         "check the prefixes with ", INSPECT)
    base_keys = _match_base(base, order, roles, shapes) if base is not None else {}
    return MergePlan(order, roles, merged, per_model, holders, shapes, dtypes, weights, options,
                     base=base, base_keys=base_keys)


def _match_base(base: Source, order: Sequence[str], roles: Mapping[str, Role],
                shapes: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    """Model key -> base key for every parameter the base holds, under the same name or with a
    training wrapper ('model.', 'module.', ...) added or removed (a source-only checkpoint is
    often a plain state dict, the adapted ones DA training containers)."""
    infos = _infos(base)
    found: dict[str, str] = {}
    for k in order:
        if roles[k] != Role.PARAM:
            continue
        bare = next((k[len(w):] for w in WRAPPER_PREFIXES if k.startswith(w)), k)
        candidates = [k, bare, *(w + bare for w in WRAPPER_PREFIXES)]
        bk = next((c for c in candidates if c in infos), None)
        if bk is None:
            continue
        if infos[bk][0] != shapes[k]:
            raise MergeError(f"key {k!r}: shape {list(shapes[k])} in the models but {list(infos[bk][0])} in the "
                             f"base {_name(base, -1)}; the base must be the weights the models were adapted from",
                             key=k, input=_name(base, -1))
        found[k] = bk
    if not found:
        raise MergeError(f"the base {_name(base, -1)} shares no parameter with the models; check its "
                        "prefixes with ", INSPECT)
    return found


class _Reader:
    """Reads tensors from the sources."""

    def __init__(self, sources: Sequence[Source], check_finite: bool):
        self.sources = sources
        self.check_finite = check_finite

    def get(self, i: int, key: str) -> torch.Tensor:
        return self.sources[i].get(key)

    def release(self, key: str, inputs: Sequence[int]) -> None:
        """Let sources free what they hold for a key that is done (mapped pages of a pickle)."""
        for i in inputs:
            release = getattr(self.sources[i], "release", None)
            if release is not None:
                release(key)

    def check(self, key: str, result: torch.Tensor, inputs: Sequence[int]) -> None:
        """Raise naming the input file when a merged tensor is not finite.

        Checking the result, not every input, halves the passes over memory; a non-finite input
        with a non-zero weight always makes the result non-finite, so nothing is missed.
        """
        if not self.check_finite or all_finite(result):
            return
        for i in inputs:
            if not all_finite(self.get(i, key)):
                raise MergeError(f"{_name(self.sources[i], i)}: tensor {key!r} holds NaN or infinite values; "
                                 "the checkpoint is damaged or diverged", key=key, input=_name(self.sources[i], i))
        raise MergeError(f"tensor {key!r}: merging overflowed to infinity; write a wider dtype (",
                         Option("dtype", "float32"), ")", key=key)

    def counter(self, i: int, layer: str) -> int | None:
        key = f"{layer}.{COUNT_SUFFIX}" if layer else COUNT_SUFFIX
        if key not in self.sources[i].keys():
            return None
        return int(self.sources[i].get(key).item())


def _bn_pair(plan: MergePlan, reader: _Reader, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged (running_mean, running_var) of one BatchNorm layer under the plan's buffer rule."""
    pre = f"{layer}." if layer else ""
    mean_key, var_key = pre + MEAN_SUFFIX, pre + VAR_SUFFIX
    idx = plan.holders[mean_key]
    w = [plan.weights[i] for i in idx]
    means = [reader.get(i, mean_key) for i in idx]
    variances = [reader.get(i, var_key) for i in idx]
    rule = plan.options.buffers
    dtype = plan.dtypes[mean_key]
    if rule == "first":
        return means[0].to(dtype, copy=True), variances[0].to(dtype, copy=True)
    if rule == "mean":
        return weighted_average(means, w, dtype), weighted_average(variances, w, dtype)
    if plan.options.counts is not None:
        counts: list[float] | None = [float(plan.options.counts[i]) for i in idx]
    else:
        stored = [reader.counter(i, layer) for i in idx]
        counts = None if any(c is None for c in stored) else [float(c or 0) for c in stored]
    return gaussian_pool(means, variances, mixture_proportions(w, counts), dtype)


def _merge_key(plan: MergePlan, reader: _Reader, key: str,
               bn_cache: dict[str, torch.Tensor]) -> torch.Tensor:
    role = plan.roles[key]
    idx = plan.holders[key]
    w = [plan.weights[i] for i in idx]
    if role in (Role.BN_MEAN, Role.BN_VAR):
        if key not in bn_cache:
            layer = layer_of(key)
            mean, var = _bn_pair(plan, reader, layer)
            pre = f"{layer}." if layer else ""
            bn_cache[pre + MEAN_SUFFIX], bn_cache[pre + VAR_SUFFIX] = mean, var
            plan.stats["bn_layers"] += 1
        return bn_cache.pop(key)
    if role == Role.PARAM:
        tensors = [reader.get(i, key) for i in idx]
        opts = plan.options.for_key(key)
        if opts.method == "linear":
            return weighted_average(tensors, w, plan.dtypes[key])
        if plan.base is None or key not in plan.base_keys:
            plan.stats["linear, not in base"] += 1   # e.g. a freshly initialised head
            return weighted_average(tensors, w, plan.dtypes[key])
        base_t = plan.base.get(plan.base_keys[key])
        return _task_vector_merge(opts, key, tensors, base_t, w, idx).to(plan.dtypes[key])
    if role == Role.COUNTER and plan.options.buffers != "first":
        values = [int(reader.get(i, key).item()) for i in idx]
        first = reader.get(idx[0], key)
        if plan.options.counts is not None and plan.options.buffers == "gaussian":
            values = [int(plan.options.counts[i]) for i in idx]
        if plan.options.buffers == "gaussian":
            n = pooled_count(values, w)
        else:
            n = round(sum(v * x for v, x in zip(values, w)) / sum(w))
        return torch.full_like(first, n)
    return reader.get(idx[0], key).to(plan.dtypes[key], copy=True)


def _task_vector_merge(opts: MergeOptions, key: str, tensors: Sequence[torch.Tensor], base: torch.Tensor,
                       weights: Sequence[float], inputs: Sequence[int]) -> torch.Tensor:
    """One parameter under a task-vector method (see domainmerge.merging.taskvector)."""
    total = sum(weights)
    w = [x / total for x in weights]
    if opts.method == "task_arithmetic":
        return task_arithmetic(tensors, base, w, opts.lam)
    if opts.method == "ties":
        return ties(tensors, base, w, opts.lam, opts.density)
    gens = [key_generator(opts.seed, key, i) for i in inputs]
    then = "ties" if opts.method == "dare_ties" else "linear"
    return dare(tensors, base, w, opts.lam, opts.drop, gens, then=then,
                density=opts.density if then == "ties" else 1.0)


_HEAP_PINNED = False


def _pin_mmap_threshold() -> None:
    """Large allocations always through mmap (glibc), so per-tensor temporaries are returned to
    the system when freed. glibc otherwise raises its mmap threshold after the first large free
    and serves later ones from the heap, which then only grows: the task-vector methods' few
    temporaries per tensor added a whole model's worth of resident memory (measured: TIES on two
    70M-parameter .pth inputs 845 MB -> 624 MB; linear unchanged at 531 MB)."""
    global _HEAP_PINNED
    if _HEAP_PINNED:
        return
    _HEAP_PINNED = True
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB; not glibc: nothing happens
    except (OSError, AttributeError):
        pass


def iter_merged(sources: Sequence[Source], plan: MergePlan) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """Yield (key, tensors) in the plan's order: one tensor per output (all equal unless the key
    is a kept head, where output k gets model k's own tensor). Every output tensor is checked
    to be finite; an error names the input that is not."""
    _pin_mmap_threshold()
    reader = _Reader(sources, plan.options.check_finite)
    bn_cache: dict[str, torch.Tensor] = {}
    n_out = plan.n_outputs
    for key in plan.keys:
        if plan.per_model[key]:
            own_src = [i if i in plan.holders[key] else plan.holders[key][0] for i in range(n_out)]
            own = [reader.get(i, key).to(plan.dtypes[key], copy=True) for i in own_src]
            for i, t in zip(own_src, own):
                reader.check(key, t, [i])
            plan.stats["head (kept per model)"] += 1
            yield key, own
            reader.release(key, plan.holders[key])
            continue
        if plan.merged[key]:
            tensor = _merge_key(plan, reader, key, bn_cache)
            reader.check(key, tensor, plan.holders[key])
            plan.stats[plan.roles[key].value] += 1
        else:
            tensor = reader.get(plan.holders[key][0], key).to(plan.dtypes[key], copy=True)
            reader.check(key, tensor, plan.holders[key][:1])
            plan.stats["copied from first"] += 1
        yield key, [tensor] * n_out
        reader.release(key, plan.holders[key])
        release_base = getattr(plan.base, "release", None)
        if release_base is not None and key in plan.base_keys:
            release_base(plan.base_keys[key])


def merge_state_dicts(state_dicts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None,
                      buffers: str = "gaussian", counts: Sequence[float] | None = None,
                      base: Mapping[str, torch.Tensor] | None = None, *, method: str = "linear",
                      lam: float = 1.0, density: float = 0.2, drop: float = 0.9, seed: int = 0,
                      rules: Sequence[KeyRule] = (), only: str | None = None, allow_missing: bool = False,
                      check_finite: bool = True, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Merge state dicts in memory with the paper's rules (see :class:`MergeOptions`).

    Parameters are averaged with ``weights`` (uniform by default), or merged as task vectors
    from ``base`` with ``method='task_arithmetic'|'ties'|'dare_linear'|'dare_ties'`` (and
    ``lam``, ``density``, ``drop``, ``seed``); BatchNorm running statistics follow ``buffers``
    in every method: 'gaussian' (pooled Gaussians weighted by num_batches_tracked or
    ``counts``), 'mean' or 'first'.

    Args:
        state_dicts: the models to merge (tensor name -> tensor), all of one architecture.
        weights: one weight per model (normalised to sum 1); None: uniform.
        buffers: the BatchNorm statistics rule: ``'gaussian'``, ``'mean'`` or ``'first'``.
        counts: images behind each model's BatchNorm statistics (``'gaussian'``); None: the
            stored ``num_batches_tracked``.
        base: the weights the models were adapted from (the task-vector methods).
        method: ``'linear'`` (the paper) or one of the task-vector methods of ``METHODS``.
        lam: the task-vector scaling (1: the weighted average of the models).
        density: TIES, the share of each task vector kept.
        drop: DARE, the drop probability.
        seed: DARE, the seed of the drop masks.
        rules: per-module overrides (:class:`~domainmerge.merging.roles.KeyRule`), first match wins.
        only: merge only the keys under this prefix; the others are copied from the first model.
        allow_missing: merge the keys all models hold and copy the others, instead of an error.
        check_finite: raise (naming the input) when a merged tensor holds NaN or infinity.
        dtype: the floating dtype of the output; None: the widest of the inputs, per key.

    Returns:
        The merged state dict, keys in the first model's order.

    Raises:
        MergeError: the models cannot be merged (keys, shapes or options); the message says why.

    Example:
        >>> import torch
        >>> base = {"w": torch.zeros(3)}
        >>> a, b = {"w": torch.tensor([1., 0., 2.])}, {"w": torch.tensor([3., 0., -2.])}
        >>> merge_state_dicts([a, b])["w"]
        tensor([2., 0., 0.])
        >>> merge_state_dicts([a, b], base=base, method="ties", density=1.0)["w"]
        tensor([2., 0., 0.])
        >>> merge_state_dicts([a, b], base=base, method="task_arithmetic", lam=2.0)["w"]
        tensor([4., 0., 0.])
    """
    if any(r.keep_own for r in rules):
        raise ValueError("merge_state_dicts returns one model; use merge_state_dicts_per_head")
    sources = [DictSource(sd, f"input {i + 1}") for i, sd in enumerate(state_dicts)]
    opts = MergeOptions(weights=weights, buffers=buffers, counts=counts, only=only, allow_missing=allow_missing,
                        check_finite=check_finite, method=method, lam=lam, density=density, drop=drop, seed=seed,
                        rules=tuple(rules), dtype=dtype)
    plan = plan_merge(sources, opts, base=DictSource(base, "base") if base is not None else None)
    return {k: ts[0] for k, ts in iter_merged(sources, plan)}


def merge_state_dicts_per_head(state_dicts: Sequence[Mapping[str, torch.Tensor]], keep_heads: str,
                               weights: Sequence[float] | None = None, buffers: str = "gaussian",
                               counts: Sequence[float] | None = None) -> list[dict[str, torch.Tensor]]:
    """Backbone-only merging (the paper's dagger variant): one model per input, each with the
    merged tensors outside ``keep_heads`` and its own tensors under it.

    Args:
        state_dicts: the models to merge (tensor name -> tensor), all of one architecture.
        keep_heads: the key prefix of the heads each output keeps from its own model
            (``'decode_head'``).
        weights, buffers, counts: as :func:`merge_state_dicts`.

    Returns:
        One state dict per input, in the order of ``state_dicts``.

    Example:
        >>> import torch
        >>> a = {"backbone.w": torch.tensor([0., 2.]), "head.w": torch.tensor([1.])}
        >>> b = {"backbone.w": torch.tensor([2., 4.]), "head.w": torch.tensor([5.])}
        >>> for model in merge_state_dicts_per_head([a, b], keep_heads="head"):
        ...     print(model["backbone.w"], model["head.w"])
        tensor([1., 3.]) tensor([1.])
        tensor([1., 3.]) tensor([5.])
    """
    sources = [DictSource(sd, f"input {i + 1}") for i, sd in enumerate(state_dicts)]
    plan = plan_merge(sources, MergeOptions(weights=weights, buffers=buffers, counts=counts,
                                            keep_heads=keep_heads))
    outs: list[dict[str, torch.Tensor]] = [{} for _ in state_dicts]
    for key, tensors in iter_merged(sources, plan):
        for out, t in zip(outs, tensors):
            out[key] = t
    return outs


def interpolate(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], lam: float,
                buffers: str = "gaussian") -> dict[str, torch.Tensor]:
    """(1 - lam) * a + lam * b with the merge rules; lam = 0 gives a, lam = 1 gives b.

    Args:
        a: the first model (tensor name -> tensor).
        b: the second model, of the same architecture.
        lam: the share of ``b``, in [0, 1].
        buffers: the BatchNorm statistics rule, as :func:`merge_state_dicts`.

    Returns:
        The interpolated state dict.

    Example:
        >>> import torch
        >>> a, b = {"w": torch.tensor([0., 4.])}, {"w": torch.tensor([4., 8.])}
        >>> interpolate(a, b, 0.25)["w"]
        tensor([1., 5.])
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")
    return merge_state_dicts([a, b], weights=[1.0 - lam, lam], buffers=buffers)

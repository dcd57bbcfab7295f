"""The merge plan: check that the inputs agree and give every key its rule before any data is read."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from domainmerge.checkpoint import WRAPPER_PREFIXES
from domainmerge.errors import INSPECT, MergeError, Option, Part, UserError
from domainmerge.merging.parameters import common_dtype
from domainmerge.merging.roles import MEAN_SUFFIX, VAR_SUFFIX, Role, assign_roles, rule_for, under_prefix
from domainmerge.merging.sources import Source, infos_of, source_name, strip_keys
from domainmerge.merging.spec import METHODS, MergeSpec

# What the "keys differ" error suggests by default.
ALLOW_MISSING_ADVICE: tuple[Part, ...] = ("pass ", Option("allow_missing", switch=True),
                                         " to merge the shared keys and copy the rest")


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
    spec: MergeSpec
    stats: Counter[str] = field(default_factory=Counter)
    base: Source | None = None       # the weights task vectors are taken from (method != 'linear')
    base_keys: dict[str, str] = field(default_factory=dict)  # output key -> the base's key for it
    check_finite: bool = True        # raise (naming the input) on a non-finite output tensor

    @property
    def n_outputs(self) -> int:
        return len(self.weights) if any(self.per_model.values()) else 1


def _examples(keys: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(repr(k) for k in list(keys)[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _prefix_note(names: Sequence[str], infos: Sequence[Mapping[str, object]], i: int) -> MergeError | None:
    """When two inputs hold the same network under different wrapper prefixes, say so."""
    from domainmerge.checkpoint import detect_prefixes

    pa, pb = detect_prefixes(infos[0]), detect_prefixes(infos[i])
    if pa == pb:
        return None
    sa, sb = strip_keys(list(infos[0])), strip_keys(list(infos[i]))
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
        stripped = strip_keys(list(info))
        meta = {k: torch.empty(info[full][0], dtype=info[full][1], device="meta") for k, full in stripped.items()}
        try:
            specs.append(detect_arch(meta).describe())
        except (UserError, KeyError, IndexError):
            return None
    if specs[0] == specs[1]:
        return None
    return MergeError(f"{names[0]} holds {specs[0]} but {names[i]} holds {specs[1]}: the architectures differ, "
                      "so the models cannot be merged", input=names[i])


def plan_merge(sources: Sequence[Source], spec: MergeSpec | None = None, base: Source | None = None, *,
               dtype: torch.dtype | None = None, check_finite: bool = True,
               mismatch_advice: tuple[Part, ...] = ALLOW_MISSING_ADVICE) -> MergePlan:
    """Check that the inputs (and ``base``, for the task-vector methods) can be merged as ``spec``
    says (default: the paper's linear merge) and decide the rule for every key.

    Args:
        sources: the models, read one tensor at a time.
        spec: what the merge does; only the streaming methods (:data:`~domainmerge.merging.spec.METHODS`).
        base: the weights the task vectors are taken against.
        dtype: the floating dtype of the output; None: the widest of the inputs holding each key.
        check_finite: raise (naming the input) when a merged tensor holds NaN or infinity.
        mismatch_advice: what the "keys differ" error suggests (a caller without
            ``allow_missing`` says otherwise).
    """
    spec = spec if spec is not None else MergeSpec()
    if not sources:
        raise MergeError("no inputs to merge")
    if spec.method.name not in METHODS:
        raise MergeError(Option("method", spec.method.name), " reads target images and merges whole networks; "
                         "use merge_files")
    if dtype is not None and not dtype.is_floating_point:
        raise MergeError(Option("dtype", str(dtype).replace("torch.", "")), ": not a floating-point dtype")
    weights = spec.check_inputs(len(sources), base is not None)
    out_dtype = dtype   # the name `dtype` is reused below for each input's
    infos = [infos_of(s) for s in sources]
    names = [source_name(s, i) for i, s in enumerate(sources)]
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
        if not spec.allow_missing:
            parts = []
            if missing:
                parts.append(f"lacks {len(missing)} keys of {names[0]} ({_examples(missing)})")
            if extra:
                parts.append(f"has {len(extra)} keys {names[0]} lacks ({_examples(extra)})")
            raise MergeError(f"{names[i]}: {'; '.join(parts)}; ", *mismatch_advice, input=names[i],
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
        matched = rule_for(k, spec.rules)
        head = (bool(spec.keep_heads) and under_prefix(k, spec.keep_heads or "")) or \
            (matched is not None and matched.keep_own)
        outside = bool(spec.only) and not under_prefix(k, spec.only or "")
        shared = len(holders[k]) == len(sources)
        per_model[k] = head
        merged[k] = shared and not head and not outside and k not in unpaired
        if dtypes[k].is_floating_point:
            combined = head or merged[k]
            dtypes[k] = out_dtype or (common_dtype([infos[i][k][1] for i in holders[k]]) if combined
                                          else dtypes[k])
    if spec.keep_heads and not any(per_model.values()):
        raise MergeError(Option("keep_heads", spec.keep_heads), ": no key lies under this prefix; "
                         "check the head's prefix with ", INSPECT)
    if spec.only and not any(under_prefix(k, spec.only) for k in order):
        raise MergeError(Option("only", spec.only), ": no key lies under this prefix; "
                         "check the prefixes with ", INSPECT)
    for rule in spec.rules:
        if not any(rule.matches(k) for k in order):
            raise MergeError(f"rule {rule.pattern!r}: its pattern matches no key; check the key names with ", INSPECT)
    base_keys = _match_base(base, order, roles, shapes) if base is not None else {}
    return MergePlan(order, roles, merged, per_model, holders, shapes, dtypes, weights, spec,
                     base=base, base_keys=base_keys, check_finite=check_finite)


def _match_base(base: Source, order: Sequence[str], roles: Mapping[str, Role],
                shapes: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    """Model key -> base key for every parameter the base holds, under the same name or with a
    training wrapper ('model.', 'module.', ...) added or removed (a source-only checkpoint is
    often a plain state dict, the adapted ones DA training containers)."""
    infos = infos_of(base)
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
                             f"base {source_name(base, -1)}; the base must be the weights the models were adapted from",
                             key=k, input=source_name(base, -1))
        found[k] = bk
    if not found:
        raise MergeError(f"the base {source_name(base, -1)} shares no parameter with the models; check its "
                        "prefixes with ", INSPECT)
    return found


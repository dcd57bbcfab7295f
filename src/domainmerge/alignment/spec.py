"""Permutation specs: which axis of which tensor each hidden-unit permutation acts on.

A spec is derived from a state dict's keys and shapes, never typed per depth. Two families
are recognised under a backbone prefix:

* ResNets, in mmseg ResNetV1c naming (deep stem ``stem.0/1/3/4/6/7``) or torchvision / mmseg
  V1b naming (``conv1``/``bn1``), with blocks ``layerS.B.conv1..3``/``bn1..3`` and an optional
  ``downsample`` branch (``.0``/``.1``, or avg-down ``.1``/``.2``);
* plain conv stacks: modules with integer paths (``0``, ``1``, ``3``... or ``0.0``, ``0.1``...)
  chained in order, BN layers taking the permutation of the conv before them.

Every unit between two convolutions gets a permutation; all blocks of a ResNet stage add into
one residual stream, so they share one. Units that leave the backbone (stage outputs read by a
decode head, the last conv of a stack) stay fixed, so the network outside the prefix is
untouched and the permuted model computes the same function. BN running statistics are
permuted with their channels.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor

from domainmerge.errors import Option, UserError

NORM_KEYS = ("weight", "bias", "running_mean", "running_var")
_PREFERRED_PREFIXES = ("model.backbone.", "backbone.", "module.backbone.", "model.", "module.", "")


@dataclass(frozen=True)
class PermutationSpec:
    """Permutations of a network's hidden units and the tensor axes each one acts on.

    ``axes[p]`` lists ``(key, axis)`` pairs permuted by ``p``; ``sizes[p]`` is its unit count.
    ``prefix`` is the backbone prefix the spec was derived under; ``family`` says how.
    """

    axes: dict[str, tuple[tuple[str, int], ...]]
    sizes: dict[str, int]
    prefix: str = ""
    family: str = ""
    fixed: tuple[str, ...] = field(default=())

    def perms_of_key(self) -> dict[str, tuple[tuple[str, int], ...]]:
        """For each permuted tensor, the ``(perm, axis)`` pairs that act on it."""
        out: dict[str, list[tuple[str, int]]] = {}
        for perm, pairs in self.axes.items():
            for key, axis in pairs:
                out.setdefault(key, []).append((perm, axis))
        return {key: tuple(pairs) for key, pairs in out.items()}


class _Builder:
    """Collects (key, axis) pairs per permutation; ``None`` stands for a fixed (unpermuted) axis."""

    def __init__(self, state_dict: Mapping[str, Tensor], prefix: str) -> None:
        self.sd = state_dict
        self.prefix = prefix
        self.axes: dict[str, list[tuple[str, int]]] = {}
        self.covered: set[str] = set()

    def _add(self, perm: str | None, key: str, axis: int) -> None:
        self.covered.add(key)
        if perm is not None:
            self.axes.setdefault(perm, []).append((key, axis))

    def linear(self, module: str, in_perm: str | None, out_perm: str | None) -> None:
        """A conv or linear layer: output units on axis 0, input units on axis 1."""
        key = f"{self.prefix}{module}.weight"
        self._add(out_perm, key, 0)
        self._add(in_perm, key, 1)
        if f"{self.prefix}{module}.bias" in self.sd:
            self._add(out_perm, f"{self.prefix}{module}.bias", 0)

    def norm(self, module: str, perm: str | None) -> None:
        """A BN layer: affine parameters and running statistics all follow the channel."""
        for name in NORM_KEYS:
            key = f"{self.prefix}{module}.{name}"
            if key in self.sd:
                self._add(perm, key, 0)
        self.covered.add(f"{self.prefix}{module}.num_batches_tracked")


def _modules(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, dict[str, Tensor]]:
    """Module path (relative to ``prefix``) -> {tensor name: tensor}."""
    mods: dict[str, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        if key.startswith(prefix) and "." in key[len(prefix):]:
            module, name = key[len(prefix):].rsplit(".", 1)
            mods.setdefault(module, {})[name] = value
    return mods


def _kind(tensors: Mapping[str, Tensor]) -> str:
    """'conv' (weight with >= 3 dims), 'linear' (2-d weight), 'norm' (BN with stats), else 'other'."""
    weight = tensors.get("weight")
    if "running_mean" in tensors:
        return "norm"
    if weight is None:
        return "other"
    if weight.ndim >= 3:
        return "conv"
    if weight.ndim == 2:
        return "linear"
    return "other"


def _int_path(module: str) -> tuple[int, ...] | None:
    parts = module.split(".")
    return tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else None


def _chain(builder: _Builder, modules: list[tuple[str, str]], in_perm: str | None,
           last_out: str | None) -> None:
    """Wire conv/linear/BN modules in order; each layer's output gets a permutation named after it,
    except the last weight layer's, which gets ``last_out``. Unknown modules are left uncovered."""
    weights = [m for m, kind in modules if kind in ("conv", "linear")]
    current = in_perm
    for module, kind in modules:
        if kind == "norm":
            builder.norm(module, current)
        elif kind in ("conv", "linear"):
            out = last_out if module == weights[-1] else f"{builder.prefix}{module}"
            builder.linear(module, current, out)
            current = out


def _children(mods: Mapping[str, Mapping[str, Tensor]], parent: str) -> list[tuple[str, str]]:
    """(module, kind) of the integer-indexed children ``parent.N`` in index order (a Sequential)."""
    found = [(int(m.group(1)), k) for k in mods if (m := re.fullmatch(rf"{re.escape(parent)}\.(\d+)", k))]
    return [(k, _kind(mods[k])) for _, k in sorted(found)]


def _resnet_spec(state_dict: Mapping[str, Tensor], prefix: str) -> PermutationSpec:
    mods = _modules(state_dict, prefix)
    b = _Builder(state_dict, prefix)
    stages = sorted({int(m.group(1)) for k in mods if (m := re.match(r"layer(\d+)\.\d+\.", k))})
    blocks = {s: sorted({int(m.group(1)) for k in mods if (m := re.match(rf"layer{s}\.(\d+)\.", k))})
              for s in stages}

    # Residual streams: a stage opens a new stream only where its first block has a downsample.
    streams = ["stream.stem"]
    for s in stages:
        opens = any(k.startswith(f"layer{s}.{blocks[s][0]}.downsample.") for k in mods)
        streams.append(f"stream.layer{s}" if opens else streams[-1])
    stage_outputs = streams[1:]
    has_head = any(not k.startswith(prefix) for k in state_dict)
    fc = "fc" if "fc" in mods and _kind(mods["fc"]) == "linear" else None
    # A head outside the prefix reads every stage (mmseg backbones return out_indices (0, 1, 2, 3));
    # without one, only the last stage leaves, and only a recognised classifier can follow it.
    if has_head:
        fixed = set(stage_outputs)
    elif fc is None:
        fixed = {stage_outputs[-1]}
    else:
        fixed = set()

    def perm(name: str) -> str | None:
        return None if name in fixed else f"{prefix}{name}"

    # Stem: deep stem (stem.N) or single conv1/bn1.
    stem = _children(mods, "stem")
    if stem:
        _chain(b, stem, None, perm(streams[0]))
    else:
        b.linear("conv1", None, perm(streams[0]))
        b.norm("bn1", perm(streams[0]))

    for i, s in enumerate(stages):
        stream_in = streams[i]
        for j in blocks[s]:
            block = f"layer{s}.{j}"
            stream_out = streams[i + 1]
            convs = sorted(int(k[len(block) + 5:]) for k in mods if re.fullmatch(rf"{block}\.conv\d+", k))
            current = perm(stream_in)
            for n in convs:
                out = perm(stream_out) if n == convs[-1] else f"{prefix}{block}.conv{n}"
                b.linear(f"{block}.conv{n}", current, out)
                b.norm(f"{block}.bn{n}", out)
                current = out
            down = _children(mods, f"{block}.downsample")
            if down:
                _chain(b, down, perm(stream_in), perm(stream_out))
            stream_in = stream_out
    if fc is not None:
        b.linear("fc", perm(streams[-1]), None)
    family = "resnet-v1c" if stem else "resnet"
    return _finish(b, state_dict, prefix, family, sorted(f"{prefix}{s}" for s in fixed))


def _plain_spec(state_dict: Mapping[str, Tensor], prefix: str) -> PermutationSpec:
    mods = _modules(state_dict, prefix)
    order = sorted(mods, key=lambda m: _int_path(m) or ())
    layers = [(m, _kind(mods[m])) for m in order]
    b = _Builder(state_dict, prefix)
    _chain(b, layers, None, None)
    return _finish(b, state_dict, prefix, "conv-stack", [])


def _finish(b: _Builder, state_dict: Mapping[str, Tensor], prefix: str, family: str,
            fixed: list[str]) -> PermutationSpec:
    """Check every backbone tensor is accounted for and each permutation's axes agree in size."""
    for key in state_dict:
        if key.startswith(prefix) and key not in b.covered:
            raise UserError(f"key {key!r}: alignment does not know how this tensor connects in a "
                            f"{family} backbone under prefix {prefix!r}; give the right ", Option("prefix"))
    sizes: dict[str, int] = {}
    for p, pairs in b.axes.items():
        dims = {(key, axis): state_dict[key].shape[axis] for key, axis in pairs}
        if len(set(dims.values())) != 1:
            detail = ", ".join(f"{k}[{a}]={n}" for (k, a), n in list(dims.items())[:4])
            raise UserError(f"permutation {p!r}: tensors disagree on the unit count ({detail}); "
                            f"this is not a plain {family} under prefix {prefix!r}")
        sizes[p] = next(iter(dims.values()))
    return PermutationSpec({p: tuple(v) for p, v in b.axes.items()}, sizes, prefix, family, tuple(fixed))


def _resnet_prefixes(state_dict: Mapping[str, Tensor]) -> list[str]:
    tail = "layer1.0.conv1.weight"
    return [k[: -len(tail)] for k in state_dict
            if k.endswith(tail) and (k == tail or k[-len(tail) - 1] == ".")]


def _is_plain_stack(state_dict: Mapping[str, Tensor], prefix: str) -> bool:
    mods = _modules(state_dict, prefix)
    convs = [m for m, t in mods.items() if _kind(t) in ("conv", "linear")]
    return bool(mods) and len(convs) >= 2 and all(_int_path(m) is not None for m in mods)


def detect_prefix(state_dict: Mapping[str, Tensor]) -> str:
    """The backbone prefix to align under: the student's ResNet (``model.`` before ``ema_model.``
    and ``imnet_model.``), else the first of model.backbone./backbone./model./'' holding a plain
    conv stack. Raises UserError when none is found."""
    resnets = _resnet_prefixes(state_dict)
    if resnets:
        return min(resnets, key=lambda p: (p.startswith(("ema_model.", "imnet_model.", "teacher.")), len(p)))
    for prefix in _PREFERRED_PREFIXES:
        if _is_plain_stack(state_dict, prefix):
            return prefix
    raise UserError("no ResNet (layer1.0.conv1.weight) or plain conv stack (0.weight, 1.weight, ...) found "
                    "in the checkpoint; give the backbone's ", Option("prefix"), ", e.g. 'model.backbone.'")


def spec_from_state_dict(state_dict: Mapping[str, Tensor], prefix: str | None = None) -> PermutationSpec:
    """Derive the permutation spec of the backbone under ``prefix`` (auto-detected when None)."""
    if prefix is None:
        prefix = detect_prefix(state_dict)
    elif prefix and not prefix.endswith("."):
        prefix += "."  # 'model.backbone' means the module, not every key starting with those letters
    if not any(k.startswith(prefix) for k in state_dict):
        raise UserError(f"prefix {prefix!r}: no key starts with it; give the backbone's ", Option("prefix"))
    if f"{prefix}layer1.0.conv1.weight" in state_dict:
        return _resnet_spec(state_dict, prefix)
    if _is_plain_stack(state_dict, prefix):
        return _plain_spec(state_dict, prefix)
    raise UserError(f"prefix {prefix!r}: neither a ResNet (layer1.0.conv1.weight) nor a plain conv stack "
                    "(modules 0, 1, ...) lies under it; give the backbone's ", Option("prefix"))

"""Which rule merges which tensor: a role per key, from its name and dtype."""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from domainmerge.checkpoint import WRAPPER_PREFIXES

MEAN_SUFFIX = "running_mean"
VAR_SUFFIX = "running_var"
COUNT_SUFFIX = "num_batches_tracked"
# Prefixes that training wrappers put in front of a network's keys (mmseg DA training, DDP);
# defined once, in domainmerge.checkpoint.


class Role(enum.Enum):
    """How a tensor is merged."""

    PARAM = "parameter"        # floating tensor: weighted average
    BN_MEAN = "bn_mean"        # BatchNorm running_mean: buffer rule
    BN_VAR = "bn_var"          # BatchNorm running_var: buffer rule
    COUNTER = "counter"        # num_batches_tracked: summed (gaussian), averaged or first
    KEEP = "keep"              # other integer/bool tensors: copied from the first model


def layer_of(key: str) -> str:
    """The module path of a tensor key: 'backbone.bn1.running_mean' -> 'backbone.bn1'."""
    return key.rpartition(".")[0]


def assign_roles(dtypes: Mapping[str, torch.dtype]) -> dict[str, Role]:
    """A role for every key.

    BatchNorm statistics are the ``running_mean``/``running_var`` pairs of a layer (any BN or
    SyncBN: the pair is what marks it); a lone ``running_mean`` without its ``running_var`` is
    treated as a parameter. ``num_batches_tracked`` is the layer's sample count; other integer
    and boolean tensors (index tables, masks) are kept from the first model.
    """
    keys = set(dtypes)
    roles: dict[str, Role] = {}
    for key, dtype in dtypes.items():
        layer, _, leaf = key.rpartition(".")
        prefix = f"{layer}." if layer else ""
        paired = f"{prefix}{MEAN_SUFFIX}" in keys and f"{prefix}{VAR_SUFFIX}" in keys
        if leaf == COUNT_SUFFIX:
            roles[key] = Role.COUNTER
        elif not (dtype.is_floating_point or dtype.is_complex):
            roles[key] = Role.KEEP
        elif leaf == MEAN_SUFFIX and paired:
            roles[key] = Role.BN_MEAN
        elif leaf == VAR_SUFFIX and paired:
            roles[key] = Role.BN_VAR
        else:
            roles[key] = Role.PARAM
    return roles


def under_prefix(key: str, prefix: str, wrappers: Iterable[str] = WRAPPER_PREFIXES) -> bool:
    """Whether ``key`` lies under ``prefix``, directly or inside a wrapper such as ``model.``.

    So ``--keep-heads decode_head.`` matches 'decode_head.x' and 'model.decode_head.x' alike.
    """
    if key.startswith(prefix):
        return True
    return any(key.startswith(w) and key[len(w):].startswith(prefix) for w in wrappers)


@dataclass(frozen=True)
class KeyRule:
    """A per-module override, matched by a glob pattern on the key (with or without a training
    wrapper such as ``model.``): another parameter method and its knobs, or ``keep_own`` to keep
    each model's own tensor (one output per model, like the paper's separate heads)."""

    pattern: str
    method: str | None = None
    lam: float | None = None
    density: float | None = None
    drop: float | None = None
    keep_own: bool = False
    seed: int | None = None

    def knobs(self) -> dict[str, float | int | None]:
        """The method knobs the rule sets (None: taken from the merge's method, else the default)."""
        return {"lam": self.lam, "density": self.density, "drop": self.drop, "seed": self.seed}

    def matches(self, key: str, wrappers: Iterable[str] = WRAPPER_PREFIXES) -> bool:
        if fnmatch.fnmatchcase(key, self.pattern):
            return True
        return any(key.startswith(w) and fnmatch.fnmatchcase(key[len(w):], self.pattern) for w in wrappers)


def rule_for(key: str, rules: Sequence[KeyRule]) -> KeyRule | None:
    """The first rule whose pattern matches ``key``, or None."""
    return next((r for r in rules if r.matches(key)), None)

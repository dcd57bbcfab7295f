"""Training-free merging: parameter averaging (or task-vector rules) and Gaussian pooling of BatchNorm statistics.

A merge is described by one :class:`~domainmerge.merging.spec.MergeSpec` (the method and its
knobs, the buffer rule, per-module rules); :mod:`.sources`, :mod:`.plan` and :mod:`.stream` run
it tensor by tensor, :mod:`.engine` on state dicts in memory, :mod:`.files` on checkpoint files.
"""

from domainmerge.merging.buffers import gaussian_pool, mixture_proportions, pooled_count
from domainmerge.merging.engine import interpolate, merge_state_dicts, merge_state_dicts_per_head
from domainmerge.merging.parameters import normalise_weights, weighted_average
from domainmerge.merging.plan import MergePlan, plan_merge
from domainmerge.merging.roles import KeyRule, Role, assign_roles
from domainmerge.merging.sources import DictSource, StrippedSource
from domainmerge.merging.spec import (
    BUFFER_RULES,
    DATA_METHODS,
    METHODS,
    AdaMerging,
    DareLinear,
    DareTies,
    Fisher,
    Linear,
    MergeMethod,
    MergeSpec,
    TaskArithmetic,
    Ties,
)
from domainmerge.merging.stream import iter_merged
from domainmerge.merging.taskvector import dare, task_arithmetic, ties

__all__ = [
    "BUFFER_RULES", "DATA_METHODS", "METHODS", "AdaMerging", "DareLinear", "DareTies", "DictSource", "Fisher",
    "KeyRule", "Linear", "MergeMethod", "MergePlan", "MergeSpec", "Role", "StrippedSource", "TaskArithmetic",
    "Ties", "assign_roles", "gaussian_pool", "interpolate", "iter_merged",
    "merge_state_dicts", "merge_state_dicts_per_head", "mixture_proportions",
    "normalise_weights", "plan_merge", "pooled_count", "weighted_average", "dare",
    "task_arithmetic", "ties",
]

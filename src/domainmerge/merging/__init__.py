"""Training-free merging: parameter averaging (or task-vector rules) and Gaussian pooling of BatchNorm statistics."""

from domainmerge.merging.buffers import gaussian_pool, mixture_proportions, pooled_count
from domainmerge.merging.engine import (
    BUFFER_RULES,
    METHODS,
    DictSource,
    MergeOptions,
    MergePlan,
    StrippedSource,
    interpolate,
    iter_merged,
    merge_state_dicts,
    merge_state_dicts_per_head,
    plan_merge,
)
from domainmerge.merging.parameters import normalise_weights, weighted_average
from domainmerge.merging.roles import Role, assign_roles
from domainmerge.merging.taskvector import dare, task_arithmetic, ties

__all__ = [
    "BUFFER_RULES", "METHODS", "DictSource", "MergeOptions", "MergePlan", "Role",
    "StrippedSource", "assign_roles", "gaussian_pool", "interpolate", "iter_merged",
    "merge_state_dicts", "merge_state_dicts_per_head", "mixture_proportions",
    "normalise_weights", "plan_merge", "pooled_count", "weighted_average", "dare",
    "task_arithmetic", "ties",
]

"""Parameter merging rules: pure functions over aligned tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (fp32, fp16, bf16) accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalise_weights(weights: Sequence[float] | None, k: int) -> list[float]:
    """Non-negative weights scaled to sum 1; uniform when ``weights`` is None."""
    if weights is None:
        return [1.0 / k] * k
    if len(weights) != k:
        raise ValueError(f"got {len(weights)} weights for {k} models")
    if any(w < 0 or w != w for w in weights):
        raise ValueError(f"weights must be non-negative numbers, got {list(weights)}")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights sum to zero; give at least one positive weight")
    return [float(w) / total for w in weights]


def weighted_average(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_k w_k * t_k, accumulated in float32 (float64 for float64), returned in t_0's dtype."""
    acc_dtype = accumulation_dtype(tensors[0].dtype)
    acc = torch.zeros(tensors[0].shape, dtype=acc_dtype)
    for t, w in zip(tensors, weights):
        if w:
            acc.add_(t.to(acc_dtype), alpha=w)
    return acc.to(tensors[0].dtype)

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
    active = [(t, w) for t, w in zip(tensors, weights) if w]
    if len(active) == 2 and abs(active[0][1] + active[1][1] - 1.0) < 1e-12:
        # Two models (the common case): one fused pass, a + w_b (b - a), exact at the end points.
        (a, _), (b, wb) = active
        return torch.lerp(a.to(acc_dtype), b.to(acc_dtype), wb).to(tensors[0].dtype)
    acc: torch.Tensor | None = None
    for t, w in zip(tensors, weights):
        if not w:
            continue  # a zero weight ignores the model entirely (interpolation end points stay exact)
        if acc is None:
            acc = torch.mul(t.to(acc_dtype), w)  # out of place: inputs may be read-only mapped memory
        else:
            acc.add_(t.to(acc_dtype), alpha=w)
    if acc is None:
        raise ValueError("all weights are zero")
    return acc.to(tensors[0].dtype)

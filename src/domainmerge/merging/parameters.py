"""Parameter merging rules: pure functions over aligned tensors."""

from __future__ import annotations

import math
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
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"weights must be finite non-negative numbers, got {list(weights)}")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights sum to zero; give at least one positive weight")
    return [float(w) / total for w in weights]


def common_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """The narrowest dtype holding all of ``dtypes``: float16 with float32 gives float32, float16
    with bfloat16 float32 (neither holds the other's range and precision)."""
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def weighted_average(tensors: Sequence[torch.Tensor], weights: Sequence[float],
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """sum_k w_k * t_k, accumulated in float32 (float64 when an input is float64), returned in
    ``dtype`` (default t_0's dtype)."""
    out_dtype = dtype or tensors[0].dtype
    acc_dtype = accumulation_dtype(common_dtype([t.dtype for t in tensors] + [out_dtype]))
    active = [(t, w) for t, w in zip(tensors, weights) if w]
    if len(active) == 2 and abs(active[0][1] + active[1][1] - 1.0) < 1e-12:
        # Two models (the common case): one fused pass, a + w_b (b - a), exact at the end points.
        (a, _), (b, wb) = active
        return torch.lerp(a.to(acc_dtype), b.to(acc_dtype), wb).to(out_dtype)
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
    return acc.to(out_dtype)

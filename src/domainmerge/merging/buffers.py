"""BatchNorm statistics rules: pure functions over aligned tensors.

The paper's rule reads each model's BN layer as a Gaussian fitted to n_k samples and returns
the moments of the pooled sample:

    N = sum n_k,  mu = sum (n_k/N) mu_k,  var = sum (n_k/N) (var_k + (mu_k - mu)^2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from domainmerge.merging.parameters import accumulation_dtype, common_dtype, weighted_average


def mixture_proportions(weights: Sequence[float], counts: Sequence[float] | None) -> list[float]:
    """Share of each model in the pooled sample: proportional to w_k * n_k.

    With uniform weights this is the paper's n_k / N; with missing or all-zero counts it is the
    merge weights; with weights (1 - lam, lam) and equal counts it interpolates, so the end
    points of an interpolation are exactly the two models' own statistics.
    """
    if counts is None or sum(w * c for w, c in zip(weights, counts)) <= 0:
        total = sum(weights)
        return [w / total for w in weights]
    mass = [w * float(c) for w, c in zip(weights, counts)]
    total = sum(mass)
    return [m / total for m in mass]


def gaussian_pool(means: Sequence[torch.Tensor], variances: Sequence[torch.Tensor],
                  proportions: Sequence[float], dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of the mixture sum_k p_k N(mu_k, var_k), accumulated in float32 (float64
    when an input is float64), returned in ``dtype`` (default the first model's dtypes)."""
    acc = accumulation_dtype(common_dtype([t.dtype for t in (*means, *variances)]))
    mu = weighted_average([m.to(acc) for m in means], proportions)
    var = torch.zeros_like(mu)
    for m, v, p in zip(means, variances, proportions):
        if p:
            var.add_(v.to(acc) + (m.to(acc) - mu) ** 2, alpha=p)
    return mu.to(dtype or means[0].dtype), var.to(dtype or variances[0].dtype)


def pooled_count(counts: Sequence[int], weights: Sequence[float]) -> int:
    """num_batches_tracked of the pooled layer: the sum over models that take part (w_k > 0)."""
    return int(sum(c for c, w in zip(counts, weights) if w > 0))

"""Task-vector merging rules: pure functions over aligned tensors and a shared base.

A task vector is what fine-tuning added to the base weights, ``tau_k = theta_k - base``. The
rules below combine task vectors and add the result back to the base:

- task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023):
  ``theta = base + lam * sum_k w_k tau_k``;
- TIES (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023):
  trim every tau_k to its ``density`` largest-magnitude entries (at least one), elect a sign per
  entry from the total (weighted) mass, average only the entries that agree with it (a disjoint
  mean);
- DARE (Yu et al., "Language Models are Super Mario", ICML 2024): drop each entry of tau_k with
  probability ``p`` and rescale the survivors by ``1 / (1 - p)`` (unbiased), then task arithmetic
  or TIES.

Weights ``w_k`` are the normalised merge weights (summing to 1), so ``lam = 1`` task arithmetic
is the plain weighted average of the models, the paper's linear merge.
Everything is accumulated in float32 (float64 for float64 inputs) and returned in the dtype of
the first model's tensor.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch

from domainmerge.merging.parameters import accumulation_dtype


def task_vectors(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> list[torch.Tensor]:
    """``theta_k - base`` for every model, in the accumulation dtype."""
    acc = accumulation_dtype(tensors[0].dtype)
    b = base.to(acc)
    return [t.to(acc) - b for t in tensors]


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * n)`` entries of largest magnitude, at least one for a positive
    density, and zero the rest (TIES' trim).

    Without the floor a tensor of fewer than ``1 / density`` entries (a small bias, a
    normalisation weight) would lose its whole task vector. mergekit's magnitude trim takes the
    same ``int(density * n)`` and refuses such a tensor (an assertion); the TIES paper trims all
    parameters as one vector, where no tensor is singled out. Keeping one entry is the smallest
    change that keeps every tensor's largest update.
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must lie in [0, 1], got {density}")
    n = tau.numel()
    k = max(1, int(density * n)) if density > 0 else 0
    if k >= n:
        return tau
    out = torch.zeros_like(tau)
    if k == 0:
        return out
    mag = tau.abs()
    # The k-th largest magnitude by selection (O(n), faster than topk on CPU); only when several
    # entries tie at that magnitude does topk pick exactly k of them.
    thresh = mag.reshape(-1).kthvalue(n - k + 1).values
    keep = mag >= thresh
    if int(keep.sum()) != k:
        flat = tau.reshape(-1)
        idx = mag.reshape(-1).topk(k, sorted=False).indices
        out.view(-1)[idx] = flat[idx]
        return out
    return torch.where(keep, tau, out)


def elect_sign(taus: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """The sign (+1, -1, or 0 where the mass cancels) of ``sum_k w_k tau_k`` per entry."""
    total = torch.zeros_like(taus[0])
    for tau, w in zip(taus, weights):
        total.add_(tau, alpha=w)
    return torch.sign(total)


def disjoint_mean(taus: Sequence[torch.Tensor], weights: Sequence[float], sign: torch.Tensor) -> torch.Tensor:
    """Weighted mean over the models whose (non-zero) entry agrees with ``sign``; 0 where none does."""
    num = torch.zeros_like(taus[0])
    den = torch.zeros_like(taus[0])
    for tau, w in zip(taus, weights):
        agree = (torch.sign(tau) == sign) & (tau != 0)
        num.add_(torch.where(agree, tau, torch.zeros_like(tau)), alpha=w)
        den.add_(agree.to(den.dtype), alpha=w)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))


def dare_drop(tau: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Drop each entry with probability ``p``, scale the kept ones by ``1 / (1 - p)``."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"drop rate must lie in [0, 1), got {p}")
    if p == 0.0:
        return tau
    keep = torch.rand(tau.shape, generator=generator, dtype=torch.float32) >= p
    return torch.where(keep, tau / (1.0 - p), torch.zeros_like(tau))


def key_generator(seed: int, key: str, model: int) -> torch.Generator:
    """A generator seeded from (seed, tensor name, model index), so DARE's masks do not depend on
    the order in which a streaming merge visits the tensors."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode()) * 131 + model) % 2**63)


def task_arithmetic(tensors: Sequence[torch.Tensor], base: torch.Tensor, weights: Sequence[float],
                    lam: float = 1.0) -> torch.Tensor:
    """``base + lam * sum_k w_k (theta_k - base)`` (Ilharco et al., ICLR 2023).

    Args:
        tensors: one tensor per model, all of ``base``'s shape.
        base: the weights every model was fine-tuned from.
        weights: merge weights (normalised, one per model).
        lam: scaling of the combined task vector; 1 gives the weighted average of the models.

    Returns:
        The merged tensor in ``tensors[0]``'s dtype.
    """
    taus = task_vectors(tensors, base)
    combined = torch.zeros_like(taus[0])
    for tau, w in zip(taus, weights):
        combined.add_(tau, alpha=w)
    return (base.to(combined.dtype) + lam * combined).to(tensors[0].dtype)


def ties(tensors: Sequence[torch.Tensor], base: torch.Tensor, weights: Sequence[float], lam: float = 1.0,
         density: float = 0.2) -> torch.Tensor:
    """TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint mean, scale by ``lam``.

    Args:
        tensors: one tensor per model, all of ``base``'s shape.
        base: the weights every model was fine-tuned from.
        weights: merge weights (normalised); they weigh both the sign election and the mean.
        lam: scaling of the merged task vector.
        density: share of each task vector's entries kept (by magnitude); the paper's default 0.2.

    Returns:
        The merged tensor in ``tensors[0]``'s dtype.
    """
    taus = [trim(t, density) for t in task_vectors(tensors, base)]
    return _ties_tail(taus, base, weights, lam, tensors[0].dtype)


def _ties_tail(taus: Sequence[torch.Tensor], base: torch.Tensor, weights: Sequence[float], lam: float,
               dtype: torch.dtype) -> torch.Tensor:
    merged = disjoint_mean(taus, weights, elect_sign(taus, weights))
    return (base.to(merged.dtype) + lam * merged).to(dtype)


def dare(tensors: Sequence[torch.Tensor], base: torch.Tensor, weights: Sequence[float], lam: float = 1.0,
         drop: float = 0.9, generators: Sequence[torch.Generator] | None = None, then: str = "linear",
         density: float = 1.0) -> torch.Tensor:
    """DARE (Yu et al., ICML 2024): random drop-and-rescale of every task vector, then task
    arithmetic (``then='linear'``) or TIES' sign election and disjoint mean (``then='ties'``).

    Args:
        tensors: one tensor per model, all of ``base``'s shape.
        base: the weights every model was fine-tuned from.
        weights: merge weights (normalised).
        lam: scaling of the merged task vector.
        drop: probability of dropping an entry (the paper uses up to 0.9).
        generators: one seeded generator per model (see :func:`key_generator`); fresh ones if None.
        then: 'linear' or 'ties'.
        density: TIES' trim density applied after the drop (``then='ties'`` only).

    Returns:
        The merged tensor in ``tensors[0]``'s dtype.
    """
    if then not in ("linear", "ties"):
        raise ValueError(f"then must be 'linear' or 'ties', got {then!r}")
    gens = list(generators) if generators is not None else [torch.Generator() for _ in tensors]
    taus = [dare_drop(t, drop, g) for t, g in zip(task_vectors(tensors, base), gens)]
    if then == "ties":
        return _ties_tail([trim(t, density) for t in taus], base, weights, lam, tensors[0].dtype)
    combined = torch.zeros_like(taus[0])
    for tau, w in zip(taus, weights):
        combined.add_(tau, alpha=w)
    return (base.to(combined.dtype) + lam * combined).to(tensors[0].dtype)

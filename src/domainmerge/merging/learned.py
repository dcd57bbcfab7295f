"""Merges that read unlabeled target images: Fisher merging and AdaMerging.

Unlike the paper's merge these use data (unlabeled images of the targets, never labels), so every
output that comes from them says so.

- Fisher merging (Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS
  2022): each parameter entry is averaged with weights ``w_k F_k``, where ``F_k`` is model k's
  diagonal Fisher information, estimated on model k's own target images with its own
  pseudo-labels (the arg-max of its prediction): the squared gradient of the per-image
  cross-entropy, averaged over images.
- AdaMerging (Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR
  2024): ``theta = base + sum_k lam_k tau_k`` with one coefficient per model (``granularity=
  'model'``) or per model and parameter tensor (``'layer'``), learned by minimising the mean
  prediction entropy on unlabeled images of every target. The coefficients start at the merge
  weights (the linear merge); BatchNorm statistics are re-pooled by the buffer rule at every step
  with each model's share ``max(lam_k, 0) * n_k`` (its mean coefficient in layer mode).

The model is passed in (built by the caller from the checkpoints' keys), so this module needs no
knowledge of architectures or datasets.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from domainmerge.merging.buffers import gaussian_pool, mixture_proportions
from domainmerge.merging.engine import merge_state_dicts
from domainmerge.merging.parameters import normalise_weights, weighted_average
from domainmerge.merging.roles import MEAN_SUFFIX, VAR_SUFFIX, Role, assign_roles, layer_of

StateDict = dict[str, Tensor]


def _at_input_size(out: Tensor, x: Tensor) -> Tensor:
    """Logits bilinearly resized to the input image's size (heads predict at 1/4)."""
    return out if out.shape[-2:] == x.shape[-2:] else \
        F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


def fisher_diagonal(model: nn.Module, state_dict: Mapping[str, Tensor], batches: Iterable[Tensor], *,
                    device: str | torch.device = "cpu") -> StateDict:
    """Diagonal empirical Fisher of ``model`` with ``state_dict`` on normalised image batches.

    Every image contributes ``(d/dtheta CE(f(x), argmax f(x)))^2`` (cross-entropy averaged over
    its pixels, the model in eval mode so BatchNorm uses its running statistics); the result is
    the mean over images, keyed like ``model.named_parameters()``.

    Args:
        model: the network (its weights are replaced by ``state_dict``).
        state_dict: the model's weights, keys as ``model.state_dict()``.
        batches: normalised float batches [B, 3, H, W]; split into single images here.
        device: where to compute.

    Returns:
        One non-negative tensor per trainable parameter.
    """
    model.load_state_dict(state_dict)
    model.to(device).eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    count = 0
    for batch in batches:
        for x in batch.to(device).split(1):
            logits = _at_input_size(model(x), x)
            target = logits.detach().argmax(1)
            grads = torch.autograd.grad(F.cross_entropy(logits, target), list(params.values()), allow_unused=True)
            for (n, _), g in zip(params.items(), grads):
                if g is not None:
                    fisher[n].add_(g.detach().float() ** 2)
            count += 1
    if count == 0:
        raise ValueError("no image to estimate the Fisher information on")
    return {n: (f / count).cpu() for n, f in fisher.items()}


def fisher_merge(state_dicts: Sequence[Mapping[str, Tensor]], fishers: Sequence[Mapping[str, Tensor]],
                 weights: Sequence[float] | None = None, *, buffers: str = "gaussian",
                 counts: Sequence[float] | None = None, floor: float = 1e-6) -> StateDict:
    """Fisher-weighted average: ``sum_k w_k F_k theta_k / sum_k w_k F_k`` per entry.

    Entries of ``F_k`` are floored at ``floor`` times their tensor's mean (so an entry no image
    moved falls back to the weighted average instead of dividing by zero). Keys without a Fisher
    (BatchNorm statistics, counters, tensors the model did not train) follow the linear merge and
    ``buffers``.

    Args:
        state_dicts: the models, same keys.
        fishers: one Fisher per model (keys a subset of the state dicts').
        weights: merge weights (uniform by default).
        buffers: 'gaussian' | 'mean' | 'first' for BatchNorm statistics.
        counts: samples behind each model's BN statistics (default: num_batches_tracked).
        floor: relative floor of the Fisher entries.

    Returns:
        The merged state dict.
    """
    w = normalise_weights(weights, len(state_dicts))
    merged = merge_state_dicts(state_dicts, weights=w, buffers=buffers, counts=counts)
    for key in fishers[0]:
        fs = [f[key].float() for f in fishers]
        fs = [f.clamp_min(floor * float(f.mean()) + 1e-30) for f in fs]
        num = torch.zeros_like(fs[0])
        den = torch.zeros_like(fs[0])
        for wk, f, sd in zip(w, fs, state_dicts):
            num.add_(f * sd[key].float(), alpha=wk)
            den.add_(f, alpha=wk)
        merged[key] = (num / den).to(state_dicts[0][key].dtype)
    return merged


def mean_entropy(logits: Tensor) -> Tensor:
    """Mean over pixels (and images) of the prediction entropy ``-sum_c p_c log p_c``."""
    logp = F.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(1).mean()


@dataclass
class AdaMergingResult:
    """The merged weights, the learned coefficients and the entropy at every step."""

    state_dict: StateDict
    coefficients: dict[str, list[float]]          # 'model' -> [K], or parameter name -> [K]
    entropy: list[float] = field(default_factory=list)


def _bn_layers(keys: Iterable[str], roles: Mapping[str, Role]) -> list[str]:
    return sorted({layer_of(k) for k in keys if roles[k] == Role.BN_MEAN})


def adamerging(model: nn.Module, state_dicts: Sequence[Mapping[str, Tensor]], base: Mapping[str, Tensor],
               batches: Sequence[Sequence[Tensor]], *, weights: Sequence[float] | None = None,
               granularity: str = "layer", steps: int = 100, lr: float = 1e-3, buffers: str = "gaussian",
               device: str | torch.device = "cpu", progress: bool = False) -> AdaMergingResult:
    """Learn merge coefficients by entropy minimisation on unlabeled images (AdaMerging).

    Args:
        model: the network the state dicts belong to (keys as ``model.state_dict()``).
        state_dicts: the adapted models.
        base: the weights they were adapted from; parameters it lacks use base 0 (a weighted sum).
        batches: per target, a list of normalised image batches; every step forwards one batch of
            each target (cycling) and minimises the summed mean entropy.
        weights: initial coefficients (the merge weights; uniform by default), i.e. the linear merge.
        granularity: 'model' (one coefficient per model) or 'layer' (per model and parameter tensor).
        steps: optimisation steps (Adam).
        lr: Adam's learning rate (the paper's 1e-3).
        buffers: BatchNorm statistics rule, applied with the current coefficients.
        device: where to compute.
        progress: show a progress bar.

    Returns:
        The merged state dict, the learned coefficients and the entropy per step.
    """
    if granularity not in ("model", "layer"):
        raise ValueError(f"granularity must be 'model' or 'layer', got {granularity!r}")
    if not batches or any(len(b) == 0 for b in batches):
        raise ValueError("every target needs at least one image batch")
    k = len(state_dicts)
    w0 = torch.tensor(normalise_weights(weights, k), dtype=torch.float32)
    roles = assign_roles({key: t.dtype for key, t in state_dicts[0].items()})
    param_keys = [key for key, r in roles.items() if r == Role.PARAM]
    taus = {key: torch.stack([sd[key].float() - (base[key].float() if key in base else 0.0)
                              for sd in state_dicts]).to(device) for key in param_keys}
    bases = {key: (base[key].float() if key in base else torch.zeros_like(state_dicts[0][key].float())).to(device)
             for key in param_keys}
    n_coef = 1 if granularity == "model" else len(param_keys)
    coef = nn.Parameter(w0.repeat(n_coef, 1).to(device))          # [n_coef, K]
    opt = torch.optim.Adam([coef], lr=lr)
    layers = _bn_layers(state_dicts[0], roles)

    def params_now() -> dict[str, Tensor]:
        out = {}
        for i, key in enumerate(param_keys):
            c = coef[0 if granularity == "model" else i]
            out[key] = bases[key] + torch.tensordot(c, taus[key], dims=1)
        return out

    def buffers_now() -> dict[str, Tensor]:
        share = coef.detach().mean(0).clamp_min(0).cpu().tolist()
        if sum(share) <= 0:
            share = w0.tolist()
        out: dict[str, Tensor] = {}
        for layer in layers:
            pre = f"{layer}." if layer else ""
            means = [sd[pre + MEAN_SUFFIX] for sd in state_dicts]
            variances = [sd[pre + VAR_SUFFIX] for sd in state_dicts]
            if buffers == "first":
                mu, var = means[0], variances[0]
            elif buffers == "mean":
                mu, var = weighted_average(means, share), weighted_average(variances, share)
            else:
                count_key = pre + "num_batches_tracked"
                counts = [float(sd[count_key]) for sd in state_dicts] if count_key in state_dicts[0] else None
                mu, var = gaussian_pool(means, variances, mixture_proportions(share, counts))
            out[pre + MEAN_SUFFIX], out[pre + VAR_SUFFIX] = mu.to(device), var.to(device)
        return out

    fixed = {key: t.to(device) for key, t in merge_state_dicts(state_dicts, weights=w0.tolist(),
                                                               buffers=buffers).items()
             if roles[key] not in (Role.PARAM, Role.BN_MEAN, Role.BN_VAR)}
    model.to(device).eval()
    streams = [itertools.cycle(b) for b in batches]
    history: list[float] = []
    from tqdm import tqdm

    for _ in tqdm(range(steps), desc="adamerging", unit="step", disable=not progress):
        state = {**fixed, **buffers_now(), **params_now()}
        loss = sum(mean_entropy(_call(model, state, next(s).to(device))) for s in streams)
        assert isinstance(loss, Tensor)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(float(loss.detach()) / len(streams))
    with torch.no_grad():
        final = {**fixed, **buffers_now(), **params_now()}
    merged = {key: final[key].detach().cpu().to(state_dicts[0][key].dtype) for key in state_dicts[0]}
    coefs = coef.detach().cpu().tolist()
    names = ["model"] if granularity == "model" else param_keys
    return AdaMergingResult(merged, dict(zip(names, coefs)), history)


def _call(model: nn.Module, state: Mapping[str, Tensor], x: Tensor) -> Tensor:
    return _at_input_size(torch.func.functional_call(model, dict(state), (x,), strict=False), x)

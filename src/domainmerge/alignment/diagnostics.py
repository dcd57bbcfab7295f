"""Data-free diagnostics: will averaging these models work? (task vectors + weight matching)

For each model k, the task vector tau_k = theta_k - theta_base is what adaptation changed. The
paper's finding is that averaging works when every model was adapted from the same pretrained
weights: then each tau_k is small next to theta_base and Git Re-Basin weight matching keeps
(almost) every unit in place. Models trained from another initialisation show task vectors as
large as the weights themselves and a permuted unit correspondence. The verdict's thresholds
are rules of thumb read off those two situations, not guarantees.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from itertools import combinations
from typing import Any

from torch import Tensor

from domainmerge.errors import UserError

# Above this relative task-vector norm a model does not look fine-tuned from the base (independent
# initialisations give about sqrt(2); fine-tuning typically a few percent).
FAR_FROM_BASE = 0.5
# Below this share of units kept in place by weight matching, models sit in different basins.
MIN_IDENTITY = 0.9
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def _parameters(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Floating-point parameters (BN statistics and counters dropped)."""
    return {k: v for k, v in sd.items() if v.is_floating_point() and not k.endswith(_BUFFER_SUFFIXES)}


def _base_offset(base: Mapping[str, Tensor], model: Mapping[str, Tensor]) -> str:
    """'' or 'backbone.': how base keys map onto model keys (ImageNet backbones lack 'backbone.')."""
    def hits(offset: str) -> int:
        return sum(1 for k, v in base.items() if (offset + k) in model and model[offset + k].shape == v.shape)
    return max(("", "backbone."), key=hits)


def _group(key: str, depth: int) -> str:
    parts = key.split(".")[:-1]  # never the tensor name itself
    return ".".join(parts[:depth]) or key


def _identity(reference: Mapping[str, Tensor], other: Mapping[str, Tensor]) -> tuple[float | None, str]:
    """Unit-weighted share of units weight matching keeps in place, or None and why not."""
    from domainmerge.alignment.matching import align_state_dicts

    try:
        _, report = align_state_dicts(reference, other, max_rounds=5)
    except UserError as exc:
        return None, f"weight matching not available: {exc}"
    return report.overall, f"{report.family} under {report.prefix!r}, {len(report.sizes)} permutations"


def task_vector_report(base: Mapping[str, Tensor], models: Mapping[str, Mapping[str, Tensor]],
                       depth: int = 2) -> dict[str, Any]:
    """Task-vector statistics of ``models`` against ``base``, per module (keys grouped by their
    first ``depth`` components) and overall: norm of each tau_k, its norm relative to the base
    weights, pairwise cosine similarities; the identity fraction from weight matching (each
    model to the first; a single model to the base); and a plain-language verdict. JSON-ready."""
    if not models:
        raise UserError("no model to compare with the base; give at least one checkpoint")
    from domainmerge.checkpoint import strip_model_prefix

    full = {name: strip_model_prefix(sd, "auto") for name, sd in models.items()}
    params = {name: _parameters(sd) for name, sd in full.items()}
    names = list(params)
    base_full = strip_model_prefix(base, "auto")
    base_params = _parameters(base_full)
    offset = _base_offset(base_params, params[names[0]])
    shared = [offset + k for k, v in base_params.items()
              if all((offset + k) in p and p[offset + k].shape == v.shape for p in params.values())]
    if not shared:
        raise UserError("the base shares no parameter (same name and shape) with the models; is it the "
                        "pretrained checkpoint they were adapted from?")
    shared_set = set(shared)
    excluded = sorted({k for p in params.values() for k in p if k not in shared_set})

    stats: dict[str, dict[str, Any]] = {}
    for key in shared:
        theta0 = base_params[key[len(offset):]].double().flatten()
        taus = {n: params[n][key].double().flatten() - theta0 for n in names}
        for g in (_group(key, depth), "all"):
            s = stats.setdefault(g, {"params": 0, "base_sq": 0.0, "sq": dict.fromkeys(names, 0.0),
                                     "dot": {pair: 0.0 for pair in combinations(names, 2)}})
            s["params"] += theta0.numel()
            s["base_sq"] += float(theta0 @ theta0)
            for n in names:
                s["sq"][n] += float(taus[n] @ taus[n])
            for a, b in s["dot"]:
                s["dot"][(a, b)] += float(taus[a] @ taus[b])

    def summary(module: str, s: dict[str, Any]) -> dict[str, Any]:
        norms = {n: math.sqrt(s["sq"][n]) for n in names}
        base_norm = math.sqrt(s["base_sq"])
        return {"module": module, "params": s["params"], "norm": norms,
                "relative": {n: (v / base_norm if base_norm > 0 else None) for n, v in norms.items()},
                "cosine": [{"a": a, "b": b, "cosine": (d / (norms[a] * norms[b]) if norms[a] * norms[b] > 0
                                                       else None)} for (a, b), d in s["dot"].items()]}

    overall = summary("all", stats.pop("all"))
    identity: dict[str, float | None] = {}
    notes: list[str] = []
    if len(names) == 1:
        rebased = {offset + k: v for k, v in base_full.items()}
        identity[names[0]], note = _identity(rebased, {k: v for k, v in full[names[0]].items() if k in rebased})
        notes.append(note)
    else:
        for n in names[1:]:
            identity[n], note = _identity(full[names[0]], full[n])
            notes.append(note)
    return {"models": names, "base_prefix_added": offset, "parameters_compared": overall["params"],
            "excluded_keys": excluded, "modules": [summary(g, s) for g, s in stats.items()], "overall": overall,
            "identity": identity, "identity_reference": names[0] if len(names) > 1 else "base",
            "identity_note": "; ".join(sorted(set(notes))), "verdict": verdict(overall, identity)}


def verdict(overall: Mapping[str, Any], identity: Mapping[str, float | None]) -> dict[str, Any]:
    """``{'safe': bool, 'text': str}`` from the overall relative norms and identity fractions."""
    rel = {n: r for n, r in overall["relative"].items() if r is not None}
    far = {n: r for n, r in rel.items() if r > FAR_FROM_BASE}
    if far:
        n, r = max(far.items(), key=lambda nr: nr[1])
        return {"safe": False, "text": (
            f"Linear merging is likely UNSAFE: {n} moved {100 * r:.0f}% of the base weights' norm away from the "
            "base, so it does not look adapted from it. Models from different initialisations are not linearly "
            "connected; averaging them usually collapses accuracy.")}
    low = {n: f for n, f in identity.items() if f is not None and f < MIN_IDENTITY}
    if low:
        n, f = min(low.items(), key=lambda nf: nf[1])
        return {"safe": False, "text": (
            f"Linear merging is likely UNSAFE: weight matching keeps only {100 * f:.0f}% of {n}'s units in place, "
            "so the models' units do not correspond. Align them first (merge --align) and expect a barrier.")}
    known = [f for f in identity.values() if f is not None]
    kept = f" and weight matching keeps {100 * min(known):.0f}% of units in place" if known else ""
    largest = max(rel.values(), default=0.0)
    return {"safe": True, "text": (
        f"Linear merging is likely safe: every model stays close to the shared base (task vectors at most "
        f"{100 * largest:.1f}% of its norm){kept}, the situation in which the paper finds no barrier.")}


def render_report(report: Mapping[str, Any]) -> str:
    """Markdown of a :func:`task_vector_report` (:func:`domainmerge.reporting.task_vector_markdown`)."""
    from domainmerge.reporting import task_vector_markdown

    return task_vector_markdown(report)

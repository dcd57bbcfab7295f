"""Git Re-Basin weight matching: permute one network's hidden units onto another's.

Coordinate descent (Ainsworth et al., 2023): visit the permutations in a random order; for
each, with all others held fixed, the best one is a linear assignment problem on the summed
inner products of the units' weights, solved by scipy's ``linear_sum_assignment``. Stop after a
full round in which no permutation improves. Pure functions over ``dict[str, Tensor]``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from domainmerge.alignment.spec import PermutationSpec, spec_from_state_dict
from domainmerge.errors import UserError

_STAT_SUFFIXES = (".running_mean", ".running_var")


@dataclass
class AlignmentReport:
    """What weight matching found: per permutation, its size and the share of units kept in place."""

    prefix: str
    family: str
    identity: dict[str, float]
    sizes: dict[str, int]
    rounds: int
    seconds: float
    fixed: list[str] = field(default_factory=list)

    @property
    def overall(self) -> float:
        """Fraction of all permuted units mapped to themselves (unit-weighted)."""
        total = sum(self.sizes.values())
        if total == 0:
            return 1.0
        return sum(self.identity[p] * n for p, n in self.sizes.items()) / total

    def to_dict(self) -> dict[str, object]:
        """JSON-ready summary."""
        return {"prefix": self.prefix, "family": self.family, "overall_identity": self.overall,
                "rounds": self.rounds, "seconds": self.seconds, "fixed": self.fixed,
                "permutations": [{"name": p, "units": self.sizes[p], "identity": self.identity[p]}
                                 for p in self.sizes]}


def apply_permutation(state_dict: Mapping[str, Tensor], spec: PermutationSpec,
                      perms: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A new state dict where, for each ``(key, axis)`` of permutation ``p``, entry ``i`` along
    ``axis`` is the old entry ``perms[p][i]``. Tensors the spec does not name are shared as is."""
    out = dict(state_dict)
    for key, pairs in spec.perms_of_key().items():
        value = state_dict[key]
        for perm, axis in pairs:
            value = value.index_select(axis, perms[perm].to(value.device))
        out[key] = value
    return out


def _check_compatible(reference: Mapping[str, Tensor], other: Mapping[str, Tensor],
                      spec: PermutationSpec) -> None:
    extra = sorted(k for k in set(other).symmetric_difference(reference) if k.startswith(spec.prefix))
    if extra:
        raise UserError(f"key {extra[0]!r}: in only one of the two models; both checkpoints must have the "
                        "same architecture")
    for key in spec.perms_of_key():
        if key not in other:
            raise UserError(f"key {key!r}: present in the reference but not in the other model; "
                            "both checkpoints must have the same architecture")
        if tuple(other[key].shape) != tuple(reference[key].shape):
            raise UserError(f"key {key!r}: shape {tuple(other[key].shape)} differs from the reference's "
                            f"{tuple(reference[key].shape)}; both must have the same architecture")


def weight_matching(reference: Mapping[str, Tensor], other: Mapping[str, Tensor], spec: PermutationSpec,
                    *, seed: int = 0, max_rounds: int = 100,
                    init: Mapping[str, Tensor] | None = None) -> tuple[dict[str, Tensor], int]:
    """Permutations (index tensors) maximising sum_key <reference[key], permuted other[key]>.

    Starts from the identity (or ``init``); BN running statistics are permuted but do not enter
    the objective (they are not weights). Returns the permutations and the number of rounds.
    """
    _check_compatible(reference, other, spec)
    key_perms = spec.perms_of_key()
    perms = {p: (init[p].clone() if init is not None else torch.arange(n)) for p, n in spec.sizes.items()}
    # Precompute, per permutation, the reference's unit rows [n, rest] for every tensor it acts on.
    terms: dict[str, list[tuple[str, int, Tensor]]] = {}
    for p, pairs in spec.axes.items():
        n = spec.sizes[p]
        terms[p] = [(key, axis, reference[key].float().movedim(axis, 0).reshape(n, -1))
                    for key, axis in pairs if not key.endswith(_STAT_SUFFIXES)]
    others = {key: other[key].float() for key in key_perms}
    # A permutation's cost matrix depends only on the permutations sharing a tensor with it; if
    # none of them changed since it was last solved, solving it again cannot improve it.
    neighbours = {p: {q for key, _ in pairs for q, _ in key_perms[key] if q != p} for p, pairs in spec.axes.items()}
    changed_at = dict.fromkeys(spec.sizes, 0)
    solved_at = dict.fromkeys(spec.sizes, -1)
    step = 0
    rng = np.random.default_rng(seed)
    names = list(spec.sizes)
    rounds = 0
    for rounds in range(1, max_rounds + 1):  # noqa: B007 (the count is returned)
        improved = False
        for idx in rng.permutation(len(names)):
            p = names[idx]
            step += 1
            if solved_at[p] > max((changed_at[q] for q in neighbours[p]), default=0):
                continue
            solved_at[p] = step
            n = spec.sizes[p]
            cost = torch.zeros(n, n)
            for key, axis, ref_rows in terms[p]:
                value = others[key]
                for q, ax in key_perms[key]:
                    if q != p:
                        value = value.index_select(ax, perms[q])
                cost.addmm_(ref_rows, value.movedim(axis, 0).reshape(n, -1).T)
            c = cost.double().numpy()
            rows, cols = linear_sum_assignment(c, maximize=True)
            old = c[np.arange(n), perms[p].numpy()].sum()
            new = c[rows, cols].sum()
            # Only a strict gain counts: ties and float noise keep the current (identity-first) choice.
            if new > old + 1e-9 * max(1.0, abs(old)):
                perms[p] = torch.as_tensor(cols, dtype=torch.long)
                changed_at[p] = step
                improved = True
        if not improved:
            break
    return perms, rounds


def identity_fractions(perms: Mapping[str, Tensor]) -> dict[str, float]:
    """Per permutation, the fraction of units i with perm[i] == i."""
    return {p: float((v == torch.arange(len(v))).double().mean()) if len(v) else 1.0
            for p, v in perms.items()}


def align_state_dicts(reference: Mapping[str, Tensor], other: Mapping[str, Tensor], prefix: str | None = None,
                      seed: int = 0, max_rounds: int = 100) -> tuple[dict[str, Tensor], AlignmentReport]:
    """Permute ``other``'s backbone units to match ``reference`` (Git Re-Basin weight matching).

    Args:
        reference: the state dict to align to (kept as it is).
        other: the state dict whose units are permuted; the result computes the same function.
        prefix: where the backbone's keys start (``'backbone.'``, ``'model.backbone.'``); None
            detects it.
        seed: order of the coordinate-descent passes over the permutations.
        max_rounds: passes at most (it stops earlier when no permutation changes).

    Returns:
        ``(aligned, report)``: ``other`` permuted, and an :class:`AlignmentReport` (per
        permutation its size and the share of units kept in place, ``.overall``).

    Example:
        >>> import torch
        >>> from domainmerge import align_state_dicts, build_model
        >>> _ = torch.manual_seed(0)
        >>> a = build_model("tiny_daformer_r").state_dict()
        >>> aligned, report = align_state_dicts(a, a)
        >>> report.overall    # a model matched to itself keeps every unit in place
        1.0
    """
    start = time.perf_counter()
    spec = spec_from_state_dict(reference, prefix)
    perms, rounds = weight_matching(reference, other, spec, seed=seed, max_rounds=max_rounds)
    aligned = apply_permutation(other, spec, perms)
    report = AlignmentReport(spec.prefix, spec.family, identity_fractions(perms), dict(spec.sizes), rounds,
                             time.perf_counter() - start, list(spec.fixed))
    return aligned, report


@dataclass
class AlignedFile:
    """What :func:`align_files` wrote: the output, the matching's report, and the wrapper
    prefixes (``ema_model.`` ...) whose copies of the network were left unpermuted."""

    output: Path
    report: AlignmentReport
    unpermuted: list[str]


def align_files(reference: str | os.PathLike[str], other: str | os.PathLike[str],
                output: str | os.PathLike[str], *, prefix: str | None = None, seed: int = 0,
                trust_pickle: bool = False, force: bool = False) -> AlignedFile:
    """Permute ``other``'s backbone units onto ``reference``'s (weight matching) and write the
    permuted checkpoint to ``output`` in ``other``'s container, recording the alignment (the
    library behind ``domainmerge align``). The output path is checked before any work.

    Args:
        reference: the checkpoint whose units stay in place.
        other: the checkpoint to permute (the function computed is unchanged).
        output: the permuted copy of ``other``.
        prefix: the backbone's key prefix (default: detected).
        seed: the order in which layers are visited.
        trust_pickle: full unpickling (only for files you trust); force: replace an existing output.

    Returns:
        An :class:`AlignedFile`: the output, the :class:`AlignmentReport` (``overall``: the share
        of units left in place) and the wrapper prefixes whose copies were not permuted.

    Example:
        >>> import os, tempfile, torch
        >>> from domainmerge import align_files, build_model, save_checkpoint
        >>> folder = tempfile.mkdtemp()
        >>> paths = []
        >>> for seed in (0, 1):
        ...     _ = torch.manual_seed(seed)
        ...     paths.append(save_checkpoint(os.path.join(folder, f"m{seed}.pth"),
        ...                                  build_model("tiny_daformer_r").state_dict()))
        >>> done = align_files(paths[0], paths[0], os.path.join(folder, "same.pth"))
        >>> done.output.name, done.report.overall   # a model aligned to itself stays as it is
        ('same.pth', 1.0)
    """
    from domainmerge.checkpoint import detect_prefixes, open_checkpoint, save_checkpoint, updated_record
    from domainmerge.fsutil import check_output_path

    inputs = (reference, other)
    check_output_path(output, force=force, inputs=inputs)
    with open_checkpoint(reference, trust_pickle=trust_pickle) as ref, \
            open_checkpoint(other, trust_pickle=trust_pickle) as oth:
        aligned, report = align_state_dicts(ref.state_dict(), oth.state_dict(), prefix=prefix, seed=seed)
        record = updated_record(oth, aligned_to={"reference": ref.path.name, "prefix": report.prefix,
                                                 "seed": seed, "identity": report.overall})
        written = save_checkpoint(output, aligned, template=oth, record=record, force=force, inputs=inputs)
    others = [p for p in detect_prefixes(aligned) if not report.prefix.startswith(p)]
    return AlignedFile(written, report, others)

"""Task-vector diagnostics: shared-init fine-tunes versus independently initialised networks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from domainmerge.alignment.diagnostics import render_report, task_vector_report
from domainmerge.errors import UserError
from domainmerge.models import build_model

STATS = ("running_mean", "running_var", "num_batches_tracked")


def fresh(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = build_model("tiny_daformer_r", num_classes=5)
    with torch.no_grad():  # non-trivial BN affine so independent nets differ there too
        for k, v in net.state_dict().items():
            if k.endswith(("bn1.weight", "bn2.weight", "bn3.weight")):
                v.uniform_(0.5, 1.5)
    return dict(net.state_dict())


def fine_tune(base: dict[str, torch.Tensor], seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    """The base plus a small perturbation: the shape of a short adaptation from shared weights."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * v.std() * torch.randn(v.shape, generator=gen)
            if v.is_floating_point() and v.numel() > 1 else v.clone() for k, v in base.items()}


def by_hand(base, models, keys):  # type: ignore[no-untyped-def]
    """Relative norms and the cosine of two task vectors over ``keys``, in numpy float64."""
    b = np.concatenate([base[k].double().numpy().ravel() for k in keys])
    taus = [np.concatenate([m[k].double().numpy().ravel() for k in keys]) - b for m in models]
    rel = [np.linalg.norm(t) / np.linalg.norm(b) for t in taus]
    cos = taus[0] @ taus[1] / (np.linalg.norm(taus[0]) * np.linalg.norm(taus[1]))
    return rel, cos


def test_shared_init_fine_tunes_are_judged_safe() -> None:
    base = fresh(0)
    a, b = fine_tune(base, 1), fine_tune(base, 2)
    # DA training checkpoints wrap the student in 'model.'; an ImageNet base has no 'backbone.'.
    models = {"a": {f"model.{k}": v for k, v in a.items()}, "b": b}
    imagenet = {k[len("backbone."):]: v for k, v in base.items() if k.startswith("backbone.")}
    report = task_vector_report(imagenet, models)
    keys = [k for k, v in base.items() if k.startswith("backbone.") and v.is_floating_point()
            and not k.endswith(STATS)]
    rel, cos = by_hand(base, [a, b], keys)
    assert report["overall"]["relative"]["a"] == pytest.approx(rel[0], rel=1e-9)
    assert report["overall"]["relative"]["b"] == pytest.approx(rel[1], rel=1e-9)
    assert report["overall"]["cosine"][0]["cosine"] == pytest.approx(cos, rel=1e-9, abs=1e-12)
    assert report["parameters_compared"] == sum(base[k].numel() for k in keys)
    assert any(k.startswith("decode_head.") for k in report["excluded_keys"])
    layer1 = next(m for m in report["modules"] if m["module"] == "backbone.layer1")
    k1 = [k for k in keys if k.startswith("backbone.layer1.")]
    assert layer1["relative"]["a"] == pytest.approx(by_hand(base, [a, b], k1)[0][0], rel=1e-9)
    assert report["identity"] == {"b": 1.0}
    assert report["verdict"]["safe"] is True
    assert "likely safe" in render_report(report)


def test_independently_initialised_nets_are_judged_unsafe() -> None:
    base = fresh(0)
    report = task_vector_report(base, {"x": fresh(1), "y": fresh(2)})
    assert report["overall"]["relative"]["x"] > 0.5  # comparable to the weights themselves
    assert report["identity"]["y"] is not None and report["identity"]["y"] < 0.9
    assert report["verdict"]["safe"] is False
    assert "UNSAFE" in render_report(report)


def test_permuted_fine_tune_is_caught_by_weight_matching() -> None:
    # Close to the base in norm would be impossible for a permuted copy, so test the identity rule alone:
    # a single model compared with the base, its units permuted (same function, different unit order).
    from domainmerge.alignment.matching import apply_permutation
    from domainmerge.alignment.spec import spec_from_state_dict

    base = fresh(0)
    spec = spec_from_state_dict(base)
    gen = torch.Generator().manual_seed(3)
    permuted = apply_permutation(base, spec, {p: torch.randperm(n, generator=gen) for p, n in spec.sizes.items()})
    report = task_vector_report(base, {"p": permuted})
    assert report["identity_reference"] == "base"
    assert report["identity"]["p"] < 0.5
    assert report["verdict"]["safe"] is False


def test_unrelated_base_is_a_user_error() -> None:
    with pytest.raises(UserError, match="shares no parameter"):
        task_vector_report({"other.weight": torch.zeros(3)}, {"a": fresh(0)})

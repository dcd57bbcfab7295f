"""The merge rules against formulas computed independently in numpy, and their properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from domainmerge.errors import UserError
from domainmerge.merging import interpolate, merge_state_dicts, merge_state_dicts_per_head

C = 5  # channels of the toy BN layer


def toy_model(rng: np.random.Generator, count: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A conv + BN + head state dict with random values and a given num_batches_tracked."""
    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float64)).to(dtype)
    return {
        "backbone.conv.weight": t(rng.normal(size=(C, 3, 3, 3))),
        "backbone.bn.weight": t(rng.uniform(0.5, 1.5, C)),
        "backbone.bn.bias": t(rng.normal(size=C)),
        "backbone.bn.running_mean": t(rng.normal(size=C)),
        "backbone.bn.running_var": t(rng.uniform(0.2, 3.0, C)),
        "backbone.bn.num_batches_tracked": torch.tensor(count, dtype=torch.int64),
        "decode_head.conv_seg.weight": t(rng.normal(size=(4, C, 1, 1))),
        "decode_head.conv_seg.bias": t(rng.normal(size=4)),
        "backbone.pos_index": torch.arange(6, dtype=torch.int64) + count,  # integer: kept from first
    }


def np_of(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float64).numpy()


def reference_merge(models, weights, counts):
    """The paper's formulas written out in numpy, independent of the library."""
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    out = {}
    for key in models[0]:
        if key.endswith(("running_mean", "running_var", "num_batches_tracked", "pos_index")):
            continue
        out[key] = sum(wk * np_of(m[key]) for wk, m in zip(w, models))
    n = np.asarray(counts, dtype=np.float64)
    p = w * n / np.sum(w * n)  # uniform w: n_k / N
    mus = [np_of(m["backbone.bn.running_mean"]) for m in models]
    vs = [np_of(m["backbone.bn.running_var"]) for m in models]
    mu = sum(pk * mk for pk, mk in zip(p, mus))
    out["backbone.bn.running_mean"] = mu
    out["backbone.bn.running_var"] = sum(pk * (vk + (mk - mu) ** 2) for pk, vk, mk in zip(p, vs, mus))
    out["backbone.bn.num_batches_tracked"] = np.sum(n)
    out["backbone.pos_index"] = np_of(models[0]["backbone.pos_index"])
    return out


TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_merge_matches_numpy_formulas(k, dtype):
    rng = np.random.default_rng(k)
    counts = [100 * (i + 1) + 7 * i for i in range(k)]
    weights = list(rng.uniform(0.2, 2.0, k))
    models = [toy_model(rng, c, dtype) for c in counts]
    merged = merge_state_dicts(models, weights=weights)
    ref = reference_merge(models, weights, counts)
    assert set(merged) == set(models[0])
    for key, value in ref.items():
        assert merged[key].dtype == models[0][key].dtype, key  # written back in the input dtype
        scale = max(1.0, float(np.abs(value).max()))
        np.testing.assert_allclose(np_of(merged[key]), value, atol=TOL.get(dtype, 0) * scale, rtol=0, err_msg=key)


def test_uniform_weights_give_the_papers_counts_rule():
    rng = np.random.default_rng(0)
    a, b = toy_model(rng, 300), toy_model(rng, 100)
    merged = merge_state_dicts([a, b])
    mu_a, mu_b = np_of(a["backbone.bn.running_mean"]), np_of(b["backbone.bn.running_mean"])
    v_a, v_b = np_of(a["backbone.bn.running_var"]), np_of(b["backbone.bn.running_var"])
    mu = 0.75 * mu_a + 0.25 * mu_b
    var = 0.75 * (v_a + (mu_a - mu) ** 2) + 0.25 * (v_b + (mu_b - mu) ** 2)
    np.testing.assert_allclose(np_of(merged["backbone.bn.running_mean"]), mu, rtol=1e-6)
    np.testing.assert_allclose(np_of(merged["backbone.bn.running_var"]), var, rtol=1e-6)
    assert int(merged["backbone.bn.num_batches_tracked"]) == 400
    # parameters stay a plain mean whatever the counts
    np.testing.assert_allclose(np_of(merged["backbone.bn.bias"]),
                               0.5 * np_of(a["backbone.bn.bias"]) + 0.5 * np_of(b["backbone.bn.bias"]), rtol=1e-6)


def test_explicit_counts_override_num_batches_tracked():
    rng = np.random.default_rng(1)
    a, b = toy_model(rng, 10), toy_model(rng, 10)
    merged = merge_state_dicts([a, b], counts=[1, 3])
    ref = reference_merge([a, b], [1, 1], [1, 3])
    np.testing.assert_allclose(np_of(merged["backbone.bn.running_var"]), ref["backbone.bn.running_var"], rtol=1e-6)
    assert int(merged["backbone.bn.num_batches_tracked"]) == 4


def test_zero_counts_fall_back_to_weights():
    rng = np.random.default_rng(2)
    a, b = toy_model(rng, 0), toy_model(rng, 0)
    merged = merge_state_dicts([a, b], weights=[1, 3])
    ref = reference_merge([a, b], [1, 3], [1, 1])  # equal counts: proportions are the weights
    np.testing.assert_allclose(np_of(merged["backbone.bn.running_mean"]), ref["backbone.bn.running_mean"], rtol=1e-6)
    np.testing.assert_allclose(np_of(merged["backbone.bn.running_var"]), ref["backbone.bn.running_var"], rtol=1e-6)


def test_mean_and_first_buffer_rules():
    rng = np.random.default_rng(3)
    a, b = toy_model(rng, 50), toy_model(rng, 150)
    mean = merge_state_dicts([a, b], buffers="mean")
    first = merge_state_dicts([a, b], buffers="first")
    for key in ("backbone.bn.running_mean", "backbone.bn.running_var"):
        np.testing.assert_allclose(np_of(mean[key]), 0.5 * np_of(a[key]) + 0.5 * np_of(b[key]), rtol=1e-6)
        assert torch.equal(first[key], a[key])
    assert int(mean["backbone.bn.num_batches_tracked"]) == 100
    assert int(first["backbone.bn.num_batches_tracked"]) == 50


def test_pooled_statistics_equal_moments_of_the_pooled_sample():
    """Ground truth: BN statistics of two Gaussian domains merge into the pooled sample's moments."""
    rng = np.random.default_rng(4)
    n1, n2 = 3000, 1000
    x1 = rng.normal(loc=[0.0, 2.0, -1.0], scale=[1.0, 0.5, 2.0], size=(n1, 3))
    x2 = rng.normal(loc=[3.0, -2.0, -1.0], scale=[2.0, 0.5, 0.1], size=(n2, 3))

    def stats(x, n):
        return {"bn.running_mean": torch.from_numpy(x.mean(0)), "bn.running_var": torch.from_numpy(x.var(0)),
                "bn.num_batches_tracked": torch.tensor(n), "bn.weight": torch.ones(3, dtype=torch.float64)}

    merged = merge_state_dicts([stats(x1, n1), stats(x2, n2)])
    pooled = np.concatenate([x1, x2])
    np.testing.assert_allclose(merged["bn.running_mean"].numpy(), pooled.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(merged["bn.running_var"].numpy(), pooled.var(0), rtol=1e-12, atol=1e-12)
    assert int(merged["bn.num_batches_tracked"]) == n1 + n2


def test_interpolation_end_points_are_the_models():
    rng = np.random.default_rng(5)
    a, b = toy_model(rng, 40), toy_model(rng, 90)
    for lam, ref in ((0.0, a), (1.0, b)):
        out = interpolate(a, b, lam)
        for key in ref:
            if key.endswith("num_batches_tracked"):
                continue
            assert torch.equal(out[key], ref[key] if not key.endswith("pos_index") else a[key]), (lam, key)
    mid = interpolate(a, b, 0.3, buffers="mean")
    np.testing.assert_allclose(np_of(mid["backbone.conv.weight"]),
                               0.7 * np_of(a["backbone.conv.weight"]) + 0.3 * np_of(b["backbone.conv.weight"]),
                               rtol=1e-6, atol=1e-7)


def test_backbone_only_merge_keeps_each_head():
    rng = np.random.default_rng(6)
    models = [toy_model(rng, 10 * (i + 1)) for i in range(3)]
    outs = merge_state_dicts_per_head(models, keep_heads="decode_head.")
    full = merge_state_dicts(models)
    for model, out in zip(models, outs):
        for key in model:
            if key.startswith("decode_head."):
                assert torch.equal(out[key], model[key])
            else:
                assert torch.equal(out[key], full[key])


def test_errors_name_the_key():
    rng = np.random.default_rng(7)
    a, b = toy_model(rng, 1), toy_model(rng, 1)
    b["backbone.conv.weight"] = torch.zeros(C + 1, 3, 3, 3)
    with pytest.raises(UserError, match="backbone.conv.weight.*shape"):
        merge_state_dicts([a, b])
    b = toy_model(rng, 1)
    b["backbone.bn.bias"][2] = float("nan")
    with pytest.raises(UserError, match="backbone.bn.bias.*NaN"):
        merge_state_dicts([a, b])
    b = toy_model(rng, 1)
    del b["decode_head.conv_seg.bias"]
    with pytest.raises(UserError, match="lacks 1 keys.*allow_missing=True"):  # the keyword, not the flag
        merge_state_dicts([a, b])
    merged = merge_state_dicts([a, b], allow_missing=True)
    assert torch.equal(merged["decode_head.conv_seg.bias"], a["decode_head.conv_seg.bias"])
    with pytest.raises(UserError, match="weights"):
        merge_state_dicts([a, a], weights=[1, -1])


# ---------------------------------------------------------------- properties (hypothesis)

floats = st.floats(min_value=-10, max_value=10, allow_nan=False, width=32)
positive = st.floats(min_value=0.0625, max_value=10, allow_nan=False, width=32)


@st.composite
def bn_models(draw, k_min=2, k_max=4):
    k = draw(st.integers(k_min, k_max))
    c = draw(st.integers(1, 4))
    models = []
    for _ in range(k):
        models.append({
            "bn.weight": torch.tensor(draw(st.lists(floats, min_size=c, max_size=c)), dtype=torch.float64),
            "bn.running_mean": torch.tensor(draw(st.lists(floats, min_size=c, max_size=c)), dtype=torch.float64),
            "bn.running_var": torch.tensor(draw(st.lists(positive, min_size=c, max_size=c)), dtype=torch.float64),
            "bn.num_batches_tracked": torch.tensor(draw(st.integers(1, 10_000))),
        })
    weights = draw(st.lists(positive, min_size=k, max_size=k))
    return models, weights


@settings(max_examples=40, deadline=None)
@given(bn_models(), st.integers(2, 4))
def test_merging_copies_of_one_model_returns_it(data, k):
    model = data[0][0]
    merged = merge_state_dicts([model] * k)
    for key in ("bn.weight", "bn.running_mean", "bn.running_var"):
        torch.testing.assert_close(merged[key], model[key], rtol=1e-12, atol=1e-12)
    assert int(merged["bn.num_batches_tracked"]) == k * int(model["bn.num_batches_tracked"])


@settings(max_examples=40, deadline=None)
@given(bn_models(), st.randoms(use_true_random=False))
def test_order_of_inputs_does_not_matter(data, rnd):
    models, weights = data
    order = list(range(len(models)))
    rnd.shuffle(order)
    a = merge_state_dicts(models, weights=weights)
    b = merge_state_dicts([models[i] for i in order], weights=[weights[i] for i in order])
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-10, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(bn_models())
def test_equal_means_reduce_to_weighted_mean_of_variances(data):
    models, weights = data
    for m in models:
        m["bn.running_mean"] = models[0]["bn.running_mean"].clone()
    merged = merge_state_dicts(models, weights=weights)
    n = np.array([float(m["bn.num_batches_tracked"]) for m in models])
    p = np.asarray(weights) * n / np.sum(np.asarray(weights) * n)
    expected = sum(pk * m["bn.running_var"].numpy() for pk, m in zip(p, models))
    np.testing.assert_allclose(merged["bn.running_var"].numpy(), expected, rtol=1e-9)


@settings(max_examples=40, deadline=None)
@given(bn_models())
def test_merged_variance_is_at_least_the_mean_variance(data):
    models, weights = data
    merged = merge_state_dicts(models, weights=weights)
    n = np.array([float(m["bn.num_batches_tracked"]) for m in models])
    p = np.asarray(weights) * n / np.sum(np.asarray(weights) * n)
    mean_var = sum(pk * m["bn.running_var"].numpy() for pk, m in zip(p, models))
    assert np.all(merged["bn.running_var"].numpy() >= mean_var * (1 - 1e-12))

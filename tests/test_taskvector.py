"""Task-vector rules (task arithmetic, TIES, DARE) against numpy and hand-made answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from domainmerge.merging.taskvector import (
    dare,
    dare_drop,
    disjoint_mean,
    elect_sign,
    key_generator,
    task_arithmetic,
    ties,
    trim,
)


def _rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def test_task_arithmetic_matches_numpy() -> None:
    base, a, b, c = (_rand(i, 5, 7) for i in range(4))
    w, lam = [0.5, 0.3, 0.2], 0.7
    nb, na, nbb, nc = (t.numpy().astype(np.float64) for t in (base, a, b, c))
    expected = nb + lam * (w[0] * (na - nb) + w[1] * (nbb - nb) + w[2] * (nc - nb))
    got = task_arithmetic([a, b, c], base, w, lam)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_task_arithmetic_lambda_one_single_model_is_that_model() -> None:
    base, a = _rand(0, 4, 4), _rand(1, 4, 4)
    torch.testing.assert_close(task_arithmetic([a], base, [1.0], 1.0), a)


def test_task_arithmetic_lambda_one_is_weighted_average() -> None:
    base, a, b = _rand(0, 10), _rand(1, 10), _rand(2, 10)
    expected = 0.25 * a.numpy() + 0.75 * b.numpy()
    np.testing.assert_allclose(task_arithmetic([a, b], base, [0.25, 0.75]).numpy(), expected, atol=1e-6)


def test_trim_keeps_the_largest_magnitudes() -> None:
    tau = _rand(3, 6, 5)
    out = trim(tau, 0.3).numpy().ravel()
    flat = tau.numpy().ravel()
    k = int(0.3 * flat.size)
    kept = np.argsort(-np.abs(flat))[:k]
    expected = np.zeros_like(flat)
    expected[kept] = flat[kept]
    np.testing.assert_array_equal(out, expected)
    assert trim(tau, 0.0).abs().sum() == 0
    torch.testing.assert_close(trim(tau, 1.0), tau)


def test_ties_hand_made_vectors() -> None:
    # base 0; density 0.5 keeps two of four entries per task vector:
    #   tau1 [3, -2, 0.5, 1] -> [3, -2, 0, 0];  tau2 [-1, -4, 0.2, 2] -> [0, -4, 0, 2]
    # mass (weights 1/2): [1.5, -3, 0, 1] -> signs [+, -, 0, +]
    # disjoint mean: [3 (tau1 only), (-2 - 4)/2, 0 (no sign), 2 (tau2 only)]
    base = torch.zeros(4)
    t1 = torch.tensor([3.0, -2.0, 0.5, 1.0])
    t2 = torch.tensor([-1.0, -4.0, 0.2, 2.0])
    out = ties([t1, t2], base, [0.5, 0.5], lam=1.0, density=0.5)
    torch.testing.assert_close(out, torch.tensor([3.0, -3.0, 0.0, 2.0]))
    # lambda scales the merged task vector around the base
    base2 = torch.full((4,), 10.0)
    out2 = ties([t1 + 10, t2 + 10], base2, [0.5, 0.5], lam=0.5, density=0.5)
    torch.testing.assert_close(out2, torch.tensor([11.5, 8.5, 10.0, 11.0]))


def test_sign_election_by_total_mass_not_by_count() -> None:
    # two small positive entries lose against one large negative one
    taus = [torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([-5.0])]
    w = [1 / 3] * 3
    sign = elect_sign(taus, w)
    assert sign.item() == -1
    assert disjoint_mean(taus, w, sign).item() == pytest.approx(-5.0)


def test_ties_density_one_agreeing_signs_equals_task_arithmetic() -> None:
    rng = np.random.default_rng(5)
    sign = np.where(rng.random(50) < 0.5, -1.0, 1.0)
    base = _rand(6, 50)
    models = [base + torch.from_numpy((sign * (0.1 + rng.random(50))).astype(np.float32)) for _ in range(3)]
    w = [0.2, 0.5, 0.3]
    torch.testing.assert_close(ties(models, base, w, lam=0.8, density=1.0),
                               task_arithmetic(models, base, w, lam=0.8))


def test_dare_expectation_is_task_arithmetic() -> None:
    base, a, b = _rand(0, 200), _rand(1, 200), _rand(2, 200)
    w = [0.5, 0.5]
    runs = torch.stack([dare([a, b], base, w, drop=0.5, generators=[key_generator(s, "k", 0),
                                                                     key_generator(s, "k", 1)])
                        for s in range(4000)])
    expected = task_arithmetic([a, b], base, w)
    # each entry's mean over 4000 draws: sd of one draw <= |tau| * sqrt(p/(1-p)) / 2 per model
    tau_scale = float(((a - base).abs().max() + (b - base).abs().max()) / 2)
    assert float((runs.mean(0) - expected).abs().max()) < 5 * tau_scale / np.sqrt(4000)


def test_dare_drop_rate_and_rescale() -> None:
    tau = torch.ones(100_000)
    out = dare_drop(tau, 0.9, torch.Generator().manual_seed(0))
    kept = out != 0
    assert abs(float(kept.float().mean()) - 0.1) < 0.005
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 10.0))
    torch.testing.assert_close(dare_drop(tau, 0.0, torch.Generator()), tau)
    with pytest.raises(ValueError):
        dare_drop(tau, 1.0, torch.Generator())


def test_dare_is_reproducible_and_keyed() -> None:
    base, a, b = _rand(0, 64), _rand(1, 64), _rand(2, 64)

    def run(seed: int, key: str) -> torch.Tensor:
        return dare([a, b], base, [0.5, 0.5], drop=0.7, generators=[key_generator(seed, key, i) for i in range(2)])

    torch.testing.assert_close(run(3, "x"), run(3, "x"))
    assert not torch.equal(run(3, "x"), run(3, "y"))
    assert not torch.equal(run(3, "x"), run(4, "x"))


def test_dare_ties_zero_drop_equals_ties() -> None:
    base, a, b = _rand(0, 30), _rand(1, 30), _rand(2, 30)
    torch.testing.assert_close(dare([a, b], base, [0.5, 0.5], drop=0.0, then="ties", density=0.4),
                               ties([a, b], base, [0.5, 0.5], density=0.4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_keep_their_dtype(dtype: torch.dtype) -> None:
    base, a, b = (t.to(dtype) for t in (_rand(0, 16), _rand(1, 16), _rand(2, 16)))
    for out in (task_arithmetic([a, b], base, [0.5, 0.5]), ties([a, b], base, [0.5, 0.5], density=0.5)):
        assert out.dtype == dtype


# -- through the merge engine ----------------------------------------------------------------

def _model(seed: int, n: int = 100) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"backbone.conv.weight": torch.randn(4, 3, generator=g),
            "backbone.bn.weight": torch.rand(4, generator=g) + 0.5,
            "backbone.bn.running_mean": torch.randn(4, generator=g),
            "backbone.bn.running_var": torch.rand(4, generator=g) + 0.1,
            "backbone.bn.num_batches_tracked": torch.tensor(n),
            "decode_head.conv_seg.weight": torch.randn(19, 4, generator=g)}


def test_engine_ties_uses_base_and_keeps_gaussian_buffers() -> None:
    from domainmerge.merging import DictSource, MergeSpec, Ties, iter_merged, merge_state_dicts, plan_merge

    a, b = _model(1, n=100), _model(2, n=300)
    base = {k: v for k, v in _model(0).items() if not k.startswith("decode_head.")}   # head not in base
    sources = [DictSource(a), DictSource(b)]
    plan = plan_merge(sources, MergeSpec(method=Ties(density=0.5, lam=0.9)), base=DictSource(base, "base"))
    out = {k: t[0] for k, t in iter_merged(sources, plan)}
    k = "backbone.conv.weight"
    expected = ties([a[k], b[k]], base[k], [0.5, 0.5], lam=0.9, density=0.5)
    torch.testing.assert_close(out[k], expected)
    # the head is not in the base: plain average, and counted
    h = "decode_head.conv_seg.weight"
    torch.testing.assert_close(out[h], (a[h] + b[h]) / 2)
    assert plan.stats["linear, not in base"] == 1
    # BatchNorm statistics: the paper's pooled Gaussian with n = 100 and 300, by hand
    p = np.array([0.25, 0.75])
    mus = np.stack([a["backbone.bn.running_mean"].numpy(), b["backbone.bn.running_mean"].numpy()])
    vs = np.stack([a["backbone.bn.running_var"].numpy(), b["backbone.bn.running_var"].numpy()])
    mu = (p[:, None] * mus).sum(0)
    var = (p[:, None] * (vs + (mus - mu) ** 2)).sum(0)
    np.testing.assert_allclose(out["backbone.bn.running_mean"].numpy(), mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["backbone.bn.running_var"].numpy(), var, rtol=1e-5, atol=1e-6)
    assert int(out["backbone.bn.num_batches_tracked"]) == 400
    # the same through merge_state_dicts
    out2 = merge_state_dicts([a, b], base=base, method="ties", density=0.5, lam=0.9)
    for key in out:
        torch.testing.assert_close(out2[key], out[key])


def test_engine_task_arithmetic_lambda_one_equals_linear() -> None:
    from domainmerge.merging import merge_state_dicts

    a, b, base = _model(1), _model(2), _model(0)
    lin = merge_state_dicts([a, b], weights=[1, 3])
    ta = merge_state_dicts([a, b], weights=[1, 3], base=base, method="task_arithmetic", lam=1.0)
    for k in lin:
        torch.testing.assert_close(ta[k], lin[k])


def test_engine_dare_is_seeded_and_order_free() -> None:
    from domainmerge.merging import merge_state_dicts

    a, b, base = _model(1), _model(2), _model(0)
    x = merge_state_dicts([a, b], base=base, method="dare_linear", drop=0.5, seed=7)
    y = merge_state_dicts([a, b], base=base, method="dare_linear", drop=0.5, seed=7)
    z = merge_state_dicts([a, b], base=base, method="dare_linear", drop=0.5, seed=8)
    k = "backbone.conv.weight"
    torch.testing.assert_close(x[k], y[k])
    assert not torch.equal(x[k], z[k])
    # the mask of a key does not depend on which other keys are merged
    only = merge_state_dicts([{k: a[k]}, {k: b[k]}], base={k: base[k]}, method="dare_linear", drop=0.5, seed=7)
    torch.testing.assert_close(only[k], x[k])


@pytest.mark.parametrize(("options", "base", "message"), [
    ({"method": "ties"}, False, "needs the base"),
    ({"method": "linear"}, True, "only used by the task-vector methods"),
    ({"method": "magic"}, True, "unknown merge method"),
    ({"method": "ties", "density": 0.0}, True, "^density must"),
    ({"method": "dare_ties", "drop": 1.0}, True, "^drop must"),
    ({"method": "task_arithmetic", "lam": float("nan")}, True, "^lam must"),
])
def test_engine_method_errors(options: dict, base: bool, message: str) -> None:
    from domainmerge.errors import UserError
    from domainmerge.merging import merge_state_dicts

    a, b = _model(1), _model(2)
    with pytest.raises(UserError, match=message):
        merge_state_dicts([a, b], base=_model(0) if base else None, **options)


def test_engine_base_of_another_architecture_is_refused() -> None:
    from domainmerge.errors import UserError
    from domainmerge.merging import merge_state_dicts

    base = _model(0)
    base["backbone.conv.weight"] = torch.zeros(8, 3)
    with pytest.raises(UserError, match="backbone.conv.weight"):
        merge_state_dicts([_model(1), _model(2)], base=base, method="ties")
    with pytest.raises(UserError, match="shares no parameter"):
        merge_state_dicts([_model(1), _model(2)], base={"other.w": torch.zeros(1)}, method="ties")


def test_engine_base_matched_through_training_wrappers() -> None:
    from domainmerge.merging import merge_state_dicts

    a, b, base = _model(1), _model(2), _model(0)
    wrapped = [{f"model.{k}": v for k, v in m.items()} for m in (a, b)]
    out = merge_state_dicts(wrapped, base=base, method="task_arithmetic", lam=0.5)
    k = "backbone.conv.weight"
    torch.testing.assert_close(out[f"model.{k}"], base[k] + 0.5 * ((a[k] - base[k]) + (b[k] - base[k])) / 2)


# -- the command ------------------------------------------------------------------------------

def test_merge_command_ties_from_a_base(tmp_path, capsys) -> None:
    from domainmerge.checkpoint import load_state_dict
    from domainmerge.cli import main

    # hand-made TIES case (see test_ties_hand_made_vectors) on a backbone tensor, a head the
    # base lacks (averaged), and a BN layer (pooled Gaussian, counts 10 and 30)
    def ck(w, head, mean, count):
        return {"meta": {"iter": 1}, "state_dict": {
            "model.backbone.w": torch.tensor(w), "model.decode_head.w": torch.tensor(head),
            "model.backbone.bn.running_mean": torch.tensor(mean),
            "model.backbone.bn.running_var": torch.tensor([1.0]),
            "model.backbone.bn.num_batches_tracked": torch.tensor(count)}}

    torch.save(ck([3.0, -2.0, 0.5, 1.0], [1.0], [0.0], 10), tmp_path / "a.pth")
    torch.save(ck([-1.0, -4.0, 0.2, 2.0], [3.0], [4.0], 30), tmp_path / "b.pth")
    torch.save({"backbone.w": torch.zeros(4)}, tmp_path / "base.pth")
    rc = main(["merge", str(tmp_path / "a.pth"), str(tmp_path / "b.pth"), "-o", str(tmp_path / "m.pth"),
               "--method", "ties", "--base", str(tmp_path / "base.pth"), "--density", "0.5", "--quiet"])
    assert rc == 0
    out = load_state_dict(tmp_path / "m.pth")
    torch.testing.assert_close(out["model.backbone.w"], torch.tensor([3.0, -3.0, 0.0, 2.0]))
    torch.testing.assert_close(out["model.decode_head.w"], torch.tensor([2.0]))
    torch.testing.assert_close(out["model.backbone.bn.running_mean"], torch.tensor([3.0]))   # 0.25*0 + 0.75*4
    torch.testing.assert_close(out["model.backbone.bn.running_var"], torch.tensor([4.0]))    # 1 + .25*9 + .75*1
    record = torch.load(tmp_path / "m.pth", weights_only=True)["meta"]["domainmerge"]
    assert record["method"] == "ties"
    assert record["recipe"]["base"] == "base.pth" and record["recipe"]["density"] == 0.5


def test_merge_command_method_without_base_is_one_line_error(tmp_path, capsys) -> None:
    from domainmerge.cli import main

    for name, seed in (("a", 1), ("b", 2)):
        torch.save(_model(seed), tmp_path / f"{name}.pth")
    rc = main(["merge", str(tmp_path / "a.pth"), str(tmp_path / "b.pth"), "-o", str(tmp_path / "m.pth"),
               "--method", "dare_ties"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--base" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m.pth").exists()


def test_trim_with_tied_magnitudes_keeps_exactly_k() -> None:
    tau = torch.tensor([1.0, -1.0, 1.0, 0.5, -2.0, 1.0])
    out = trim(tau, 0.5)                      # k = 3: the 2 and two of the four 1s
    assert int((out != 0).sum()) == 3 and out[4] == -2.0
    assert set(out[out != 0].abs().tolist()) == {1.0, 2.0}


def test_trim_keeps_at_least_one_entry_of_a_small_tensor() -> None:
    # density 0.2 of 4 entries: int(0.8) = 0, so without the floor the whole task vector went;
    # by hand, the floor keeps the one largest magnitude (-3), and 7 entries keep int(1.4) = 1.
    tau = torch.tensor([0.5, -3.0, 1.0, 2.0])
    torch.testing.assert_close(trim(tau, 0.2), torch.tensor([0.0, -3.0, 0.0, 0.0]))
    tau7 = torch.tensor([0.1, 0.2, -0.9, 0.3, 0.4, 0.5, 0.6])
    assert trim(tau7, 0.2).tolist() == [0.0, 0.0, pytest.approx(-0.9), 0.0, 0.0, 0.0, 0.0]
    assert trim(tau, 0.0).abs().sum() == 0                                   # density 0 still keeps nothing
    # TIES of two 1-entry tensors at density 0.2: each keeps its entry; signs +1 and -1, weighted
    # mass 0.5 * 4 - 0.5 * 2 = +1 elects +, the disjoint mean is 4, so base 1 + 4 = 5.
    out = ties([torch.tensor([5.0]), torch.tensor([-1.0])], torch.tensor([1.0]), [0.5, 0.5], density=0.2)
    torch.testing.assert_close(out, torch.tensor([5.0]))

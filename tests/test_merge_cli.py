"""`domainmerge merge` / `inspect` end to end: every container layout, formats, error paths."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from domainmerge.checkpoint import load_state_dict, strip_model_prefix
from domainmerge.cli import main


def net(seed: int, count: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "backbone.conv1.weight": torch.randn(4, 3, 3, 3, generator=g).to(dtype),
        "backbone.bn1.weight": torch.rand(4, generator=g).to(dtype),
        "backbone.bn1.bias": torch.randn(4, generator=g).to(dtype),
        "backbone.bn1.running_mean": torch.randn(4, generator=g).to(dtype),
        "backbone.bn1.running_var": (torch.rand(4, generator=g) + 0.5).to(dtype),
        "backbone.bn1.num_batches_tracked": torch.tensor(count),
        "decode_head.conv_seg.weight": torch.randn(19, 4, 1, 1, generator=g).to(dtype),
        "decode_head.conv_seg.bias": torch.randn(19, generator=g).to(dtype),
    }


def expected_merge(a, b, wa=0.5, wb=0.5):
    """Independent numpy computation of the paper's merge for two models."""
    out = {}
    na, nb = float(a["backbone.bn1.num_batches_tracked"]), float(b["backbone.bn1.num_batches_tracked"])
    pa, pb = wa * na / (wa * na + wb * nb), wb * nb / (wa * na + wb * nb)
    for k in a:
        x, y = a[k].double().numpy(), b[k].double().numpy()
        if k.endswith("running_mean"):
            out[k] = pa * x + pb * y
        elif k.endswith("running_var"):
            ma, mb = a[k.replace("var", "mean")].double().numpy(), b[k.replace("var", "mean")].double().numpy()
            mu = pa * ma + pb * mb
            out[k] = pa * (x + (ma - mu) ** 2) + pb * (y + (mb - mu) ** 2)
        elif k.endswith("num_batches_tracked"):
            out[k] = na + nb
        else:
            out[k] = wa * x + wb * y
    return out


def wrap(sd: dict, layout: str, prefix: str):
    sd = {prefix + k: v for k, v in sd.items()}
    if layout == "bare":
        return sd
    if layout == "mmseg":
        return {"meta": {"CLASSES": ["road", "sidewalk"], "iter": 40000}, "state_dict": sd,
                "optimizer": {"state": {}, "param_groups": [{"lr": 6e-5}]}}
    if layout == "lightning":
        return {"epoch": 3, "global_step": 100, "state_dict": sd}
    if layout == "model":
        return {"model": sd, "args": {"lr": 0.1}}
    raise AssertionError(layout)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("layout", ["bare", "mmseg", "lightning", "model"])
@pytest.mark.parametrize("prefix", ["", "model.", "module."])
def test_merge_pickle_layouts(tmp_path, layout, prefix):
    a, b = net(0, 100), net(1, 300)
    pa, pb, out = tmp_path / "a.pth", tmp_path / "b.pth", tmp_path / "merged.pth"
    torch.save(wrap(a, layout, prefix), pa)
    torch.save(wrap(b, layout, prefix), pb)
    assert main(["merge", str(pa), str(pb), "-o", str(out), "--quiet"]) == 0
    raw = torch.load(out, weights_only=True)
    if layout == "bare":
        sd = raw
    else:
        key = "model" if layout == "model" else "state_dict"
        sd = raw[key]
        assert "optimizer" not in raw  # dropped
        meta = raw["meta"]
        assert meta["domainmerge"]["inputs"] == ["a.pth", "b.pth"]
        assert meta["domainmerge"]["buffers"] == "gaussian"
        if layout == "mmseg":
            assert meta["iter"] == 40000 and meta["CLASSES"] == ["road", "sidewalk"]
        if layout == "lightning":
            assert raw["epoch"] == 3
        if layout == "model":
            assert raw["args"] == {"lr": 0.1}
    ref = expected_merge(a, b)
    assert set(sd) == {prefix + k for k in a}
    for k, v in ref.items():
        np.testing.assert_allclose(sd[prefix + k].double().numpy(), v, rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merge_safetensors_with_weights(tmp_path, dtype):
    a, b = net(2, 50, dtype), net(3, 150, dtype)
    save_file(a, tmp_path / "a.safetensors", metadata={"source": "site-a"})
    save_file(b, tmp_path / "b.safetensors")
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "-o", str(out),
                 "--weights", "1", "3", "--quiet"]) == 0
    sd = load_file(out)  # read back by the safetensors library itself
    ref = expected_merge(a, b, 0.25, 0.75)
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for k, v in ref.items():
        assert sd[k].dtype == a[k].dtype
        np.testing.assert_allclose(sd[k].double().numpy(), v, rtol=tol, atol=tol, err_msg=k)
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["source"] == "site-a"
    assert json.loads(meta["domainmerge"])["weights"] == [0.25, 0.75]


def test_three_models_and_cross_format(tmp_path):
    models = [net(i, 10 * (i + 1)) for i in range(3)]
    paths = []
    for i, m in enumerate(models):
        p = tmp_path / (f"m{i}.safetensors" if i % 2 else f"m{i}.pth")
        save_file(m, p) if i % 2 else torch.save(m, p)
        paths.append(str(p))
    out = tmp_path / "merged.safetensors"
    assert main(["merge", *paths, "-o", str(out), "--buffers", "mean", "--quiet"]) == 0
    sd = load_file(out)
    for k in models[0]:
        if k.endswith("num_batches_tracked"):
            assert int(sd[k]) == 20
            continue
        ref = sum(m[k].double() for m in models) / 3
        np.testing.assert_allclose(sd[k].double().numpy(), ref.numpy(), rtol=1e-6, atol=1e-7)


def test_keep_heads_writes_one_file_per_input(tmp_path):
    a, b = net(4, 100), net(5, 100)
    torch.save(wrap(a, "mmseg", "model."), tmp_path / "cs.pth")
    torch.save(wrap(b, "mmseg", "model."), tmp_path / "idd.pth")
    out = tmp_path / "merged.pth"
    assert main(["merge", str(tmp_path / "cs.pth"), str(tmp_path / "idd.pth"), "-o", str(out),
                 "--keep-heads", "decode_head.", "--names", "cs", "idd", "--quiet"]) == 0
    assert not out.exists()
    ref = expected_merge(a, b)
    for name, own in (("cs", a), ("idd", b)):
        sd = strip_model_prefix(load_state_dict(tmp_path / f"merged.{name}.pth"))
        for k in own:
            if k.startswith("decode_head."):
                assert torch.equal(sd[k], own[k])
            else:
                np.testing.assert_allclose(sd[k].double().numpy(), ref[k], rtol=1e-6, atol=1e-7)


def test_only_prefix_copies_the_rest(tmp_path):
    a, b = net(6, 1), net(7, 1)
    both_a = {**{"model." + k: v for k, v in a.items()}, **{"ema_model." + k: v for k, v in a.items()}}
    both_b = {**{"model." + k: v for k, v in b.items()}, **{"ema_model." + k: v for k, v in b.items()}}
    torch.save({"state_dict": both_a}, tmp_path / "a.pth")
    torch.save({"state_dict": both_b}, tmp_path / "b.pth")
    out = tmp_path / "m.pth"
    assert main(["merge", str(tmp_path / "a.pth"), str(tmp_path / "b.pth"), "-o", str(out),
                 "--only", "model.", "--quiet"]) == 0
    sd = torch.load(out, weights_only=True)["state_dict"]
    k = "backbone.conv1.weight"
    assert torch.equal(sd["ema_model." + k], a[k])
    np.testing.assert_allclose(sd["model." + k].numpy(), ((a[k] + b[k]) / 2).numpy(), rtol=1e-6, atol=1e-6)


class NotATensor:  # a pickled object that the safe loader must refuse
    pass


ERROR_CASES = {
    "missing input": (lambda d: [str(d / "nope.pth"), str(d / "b.pth")], "nope.pth: no such file"),
    "shape mismatch": (lambda d: [str(d / "a.pth"), str(d / "wide.pth")], "shape"),
    "non-finite": (lambda d: [str(d / "a.pth"), str(d / "nan.pth")], "NaN"),
    "unsafe pickle": (lambda d: [str(d / "a.pth"), str(d / "evil.pth")], "--trust-pickle"),
    "truncated safetensors": (lambda d: [str(d / "a.pth"), str(d / "cut.safetensors")], "truncated|damaged"),
    "wrong weights": (lambda d: [str(d / "a.pth"), str(d / "b.pth"), "--weights", "1"], "2 models"),
    "bad suffix": (lambda d: [str(d / "a.pth"), str(d / "b.txt")], "suffix"),
    "unknown head": (lambda d: [str(d / "a.pth"), str(d / "b.pth"), "--keep-heads", "head."], "no key"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_error_paths_exit_2_and_leave_nothing(tmp_path, capsys, case):
    torch.save(net(0, 1), tmp_path / "a.pth")
    torch.save(net(1, 1), tmp_path / "b.pth")
    wide = net(1, 1)
    wide["backbone.conv1.weight"] = torch.zeros(5, 3, 3, 3)
    torch.save(wide, tmp_path / "wide.pth")
    bad = net(1, 1)
    bad["decode_head.conv_seg.bias"][3] = float("inf")
    torch.save(bad, tmp_path / "nan.pth")
    torch.save({"state_dict": net(1, 1), "meta": NotATensor()}, tmp_path / "evil.pth")
    save_file(net(1, 1), tmp_path / "full.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "full.safetensors").read_bytes()[:-64])
    (tmp_path / "b.txt").write_text("not a checkpoint")
    before = {p.name: digest(p) for p in tmp_path.iterdir()}
    args_of, pattern = ERROR_CASES[case]
    out = tmp_path / "out.pth"
    status = main(["merge", *args_of(tmp_path), "-o", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    import re
    assert re.search(pattern, err), err
    assert not out.exists()
    assert {p.name: digest(p) for p in tmp_path.iterdir()} == before  # inputs unchanged, no temp files


def test_output_rules(tmp_path, capsys):
    torch.save(net(0, 1), tmp_path / "a.pth")
    torch.save(net(1, 1), tmp_path / "b.pth")
    a_digest = digest(tmp_path / "a.pth")
    assert main(["merge", str(tmp_path / "a.pth"), str(tmp_path / "b.pth"), "-o", str(tmp_path / "a.pth"),
                 "--force", "--quiet"]) == 2
    assert "is one of the inputs" in capsys.readouterr().err
    assert digest(tmp_path / "a.pth") == a_digest
    out = tmp_path / "m.pth"
    out.write_text("keep me")
    assert main(["merge", str(tmp_path / "a.pth"), str(tmp_path / "b.pth"), "-o", str(out), "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err and out.read_text() == "keep me"
    assert main(["merge", str(tmp_path / "a.pth"), str(tmp_path / "b.pth"), "-o", str(out), "--quiet",
                 "--force"]) == 0
    assert "backbone.conv1.weight" in torch.load(out, weights_only=True)


def test_trust_pickle_allows_full_unpickling(tmp_path):
    torch.save({"state_dict": net(0, 1), "meta": {"obj": NotATensor()}}, tmp_path / "a.pth")
    torch.save({"state_dict": net(1, 1)}, tmp_path / "b.pth")
    assert main(["merge", str(tmp_path / "a.pth"), str(tmp_path / "b.pth"), "-o", str(tmp_path / "m.pth"),
                 "--trust-pickle", "--quiet"]) == 0


def test_inspect_reports_modules_and_distance(tmp_path, capsys):
    a, b = net(0, 100), net(0, 100)
    b["backbone.conv1.weight"] = a["backbone.conv1.weight"] * 1.1  # relative L2 distance exactly 0.1
    torch.save(wrap(a, "mmseg", "model."), tmp_path / "a.pth")
    save_file({"model." + k: v for k, v in b.items()}, tmp_path / "b.safetensors")
    assert main(["inspect", str(tmp_path / "a.pth"), str(tmp_path / "b.safetensors"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    first = report["checkpoints"][0]
    assert first["prefixes"] == ["model."]
    assert first["modules"]["model.backbone"]["parameters"] == 4 * 27 + 4 + 4
    assert first["modules"]["model.decode_head"]["parameters"] == 19 * 4 + 19
    assert first["bn_layers"] == 1 and first["bn_counts"] == [100]
    cmp = report["comparison"]
    assert cmp["mergeable"] is True
    dist = cmp["distances"][str(tmp_path / "b.safetensors")]["model.backbone"]
    norm_all = float(torch.cat([a[k].flatten() for k in ("backbone.conv1.weight", "backbone.bn1.weight",
                                                         "backbone.bn1.bias")]).norm())
    expected = 0.1 * float(a["backbone.conv1.weight"].norm()) / norm_all
    assert dist["rel_l2"] == pytest.approx(expected, rel=1e-6)
    assert dist["bn_mean_abs_diff"] == 0


def test_merge_align_undoes_a_hidden_unit_permutation(tmp_path, capsys):
    """B is A with its backbone's hidden units shuffled: the same function, different weights.
    Plain averaging mixes unrelated units; --align must recover A exactly."""
    from domainmerge.alignment.matching import apply_permutation
    from domainmerge.alignment.spec import spec_from_state_dict
    from domainmerge.models import build_model

    torch.manual_seed(0)
    a = {"model." + k: v for k, v in build_model("tiny_daformer_r").state_dict().items()}
    spec = spec_from_state_dict(a)
    g = torch.Generator().manual_seed(1)
    perms = {p: torch.randperm(n, generator=g) for p, n in spec.sizes.items()}
    b = apply_permutation(a, spec, perms)
    conv = next(k for k in spec.perms_of_key() if k.endswith("conv1.weight"))
    assert not torch.equal(a[conv], b[conv])
    torch.save({"state_dict": a}, tmp_path / "a.pth")
    torch.save({"state_dict": b}, tmp_path / "b.pth")
    for flag, out in (([], "plain.pth"), (["--align"], "aligned.pth")):
        assert main(["merge", str(tmp_path / "a.pth"), str(tmp_path / "b.pth"), "-o", str(tmp_path / out),
                     *flag]) == 0
    assert "100.0% of units kept in place" not in capsys.readouterr().out  # a real permutation was found
    plain = torch.load(tmp_path / "plain.pth", weights_only=True)["state_dict"]
    aligned = torch.load(tmp_path / "aligned.pth", weights_only=True)["state_dict"]
    assert not torch.allclose(plain[conv], a[conv])
    for k, v in a.items():
        if k.endswith("num_batches_tracked"):
            assert int(aligned[k]) == 2 * int(v)
        else:
            torch.testing.assert_close(aligned[k], v, rtol=1e-6, atol=1e-6, msg=k)

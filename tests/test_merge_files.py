"""The library behind `merge` and friends: merge_files and its MergeReport, the one checkpoint
writer, typed errors without command-line words (and the CLI still naming the flag)."""

from __future__ import annotations

import doctest
import importlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from domainmerge.checkpoint import load_state_dict, open_checkpoint, save_checkpoint
from domainmerge.cli import main
from domainmerge.errors import CheckpointError, MergeError, Option, OutputExistsError, UserError
from domainmerge.merging.files import MergeReport, merge_files, merge_recipe_files
from domainmerge.merging.spec import Fisher, MergeSpec, Ties


def net(seed: int, count: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "backbone.conv1.weight": torch.randn(4, 3, 3, 3, generator=g),
        "backbone.bn1.weight": torch.rand(4, generator=g),
        "backbone.bn1.bias": torch.randn(4, generator=g),
        "backbone.bn1.running_mean": torch.randn(4, generator=g),
        "backbone.bn1.running_var": torch.rand(4, generator=g) + 0.5,
        "backbone.bn1.num_batches_tracked": torch.tensor(count),
        "decode_head.conv_seg.weight": torch.randn(19, 4, 1, 1, generator=g),
        "decode_head.conv_seg.bias": torch.randn(19, generator=g),
    }


def by_hand(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], wa: float, wb: float) -> dict[str, np.ndarray]:
    """The paper's merge of two models, in float64 numpy (README formula; shares weighted by w_k n_k)."""
    na, nb = float(a["backbone.bn1.num_batches_tracked"]), float(b["backbone.bn1.num_batches_tracked"])
    pa, pb = wa * na / (wa * na + wb * nb), wb * nb / (wa * na + wb * nb)
    ma, mb = a["backbone.bn1.running_mean"].double().numpy(), b["backbone.bn1.running_mean"].double().numpy()
    va, vb = a["backbone.bn1.running_var"].double().numpy(), b["backbone.bn1.running_var"].double().numpy()
    mean = pa * ma + pb * mb
    out = {k: (wa * a[k].double().numpy() + wb * b[k].double().numpy()) / (wa + wb) for k in a
           if a[k].is_floating_point()}
    out["backbone.bn1.running_mean"] = mean
    out["backbone.bn1.running_var"] = pa * (va + (ma - mean) ** 2) + pb * (vb + (mb - mean) ** 2)
    out["backbone.bn1.num_batches_tracked"] = np.array(na + nb)
    return out


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Two mmseg-container checkpoints with meta and an optimizer entry, 'model.'-wrapped."""
    a, b = net(1, 30), net(2, 10)
    for name, sd in (("a", a), ("b", b)):
        torch.save({"meta": {"iter": 7, "CLASSES": ["road"]}, "state_dict": {f"model.{k}": v for k, v in sd.items()},
                    "optimizer": {"lr": torch.tensor(1.0)}}, tmp_path / f"{name}.pth")
    return tmp_path / "a.pth", tmp_path / "b.pth", a, b


def test_merge_files_equals_an_independent_merge_and_keeps_the_container(pair, tmp_path: Path) -> None:
    a_path, b_path, a, b = pair
    report = merge_files([a_path, b_path], tmp_path / "m.pth", MergeSpec(weights=[3, 1]))
    expected = by_hand(a, b, 0.75, 0.25)
    merged = load_state_dict(tmp_path / "m.pth")
    assert set(merged) == {f"model.{k}" for k in a}
    for k, value in expected.items():
        np.testing.assert_allclose(merged[f"model.{k}"].double().numpy(), value, rtol=1e-6, atol=1e-7, err_msg=k)
    saved = torch.load(tmp_path / "m.pth", weights_only=True)
    assert saved["meta"]["iter"] == 7 and saved["meta"]["CLASSES"] == ["road"]   # container and meta kept
    assert "optimizer" not in saved                                              # optimizer dropped
    record = saved["meta"]["domainmerge"]
    assert record["inputs"] == ["a.pth", "b.pth"] and record["weights"] == [0.75, 0.25]
    assert record["method"] == "linear" and record["buffers"] == "gaussian"
    # the report says what the files hold: 5 parameters, one BatchNorm layer, one counter
    assert isinstance(report, MergeReport)
    assert report.outputs == [tmp_path / "m.pth"] and report.inputs == [a_path, b_path]
    assert report.weights == [0.75, 0.25] and report.record == record
    assert report.tensors == {"parameter": 5, "bn_mean": 1, "bn_var": 1, "counter": 1}
    assert report.bn_layers == 1 and report.dtypes == ["float32"] and report.input_dtypes == ["float32"]
    assert not report.dtype_given and not report.uses_target_data and report.seconds > 0


def test_merge_files_prefix_dtype_and_safetensors_record(pair, tmp_path: Path) -> None:
    a_path, b_path, a, b = pair
    out = tmp_path / "m.safetensors"
    report = merge_files([a_path, b_path], out, prefix="auto", dtype="float16")
    expected = by_hand(a, b, 0.5, 0.5)
    merged = load_state_dict(out)
    assert set(merged) == set(a)                                   # written without the wrapper
    assert merged["backbone.conv1.weight"].dtype == torch.float16 and report.dtype_given
    np.testing.assert_allclose(merged["backbone.bn1.running_var"].double().numpy(),
                               expected["backbone.bn1.running_var"], rtol=1e-3)
    with safe_open(str(out), "pt") as fh:
        record = json.loads(fh.metadata()["domainmerge"])
    assert record["prefix"] == "auto" and record["dtype"] == "float16" and record == report.record


def test_the_merge_writes_through_the_same_writer_as_save_checkpoint(pair, tmp_path: Path) -> None:
    a_path, b_path, _, _ = pair
    for suffix in (".safetensors", ".pth"):
        report = merge_files([a_path, b_path], tmp_path / f"m{suffix}")
        with open_checkpoint(a_path) as template:
            again = save_checkpoint(tmp_path / f"again{suffix}", load_state_dict(tmp_path / f"m{suffix}"),
                                    template=template, record=report.record)
        if suffix == ".safetensors":   # byte for byte: same header, metadata and data
            assert again.read_bytes() == (tmp_path / f"m{suffix}").read_bytes()
        else:
            x, y = (torch.load(p, weights_only=True) for p in (again, tmp_path / f"m{suffix}"))
            assert x["meta"] == y["meta"] and x.keys() == y.keys()
            assert all(torch.equal(x["state_dict"][k], y["state_dict"][k]) for k in y["state_dict"])


def test_keep_heads_writes_one_file_per_model_with_its_own_head(pair, tmp_path: Path) -> None:
    a_path, b_path, a, b = pair
    report = merge_files([a_path, b_path], tmp_path / "m.pth",
                         MergeSpec(keep_heads="decode_head.", names=["cs", "idd"]))
    assert report.outputs == [tmp_path / "m.cs.pth", tmp_path / "m.idd.pth"]
    expected = by_hand(a, b, 0.5, 0.5)
    for out, own in zip(report.outputs, (a, b)):
        sd = load_state_dict(out)
        assert torch.equal(sd["model.decode_head.conv_seg.weight"], own["decode_head.conv_seg.weight"])
        np.testing.assert_allclose(sd["model.backbone.conv1.weight"].double().numpy(),
                                   expected["backbone.conv1.weight"], rtol=1e-6, atol=1e-6)
    with pytest.raises(MergeError, match="names"):
        merge_files([a_path, b_path], tmp_path / "n.pth", MergeSpec(names=["cs", "idd"]))   # names without keep_heads


def test_merge_recipe_files_records_what_merge_files_records(pair, tmp_path: Path) -> None:
    a_path, b_path, _, _ = pair
    (tmp_path / "r.yaml").write_text("models: [a.pth, {path: b.pth, weight: 3}]\nbuffers: mean\n")
    from_recipe = merge_recipe_files(tmp_path / "r.yaml", tmp_path / "r.pth")
    direct = merge_files([a_path, b_path], tmp_path / "d.pth", MergeSpec(weights=[1, 3], buffers="mean"))
    assert from_recipe.record == direct.record and from_recipe.weights == [0.25, 0.75]
    x, y = load_state_dict(tmp_path / "r.pth"), load_state_dict(tmp_path / "d.pth")
    assert all(torch.equal(x[k], y[k]) for k in y)


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_outputs_are_atomic_and_checked_before_work(pair, tmp_path: Path) -> None:
    a_path, b_path, _, b = pair
    before = _listing(tmp_path)
    # a damaged input found halfway through the tensors: no output, no temporary file
    broken = {f"model.{k}": v.clone() for k, v in b.items()}
    broken["model.decode_head.conv_seg.bias"][3] = float("nan")
    torch.save({"state_dict": broken}, tmp_path / "nan.pth")
    before["nan.pth"] = (tmp_path / "nan.pth").read_bytes()
    with pytest.raises(MergeError, match="nan.pth: tensor 'model.decode_head.conv_seg.bias' holds NaN") as info:
        merge_files([a_path, tmp_path / "nan.pth"], tmp_path / "m.safetensors")
    assert info.value.key == "model.decode_head.conv_seg.bias" and info.value.input.endswith("nan.pth")
    assert _listing(tmp_path) == before
    # an existing output is kept unless force; the inputs are never replaced
    (tmp_path / "m.pth").write_text("keep me")
    with pytest.raises(OutputExistsError) as exists:
        merge_files([a_path, b_path], tmp_path / "m.pth")
    assert (tmp_path / "m.pth").read_text() == "keep me" and exists.value.path == tmp_path / "m.pth"
    with pytest.raises(UserError, match="one of the inputs"):
        merge_files([a_path, b_path], a_path, force=True)
    merge_files([a_path, b_path], tmp_path / "m.pth", force=True)
    assert "meta" in torch.load(tmp_path / "m.pth", weights_only=True)
    assert (tmp_path / "a.pth").read_bytes() == before["a.pth"]


# ---------------------------------------------------------------- errors: no command-line words


class Evil:
    """An object the safe loader refuses."""


def _library_errors(pair: tuple, tmp_path: Path) -> list[tuple[UserError, str]]:
    """(error raised by a library call, the flag the command line must name)."""
    from domainmerge.evaluation.bootstrap import check_settings
    from domainmerge.evaluation.protocols import resolve
    from domainmerge.merging import merge_state_dicts

    a_path, b_path, a, b = pair
    torch.save({"state_dict": {**{f"model.{k}": v for k, v in a.items()}, "model.extra.w": torch.ones(1)}},
               tmp_path / "extra.pth")

    torch.save({"state_dict": a, "x": Evil()}, tmp_path / "evil.pth")
    calls = [
        (lambda: merge_files([a_path, tmp_path / "extra.pth"], tmp_path / "o.pth"), "--allow-missing"),
        (lambda: merge_files([a_path, b_path], tmp_path / "o.pth", MergeSpec(weights=[1, -1])), "--weights"),
        (lambda: merge_files([a_path, a_path], tmp_path / "o.pth"), "--weights"),
        (lambda: merge_files([a_path, b_path], tmp_path / "o.pth", MergeSpec(method=Ties())), "--base"),
        (lambda: merge_files([a_path, b_path], tmp_path / "o.pth", MergeSpec(method=Ties(lam=float("nan"))),
                             base=a_path),
         "--lambda"),
        (lambda: merge_files([a_path, b_path], tmp_path / "o.pth", MergeSpec(keep_heads="nothing.")),
         "--keep-heads nothing."),
        (lambda: merge_files([a_path, b_path], tmp_path / "o.pth",
                             MergeSpec(method=Fisher(), keep_heads="decode_head.")),
         "--method fisher"),
        (lambda: merge_files([a_path, b_path], tmp_path / "o.pth", MergeSpec(method=Fisher())), "--domain"),
        (lambda: merge_files([a_path, tmp_path / "evil.pth"], tmp_path / "o.pth"), "--trust-pickle"),
        (lambda: merge_files([a_path, b_path], tmp_path / "extra.pth"), "--force"),
        (lambda: merge_state_dicts([a, b], dtype=torch.int64), "--dtype int64"),
        (lambda: check_settings(0, 0.95), "--resamples 0"),
        (lambda: resolve("hrda", "cityscapes", "mtda", mode="slide"), "--protocol mtda"),
    ]
    out = []
    for call, flag in calls:
        with pytest.raises(UserError) as info:
            call()
        out.append((info.value, flag))
    return out


def test_library_errors_carry_no_command_line_words(pair, tmp_path: Path) -> None:
    from domainmerge.commands.merge import FLAGS as FLAGS_OF_MERGE

    for exc, flag in _library_errors(pair, tmp_path):
        text = str(exc)
        assert "--" not in text, text
        assert len(text.splitlines()) == 1
        # the command line renders the same error with the flag that fixes it
        assert flag in exc.for_command(FLAGS_OF_MERGE), (text, exc.for_command(FLAGS_OF_MERGE))
    # a notebook reads the keyword to pass
    exc = _library_errors(pair, tmp_path)[0][0]
    assert isinstance(exc, MergeError) and "allow_missing=True" in str(exc)


def test_option_rendering() -> None:
    err = UserError("use ", Option("amp", "bf16"), ", ", Option("trust_pickle", switch=True), ", ",
                    Option("strict", switch=False), " or ", Option("lam"))
    assert str(err) == "use amp='bf16', trust_pickle=True, strict=False or lam"
    assert err.for_command() == "use --amp bf16, --trust-pickle, --no-strict or --lam"
    assert err.for_command({"lam": "--lambda"}).endswith("or --lambda")
    assert [o.name for o in err.options] == ["amp", "trust_pickle", "strict", "lam"]


def test_typed_errors_survive_pickling_and_prefixing(tmp_path: Path) -> None:
    err = CheckpointError(tmp_path / "x.pth", "holds Python objects; pass ", Option("trust_pickle", switch=True))
    again = pickle.loads(pickle.dumps(err))        # how a DataLoader worker's error travels
    assert type(again) is CheckpointError and again.path == tmp_path / "x.pth"
    assert str(again) == str(err) and again.for_command() == err.for_command()
    assert str(err) == f"{tmp_path / 'x.pth'}: holds Python objects; pass trust_pickle=True"
    prefixed = err.prefixed("model a: ")
    assert type(prefixed) is CheckpointError and prefixed.for_command().startswith("model a: ")
    assert prefixed.for_command().endswith("--trust-pickle")
    merge = MergeError("bad", key="k", input="a.pth")
    back = pickle.loads(pickle.dumps(merge))
    assert (back.key, back.input, str(back)) == ("k", "a.pth", "bad")


@pytest.mark.parametrize(("argv", "flag"), [
    (lambda d: ["merge", str(d / "a.pth"), str(d / "extra.pth"), "-o", str(d / "o.pth")], "--allow-missing"),
    (lambda d: ["merge", str(d / "a.pth"), str(d / "b.pth"), "-o", str(d / "o.pth"), "--method", "ties",
                "--base", str(d / "a.pth"), "--lambda", "nan"], "--lambda must be a finite number"),
    (lambda d: ["merge", str(d / "a.pth"), str(d / "a.pth"), "-o", str(d / "o.pth")], "use --weights"),
    (lambda d: ["merge", str(d / "a.pth"), str(d / "b.pth"), "-o", str(d / "extra.pth")], "pass --force"),
    (lambda d: ["merge", str(d / "a.pth"), str(d / "b.pth"), "-o", str(d / "o.pth"), "--method", "fisher"],
     "give them with --domain"),
    (lambda d: ["score", "--pred", str(d), "--gt", str(d), "--gt-suffix", ".none"], "set --gt-suffix"),
])
def test_the_command_line_names_the_flag(pair, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv,
                                         flag: str) -> None:
    _, _, a, _ = pair
    torch.save({"state_dict": {**{f"model.{k}": v for k, v in a.items()}, "model.extra.w": torch.ones(1)}},
               tmp_path / "extra.pth")
    assert main(argv(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err, err
    assert "=True" not in err


@pytest.mark.parametrize("name", ["domainmerge.merging.files", "domainmerge.evaluation.folders"])
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_inspect_gives_the_reason_with_the_flag(pair, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from domainmerge.merging.inspection import inspect_files

    a_path, _, a, _ = pair
    torch.save({"state_dict": {**{f"model.{k}": v for k, v in a.items()}, "model.extra.w": torch.ones(1)}},
               tmp_path / "extra.pth")
    found = inspect_files([a_path, tmp_path / "extra.pth"])
    assert found.comparison is not None and not found.comparison["mergeable"]
    assert "allow_missing=True" in found.comparison["reason"] and isinstance(found.merge_error, MergeError)
    as_json = json.loads(json.dumps(found.to_dict()))            # JSON-ready: no error object left
    assert not as_json["comparison"]["mergeable"] and "allow_missing=True" in as_json["comparison"]["reason"]
    assert len(as_json["checkpoints"]) == 2 and "error" not in as_json["comparison"]
    assert main(["inspect", str(a_path), str(tmp_path / "extra.pth")]) == 0
    assert "no: " in (out := capsys.readouterr().out) and "pass --allow-missing" in out
    assert main(["inspect", str(a_path), str(tmp_path / "extra.pth"), "--json"]) == 0
    assert "pass --allow-missing" in json.loads(capsys.readouterr().out)["comparison"]["reason"]


class _Failing(torch.utils.data.Dataset):
    """Item 1 raises a UserError naming an option (as a reader does)."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> int:
        if i == 1:
            raise UserError("f.png: unreadable; skip such files with ", Option("strict", switch=False))
        return i


@pytest.mark.parametrize("workers", [0, 1])
def test_worker_errors_name_the_flag_while_a_command_runs(workers: int) -> None:
    from domainmerge.errors import command_messages, loader_errors

    def first_error() -> str:
        loader = torch.utils.data.DataLoader(_Failing(), batch_size=None, num_workers=workers)
        with pytest.raises(UserError) as info:
            list(loader_errors(loader))
        return str(info.value)

    assert first_error() == "f.png: unreadable; skip such files with strict=False"
    with command_messages({}):
        assert first_error() == "f.png: unreadable; skip such files with --no-strict"
    assert first_error().endswith("strict=False")       # only while the command runs

"""Every failure a user can cause: one line, exit status 2, no traceback, nothing left behind,
inputs unchanged (issue 10). Plus the library guarantees behind it (file modes, exclusive
creation, SIGTERM clean-up, worker errors) and the three library bugs."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import stat
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from domainmerge.checkpoint import open_checkpoint, save_checkpoint
from domainmerge.cli import main
from domainmerge.errors import Terminated, UserError, loader_errors, worker_message
from domainmerge.fsutil import atomic_path, handle_termination, rename_noreplace
from domainmerge.merging import merge_state_dicts
from domainmerge.models import build_model

H, W = 32, 64
FAST = ["--device", "cpu", "--workers", "0", "--quiet"]
# A folder no process can create files in, root included (sysfs refuses new files).
UNWRITABLE = Path("/sys")


def net(seed: int, count: int = 10, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "backbone.conv1.weight": torch.randn(4, 3, 3, 3, generator=g).to(dtype),
        "backbone.bn1.weight": torch.rand(4, generator=g).to(dtype),
        "backbone.bn1.bias": torch.randn(4, generator=g).to(dtype),
        "backbone.bn1.running_mean": torch.randn(4, generator=g).to(dtype),
        "backbone.bn1.running_var": (torch.rand(4, generator=g) + 0.5).to(dtype),
        "backbone.bn1.num_batches_tracked": torch.tensor(count),
        "decode_head.conv_seg.weight": torch.randn(19, 4, 1, 1, generator=g).to(dtype),
    }


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` (hidden temporary files included)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def expect_user_error(argv: list[str], pattern: str, capsys: pytest.CaptureFixture[str], folder: Path) -> str:
    """Run the CLI; assert exit 2, one stderr line matching ``pattern``, no traceback, and that
    ``folder`` (inputs and would-be outputs) is exactly as before: nothing added, nothing changed."""
    before = snapshot(folder)
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err
    assert snapshot(folder) == before
    return err


def safetensors_bytes(header: object, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


# ---------------------------------------------------------------- merge: damaged and mismatched inputs

def _damaged_files(d: Path) -> None:
    torch.save(net(0), d / "a.pth")
    torch.save(net(1), d / "b.pth")
    (d / "random.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    good = (d / "b.pth").read_bytes()
    (d / "truncated.pth").write_bytes(good[: len(good) // 2])
    (d / "empty.pth").write_bytes(b"")
    torch.save(net(1), d / "legacy.pth", _use_new_zipfile_serialization=False)
    (d / "legacy_cut.pth").write_bytes((d / "legacy.pth").read_bytes()[:300])
    f32 = np.zeros(6, dtype=np.float32).tobytes()
    (d / "list.safetensors").write_bytes(safetensors_bytes([{"dtype": "F32"}], f32))
    (d / "no_offsets.safetensors").write_bytes(safetensors_bytes({"w": {"dtype": "F32", "shape": [6]}}, f32))
    (d / "bad_shape.safetensors").write_bytes(
        safetensors_bytes({"w": {"dtype": "F32", "shape": [7], "data_offsets": [0, 24]}}, f32))
    (d / "overlap.safetensors").write_bytes(safetensors_bytes(
        {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
         "v": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, f32))
    (d / "gap.safetensors").write_bytes(safetensors_bytes(
        {"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, f32[:16]))
    (d / "trailing.safetensors").write_bytes(safetensors_bytes(
        {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, f32))
    (d / "dtype.safetensors").write_bytes(safetensors_bytes(
        {"w": {"dtype": "F33", "shape": [6], "data_offsets": [0, 24]}}, f32))
    (d / "meta.safetensors").write_bytes(safetensors_bytes(
        {"__metadata__": {"n": 3}, "w": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}}, f32))
    (d / "offsets_type.safetensors").write_bytes(safetensors_bytes(
        {"w": {"dtype": "F32", "shape": [6], "data_offsets": ["0", 24]}}, f32))


DAMAGED = {
    "random bytes .pth": ("random.pth", r"random\.pth: damaged or not a PyTorch checkpoint"),
    "truncated zip .pth": ("truncated.pth", r"truncated\.pth: damaged.*truncated"),
    "empty .pth": ("empty.pth", r"empty\.pth: damaged.*empty"),
    "truncated legacy .pth": ("legacy_cut.pth", r"legacy_cut\.pth: damaged"),
    "safetensors header is a list": ("list.safetensors", r"list\.safetensors: damaged.*JSON list"),
    "safetensors entry without offsets": ("no_offsets.safetensors", r"damaged.*lacks dtype, shape or data_offsets"),
    "safetensors shape vs bytes": ("bad_shape.safetensors", r"damaged.*needs 28 bytes but its data_offsets span 24"),
    "safetensors overlap": ("overlap.safetensors", r"damaged.*overlaps"),
    "safetensors gap": ("gap.safetensors", r"damaged.*gap"),
    "safetensors trailing bytes": ("trailing.safetensors", r"damaged.*16 bytes after the last tensor"),
    "safetensors unknown dtype": ("dtype.safetensors", r"damaged.*unknown dtype 'F33'"),
    "safetensors metadata not strings": ("meta.safetensors", r"damaged.*__metadata__"),
    "safetensors offsets not integers": ("offsets_type.safetensors", r"damaged.*data_offsets"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_damaged_inputs_are_called_damaged(tmp_path, capsys, case):
    _damaged_files(tmp_path)
    name, pattern = DAMAGED[case]
    err = expect_user_error(["merge", str(tmp_path / "a.pth"), str(tmp_path / name), "-o",
                             str(tmp_path / "out.pth"), "--quiet"], pattern, capsys, tmp_path)
    assert "--trust-pickle" not in err  # damaged, not unsafe
    # inspect reads the same files and says the same (it used to accept a bad shape silently)
    expect_user_error(["inspect", str(tmp_path / name)], pattern, capsys, tmp_path)


class CodeRunning:  # a pickled object the safe loader must refuse as unsafe (not damaged)
    pass


def test_code_running_pickle_is_told_to_trust(tmp_path, capsys):
    torch.save(net(0), tmp_path / "a.pth")
    torch.save({"state_dict": net(1), "meta": CodeRunning()}, tmp_path / "evil.pth")
    err = expect_user_error(["merge", str(tmp_path / "a.pth"), str(tmp_path / "evil.pth"), "-o",
                             str(tmp_path / "o.pth"), "--quiet"], r"evil\.pth: .*--trust-pickle", capsys, tmp_path)
    assert "damaged" not in err


def _prefixed(d: Path) -> None:
    torch.save({"state_dict": {"model." + k: v for k, v in net(0).items()}, "meta": {}}, d / "a.pth")
    save_file(net(1), d / "b.safetensors")


@pytest.mark.parametrize("extra", [[], ["--allow-missing"]])
def test_prefix_mismatch_is_named_and_never_merges_nothing(tmp_path, capsys, extra):
    _prefixed(tmp_path)
    expect_user_error(["merge", str(tmp_path / "a.pth"), str(tmp_path / "b.safetensors"), "-o",
                       str(tmp_path / "o.pth"), "--quiet", *extra],
                      r"b\.safetensors: its keys carry the prefix none while those of .*a\.pth carry model\.: "
                      r"the prefixes differ.*--prefix auto", capsys, tmp_path)


def test_prefix_auto_merges_the_networks(tmp_path):
    _prefixed(tmp_path)
    out = tmp_path / "o.safetensors"
    assert main(["merge", str(tmp_path / "a.pth"), str(tmp_path / "b.safetensors"), "-o", str(out),
                 "--prefix", "auto", "--quiet"]) == 0
    sd = load_file(out)
    a, b = net(0), net(1)
    assert set(sd) == set(a)
    k = "backbone.conv1.weight"
    np.testing.assert_allclose(sd[k].numpy(), (a[k].double().numpy() + b[k].double().numpy()) / 2, rtol=1e-6,
                               atol=1e-7)


def test_no_shared_tensor_is_refused(tmp_path, capsys):
    torch.save({"x.weight": torch.ones(2)}, tmp_path / "a.pth")
    torch.save({"y.weight": torch.ones(2)}, tmp_path / "b.pth")
    expect_user_error(["merge", str(tmp_path / "a.pth"), str(tmp_path / "b.pth"), "-o", str(tmp_path / "o.pth"),
                       "--allow-missing", "--quiet"], r"no tensor name is shared by all 2 inputs", capsys, tmp_path)


@pytest.mark.parametrize("option,values", [("--weights", ["inf", "1"]), ("--weights", ["nan", "1"]),
                                           ("--counts", ["nan", "5"]), ("--counts", ["5", "inf"]),
                                           ("--counts", ["-1", "5"])])
def test_non_finite_weights_and_counts_rejected_up_front(tmp_path, capsys, option, values):
    torch.save(net(0), tmp_path / "a.pth")
    (tmp_path / "b.pth").write_bytes(b"not even read")  # the values are refused before any input is read
    err = expect_user_error(["merge", str(tmp_path / "a.pth"), str(tmp_path / "b.pth"), "-o",
                             str(tmp_path / "o.pth"), option, *values, "--quiet"],
                            rf"{option}: .*must be finite non-negative numbers", capsys, tmp_path)
    assert "overflow" not in err


def _two_architectures(d: Path) -> None:
    for arch in ("tiny_daformer_r", "tiny_daformer_mit"):
        torch.manual_seed(0)
        save_checkpoint(d / f"{arch}.pth", build_model(arch).state_dict(), meta={}, container="mmseg")


def test_resnet_and_mit_merge_says_the_architectures_differ(tmp_path, capsys):
    _two_architectures(tmp_path)
    err = expect_user_error(["merge", str(tmp_path / "tiny_daformer_r.pth"), str(tmp_path / "tiny_daformer_mit.pth"),
                             "-o", str(tmp_path / "o.pth"), "--quiet"], r"the architectures differ", capsys, tmp_path)
    assert "ResNet" in err and "MiT" in err


def test_lmc_with_two_architectures_names_files_and_its_own_options(tmp_path, capsys):
    _two_architectures(tmp_path)
    err = expect_user_error(["lmc", str(tmp_path / "tiny_daformer_r.pth"), str(tmp_path / "tiny_daformer_mit.pth"),
                             "--domain", "city", "synthetic", "city", "val", "--steps", "2", *FAST],
                            r"tiny_daformer_r\.pth holds .* but .*tiny_daformer_mit\.pth holds .*architectures differ",
                            capsys, tmp_path)
    assert "--allow-missing" not in err and "input 2" not in err


def test_lmc_non_finite_input_is_named(tmp_path, capsys):
    bad = net(1)
    bad["backbone.bn1.weight"][0] = float("nan")
    torch.save(net(0), tmp_path / "a.pth")
    torch.save(bad, tmp_path / "b.pth")
    expect_user_error(["lmc", str(tmp_path / "a.pth"), str(tmp_path / "b.pth"), "--domain", "city", "synthetic",
                       "city", "val", "--steps", "2", *FAST],
                      r"b\.pth: 1 tensors hold NaN or infinite values \(e\.g\. 'backbone\.bn1\.weight'\)", capsys,
                      tmp_path)


def test_lmc_key_mismatch_advice_names_lmc_options(tmp_path, capsys):
    torch.save(net(0), tmp_path / "a.pth")
    torch.save({**net(1), "extra.weight": torch.ones(1)}, tmp_path / "b.pth")
    err = expect_user_error(["lmc", str(tmp_path / "a.pth"), str(tmp_path / "b.pth"), "--domain", "city",
                             "synthetic", "city", "val", "--steps", "2", *FAST],
                            r"b\.pth: has 1 keys .*a\.pth lacks .*lmc needs models of one architecture", capsys,
                            tmp_path)
    assert "--allow-missing" not in err


# ---------------------------------------------------------------- outputs: checked first, write errors

OUTPUT_CASES = {
    "missing folder": (lambda d: d / "missing" / "o.pth", r"folder .*missing does not exist"),
    "folder is a file": (lambda d: d / "a.pth" / "o.pth", r"a\.pth is not a folder"),
    "unwritable folder": (lambda d: UNWRITABLE / "o.pth", r"cannot create files in /sys"),
}


@pytest.mark.parametrize("case", sorted(OUTPUT_CASES))
@pytest.mark.parametrize("heads", [False, True])
def test_merge_output_problems_found_before_reading(tmp_path, capsys, case, heads):
    torch.save(net(0), tmp_path / "a.pth")
    (tmp_path / "b.pth").write_bytes(b"never read: the output is checked first")
    target, pattern = OUTPUT_CASES[case]
    extra = ["--keep-heads", "decode_head."] if heads else []
    expect_user_error(["merge", str(tmp_path / "a.pth"), str(tmp_path / "b.pth"), "-o", str(target(tmp_path)),
                       "--quiet", *extra], pattern, capsys, tmp_path)


@pytest.fixture
def no_evaluation(monkeypatch):
    """Fail the test if evaluate gets as far as scoring: output checks must come first."""
    import domainmerge.evaluation.inference as inference

    def boom(*args, **kwargs):
        raise AssertionError("evaluation started before the outputs were checked")
    monkeypatch.setattr(inference, "evaluate_model", boom)


@pytest.mark.parametrize("option,target,pattern", [
    ("--json", lambda d: d / "missing" / "r.json", r"folder .*missing does not exist"),
    ("--json", lambda d: UNWRITABLE / "r.json", r"cannot create files in /sys"),
    ("--json", lambda d: d / "a.pth" / "r.json", r"is not a folder"),
    ("--save-pred", lambda d: d / "a.pth", r"--save-pred .*a\.pth: exists and is not a folder"),
    ("--save-pred", lambda d: d / "a.pth" / "preds", r"--save-pred .*a\.pth is not a folder"),
    ("--save-pred", lambda d: UNWRITABLE / "preds", r"--save-pred /sys/preds: cannot create files in /sys"),
])
def test_evaluate_outputs_checked_before_any_work(tmp_path, capsys, no_evaluation, option, target, pattern):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "a.pth", build_model("tiny_daformer_r").state_dict(), meta={}, container="mmseg")
    expect_user_error(["evaluate", str(tmp_path / "a.pth"), "--domain", "city", "synthetic", "city", "val",
                       option, str(target(tmp_path)), *FAST], pattern, capsys, tmp_path)


@pytest.mark.parametrize("argv,pattern", [
    (lambda d: ["recalibrate", str(d / "a.pth"), "--domain", "c", "synthetic", "city", "--images", "2",
                "-o", str(d / "no" / "r.pth")], r"folder .*no does not exist"),
    (lambda d: ["align", str(d / "a.pth"), str(d / "a.pth"), "-o", str(d / "al.pth"), "--json",
                str(UNWRITABLE / "a.json")], r"cannot create files in /sys"),
    (lambda d: ["score", "--pred", str(d), "--gt", str(d), "--json", str(d / "a.pth" / "s.json")],
     r"is not a folder"),
    (lambda d: ["lmc", str(d / "a.pth"), str(d / "a.pth"), "--domain", "c", "synthetic", "city",
                "--out", str(d / "a.pth" / "lmc")], r"--out .*a\.pth is not a folder"),
    (lambda d: ["demo", "--preset", "tiny", "--out", str(UNWRITABLE / "demo")], r"--out /sys/demo: cannot create"),
])
def test_every_command_checks_its_outputs_first(tmp_path, capsys, argv, pattern):
    torch.save(net(0), tmp_path / "a.pth")
    expect_user_error(argv(tmp_path), pattern, capsys, tmp_path)


def _fail_writes(monkeypatch, err: int) -> None:
    """Make every byte written to a checkpoint fail as a full disk (or size limit) would."""
    from domainmerge.checkpoint import SafetensorsWriter
    from domainmerge.checkpoint.pickles import _Sink

    def fail(self, *args):
        self.error = OSError(err, os.strerror(err))  # what _Sink records from os.write
        raise self.error
    monkeypatch.setattr(_Sink, "write", fail)
    monkeypatch.setattr(SafetensorsWriter, "write", fail)


@pytest.mark.parametrize("err,pattern", [(errno.ENOSPC, r"No space left on device\); free some space"),
                                         (errno.EFBIG, r"File too large\); raise the file size limit")])
@pytest.mark.parametrize("out", ["o.pth", "o.safetensors"])
def test_full_disk_or_size_limit_is_one_line(tmp_path, capsys, monkeypatch, err, pattern, out):
    torch.save(net(0), tmp_path / "a.pth")
    torch.save(net(1), tmp_path / "b.pth")
    _fail_writes(monkeypatch, err)
    expect_user_error(["merge", str(tmp_path / "a.pth"), str(tmp_path / "b.pth"), "-o", str(tmp_path / out),
                       "--quiet"], rf"{re.escape(out)}: cannot write \({pattern}", capsys, tmp_path)


def test_evaluate_json_on_a_full_disk(tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "a.pth", build_model("tiny_daformer_r").state_dict(), meta={}, container="mmseg")

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(Path, "write_text", full)
    expect_user_error(["evaluate", str(tmp_path / "a.pth"), "--domain", "city", "synthetic", "city", "val",
                       "--json", str(tmp_path / "r.json"), "--save-pred", str(tmp_path / "pred"), *FAST],
                      r"r\.json: cannot write \(No space left", capsys, tmp_path)  # predictions removed too


# ---------------------------------------------------------------- evaluate: dataset files read by workers

def _tree(root: Path, problem: str) -> Path:
    rng = np.random.default_rng(0)
    img_dir, lab_dir = root / "leftImg8bit" / "val" / "x", root / "gtFine" / "val" / "x"
    img_dir.mkdir(parents=True)
    lab_dir.mkdir(parents=True)
    for i in range(4):  # item 2 is bad: predictions of items 0 and 1 are written before it is read
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(img_dir / f"x_{i}_leftImg8bit.png")
        lab = rng.integers(0, 19, (H, W)).astype(np.uint8)
        if i == 2 and problem == "label value":
            lab[3, 4] = 40
        if i == 2 and problem == "rgb label":
            Image.fromarray(np.stack([lab] * 3, -1)).save(lab_dir / f"x_{i}_gtFine_labelTrainIds.png")
            continue
        Image.fromarray(lab).save(lab_dir / f"x_{i}_gtFine_labelTrainIds.png")
    if problem == "truncated image":
        path = img_dir / "x_2_leftImg8bit.png"
        path.write_bytes(path.read_bytes()[:200])  # the header (size) still reads; the pixels do not
    return root


@pytest.mark.parametrize("problem,pattern", [
    ("label value", r"x_2_gtFine_labelTrainIds\.png: label value 40 is not a train id"),
    ("rgb label", r"x_2_gtFine_labelTrainIds\.png: label image has mode RGB"),
    ("truncated image", r"x_2_leftImg8bit\.png: unreadable image"),
])
@pytest.mark.parametrize("workers", ["0", "2"])
def test_dataset_errors_are_one_line_with_or_without_workers(tmp_path, capsys, problem, pattern, workers):
    root = _tree(tmp_path / "cs", problem)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "a.pth", build_model("tiny_daformer_r").state_dict(), meta={}, container="mmseg")
    err = expect_user_error(["evaluate", str(tmp_path / "a.pth"), "--domain", "cs", "cityscapes", str(root),
                             "--json", str(tmp_path / "r.json"), "--save-pred", str(tmp_path / "pred"),
                             "--device", "cpu", "--workers", workers, "--batch-size", "1", "--quiet"],
                            pattern, capsys, tmp_path)
    assert "DataLoader worker" not in err


def test_loader_errors_unwraps_a_worker_traceback():
    class Bad(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            if i == 2:
                try:
                    raise ValueError("inner cause")
                except ValueError as exc:
                    raise UserError("f.png: broken; replace it") from exc
            return i

    loader = torch.utils.data.DataLoader(Bad(), batch_size=None, num_workers=1)
    with pytest.raises(UserError) as info:
        list(loader_errors(loader))
    assert str(info.value) == "f.png: broken; replace it"
    assert worker_message(ValueError("plain")) == "plain"


# ---------------------------------------------------------------- NaN/inf checkpoints

def test_evaluate_refuses_non_finite_checkpoints_unless_allowed(tmp_path, capsys):
    torch.manual_seed(0)
    sd = build_model("tiny_daformer_r").state_dict()
    key = next(k for k, v in sd.items() if v.is_floating_point() and k.startswith("decode_head"))
    sd[key].view(-1)[0] = float("nan")
    save_checkpoint(tmp_path / "nan.pth", sd, meta={}, container="mmseg")
    argv = ["evaluate", str(tmp_path / "nan.pth"), "--domain", "city", "synthetic", "city", "val", *FAST]
    expect_user_error(argv, rf"nan\.pth: 1 tensors hold NaN or infinite values \(e\.g\. '{re.escape(key)}'\).*"
                            "--allow-nonfinite", capsys, tmp_path)
    assert main([*argv, "--allow-nonfinite"]) == 0
    assert "warning: " in capsys.readouterr().err


def test_inspect_warns_about_non_finite_tensors(tmp_path, capsys):
    sd = net(0)
    sd["backbone.bn1.bias"][1] = float("inf")
    torch.save(sd, tmp_path / "inf.pth")
    assert main(["inspect", str(tmp_path / "inf.pth")]) == 0
    captured = capsys.readouterr()
    assert "warning: " in captured.err and "'backbone.bn1.bias'" in captured.err
    assert "1 tensors hold NaN or infinite values" in captured.out
    assert main(["inspect", str(tmp_path / "inf.pth"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoints"][0]["nonfinite"] == ["backbone.bn1.bias"]


# ---------------------------------------------------------------- dtypes

def test_mixed_dtypes_merge_in_the_widest(tmp_path, capsys):
    a16, b32 = net(0, dtype=torch.float16), net(1)
    save_file(a16, tmp_path / "a.safetensors")
    torch.save(b32, tmp_path / "b.pth")
    out = tmp_path / "m.pth"
    assert main(["merge", str(tmp_path / "a.safetensors"), str(tmp_path / "b.pth"), "-o", str(out)]) == 0
    summary = capsys.readouterr().out
    assert "dtype: float32 (the widest of the inputs; inputs: float16, float32" in summary
    sd = torch.load(out, weights_only=True)["state_dict"]  # from safetensors first: an mmseg container
    k = "backbone.conv1.weight"
    assert sd[k].dtype == torch.float32
    # independent: numpy in float64 from the stored fp16 values
    ref = (a16[k].numpy().astype(np.float64) + b32[k].numpy().astype(np.float64)) / 2
    np.testing.assert_allclose(sd[k].numpy(), ref, rtol=1e-6, atol=1e-7)
    out16 = tmp_path / "m16.safetensors"
    assert main(["merge", str(tmp_path / "a.safetensors"), str(tmp_path / "b.pth"), "-o", str(out16),
                 "--dtype", "float16"]) == 0
    assert "dtype: float16 (as --dtype asks" in capsys.readouterr().out
    assert load_file(out16)[k].dtype == torch.float16
    np.testing.assert_allclose(load_file(out16)[k].double().numpy(), ref, rtol=2e-3, atol=2e-3)


def test_fp16_and_bf16_merge_to_float32():
    out = merge_state_dicts([net(0, dtype=torch.float16), net(1, dtype=torch.bfloat16)])
    assert out["backbone.conv1.weight"].dtype == torch.float32


# ---------------------------------------------------------------- the three library bugs

def test_bn_layer_with_half_its_statistics_missing_is_copied_not_a_keyerror():
    a, b = net(0, 100), net(1, 300)
    del b["backbone.bn1.running_var"]
    out = merge_state_dicts([a, b], allow_missing=True)
    assert torch.equal(out["backbone.bn1.running_mean"], a["backbone.bn1.running_mean"])
    assert torch.equal(out["backbone.bn1.running_var"], a["backbone.bn1.running_var"])
    k = "backbone.conv1.weight"
    np.testing.assert_allclose(out[k].numpy(), (a[k].double().numpy() + b[k].double().numpy()) / 2, rtol=1e-6,
                               atol=1e-7)


@pytest.mark.parametrize("name", ["m.safetensors", "m.pth"])
def test_release_keeps_in_place_edits(tmp_path, name):
    big = {"w": torch.arange(300_000, dtype=torch.float32), "v": torch.ones(300_000)}  # many pages each
    if name.endswith(".safetensors"):
        save_file(big, tmp_path / name)
    else:
        torch.save(big, tmp_path / name)
    with open_checkpoint(tmp_path / name) as ck:
        t = ck.get("w")
        t.mul_(2)
        ck.release("w")
        assert float(t[12345]) == 24690.0  # the edit survives the release
        assert float(ck.get("w")[12345]) == 24690.0
        ck.get("v")
        ck.release("v")  # clean pages may be dropped: reading again gives the file's bytes
        assert float(ck.get("v").sum()) == 300_000.0
    with open_checkpoint(tmp_path / name) as ck:  # the file itself never changes
        assert float(ck.get("w")[12345]) == 12345.0


@pytest.mark.parametrize("kwargs", [{"container": "mmsge", "meta": {"iter": 1}},
                                    {"container": "plain", "meta": {"iter": 1}}])
def test_save_checkpoint_refuses_unknown_or_lossy_containers(tmp_path, kwargs):
    with pytest.raises(ValueError, match="container"):
        save_checkpoint(tmp_path / "x.pth", net(0), **kwargs)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- file modes, exclusive creation, signals

@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_outputs_get_the_umask_mode(tmp_path, umask, mask):
    umask(mask)
    torch.save(net(0), tmp_path / "a.pth")
    torch.save(net(1), tmp_path / "b.pth")
    plain = tmp_path / "plain"
    plain.write_text("x")  # what open(..., 'w') gives under this umask: the independent reference
    for out in ("m.pth", "m.safetensors"):
        assert main(["merge", str(tmp_path / "a.pth"), str(tmp_path / "b.pth"), "-o", str(tmp_path / out),
                     "--quiet"]) == 0
        assert stat.S_IMODE((tmp_path / out).stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~mask


def test_force_keeps_the_replaced_files_mode(tmp_path):
    torch.save(net(0), tmp_path / "a.pth")
    torch.save(net(1), tmp_path / "b.pth")
    out = tmp_path / "m.pth"
    out.write_text("old")
    os.chmod(out, 0o640)
    assert main(["merge", str(tmp_path / "a.pth"), str(tmp_path / "b.pth"), "-o", str(out), "--quiet",
                 "--force"]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert "backbone.conv1.weight" in torch.load(out, weights_only=True)


def test_a_new_output_never_replaces_a_file_that_appeared_meanwhile(tmp_path):
    target = tmp_path / "r.json"
    with pytest.raises(UserError, match="created by someone else"):
        with atomic_path(target, replace=False) as tmp:
            tmp.write_text("mine")
            target.write_text("theirs")  # another process finished first
    assert target.read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    with atomic_path(target, replace=True) as tmp:  # --force replaces
        tmp.write_text("mine")
    assert target.read_text() == "mine"


def test_rename_noreplace_fallback_without_renameat2(tmp_path, monkeypatch):
    import domainmerge.fsutil as fsutil

    monkeypatch.setattr(fsutil, "_renameat2", False)  # as on a C library without renameat2
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_text() == "b" and (tmp_path / "a").exists()
    rename_noreplace(tmp_path / "a", tmp_path / "c")
    assert (tmp_path / "c").read_text() == "a" and not (tmp_path / "a").exists()


def test_sigterm_removes_temporary_files_and_handlers_are_restored(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        with handle_termination():
            with atomic_path(tmp_path / "o.bin") as tmp:
                tmp.write_bytes(b"partial")
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):  # the handler runs at the next bytecode boundary
                    pass
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is before


def test_importing_the_library_installs_no_signal_handler():
    import subprocess
    import sys

    code = ("import signal; a = signal.getsignal(signal.SIGTERM); "
            "import domainmerge, domainmerge.cli, domainmerge.fsutil, domainmerge.checkpoint; "
            "assert signal.getsignal(signal.SIGTERM) is a, signal.getsignal(signal.SIGTERM)")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- evaluation defaults, progress totals

class _Shapes(torch.utils.data.Dataset):
    """Items of one image size, read from disk (no ``in_memory``)."""

    def __init__(self, h: int, w: int):
        self.h, self.w = h, w

    def __len__(self) -> int:
        return 3

    def __getitem__(self, i):
        return torch.zeros(3, self.h, self.w, dtype=torch.uint8), torch.zeros(self.h, self.w, dtype=torch.int64), str(i)


@pytest.mark.parametrize("h,w,kwargs,device,expected", [
    (64, 128, {}, "cpu", 64),                                   # 2^20 / 8192 = 128, capped at 64
    (1024, 2048, {}, "cpu", 1),                                 # a Cityscapes image is 2 megapixels
    (1024, 2048, {"img_scale": (1024, 512)}, "cpu", 2),         # rescaled to 512 x 1024: 2^20 / 2^19
    (1024, 512, {"mode": "slide", "crop": (512, 512)}, "cpu", 2),   # 2 windows of 2^18 each: 2^20 / 2^19
    (1024, 2048, {"mode": "slide", "crop": (512, 512)}, "cpu", 1),  # 2 x 4 windows of 2^18: 2 megapixels
    (256, 512, {"mode": "slide", "crop": (128, 128), "stride": (64, 64)}, "cpu", 3),  # 3 x 7 windows of 2^14: 64 // 21
    (1024, 2048, {"mode": "slide"}, "cuda", 1),                     # 3 windows of 1024^2 (HRDA's test): 4 // 3
    (1024, 2048, {"img_scale": (1024, 512)}, "cuda", 8),        # 4 * 2^20 / 2^19
])
def test_default_batch_size_by_hand(h, w, kwargs, device, expected):
    from domainmerge.evaluation.inference import default_batch_size

    assert default_batch_size(_Shapes(h, w), torch.device(device), **kwargs) == expected


def test_default_workers_none_for_in_memory_data():
    from domainmerge.data.synthetic import SyntheticDataset
    from domainmerge.evaluation.inference import default_workers

    assert default_workers(SyntheticDataset("city", "val", 2)) == 0
    assert default_workers(_Shapes(8, 8)) == min(2, os.cpu_count() or 1)


def test_recalibrate_progress_bar_has_a_total(capsys):
    from torch import nn

    from domainmerge.analysis.recalibrate import recalibrate_bn

    net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    batches = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(1, 3, 4, 4)]
    assert recalibrate_bn(net, iter(batches), progress=True, total=5) == 3
    assert "5/5" in capsys.readouterr().err  # images counted against the total, not "3batch"


def test_tensors_outlive_the_checkpoint_they_came_from(tmp_path):
    """load_state_dict closes its checkpoint; the safetensors tensors it returns must stay readable
    (they used to point into an unmapped file: a segmentation fault on the first read)."""
    import gc
    import subprocess
    import sys

    from safetensors.torch import save_file

    values = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5, dtype=torch.float16)}
    save_file(values, tmp_path / "m.safetensors")
    code = ("import gc, sys; from domainmerge.checkpoint import load_state_dict; "
            f"sd = load_state_dict({str(tmp_path / 'm.safetensors')!r}); gc.collect(); "
            "print(float(sd['a'].sum()), float(sd['b'].sum()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["66.0", "5.0"]          # 0 + 1 + ... + 11, five ones
    gc.collect()

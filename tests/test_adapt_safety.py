"""`adapt` as safe as `merge`: bad input is one line on stderr and exit 2, checked before any work,
and nothing is lost (a previous run, the inputs); a folder becomes a run only with a checkpoint."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from domainmerge.cli import main
from domainmerge.data.synthetic import SyntheticDataset
from domainmerge.errors import UserError
from domainmerge.training import AdaptConfig, adapt, get_recipe

BASE = ["adapt", "--arch", "tiny_daformer_r", "--device", "cpu", "--workers", "0", "--crop", "32", "32",
        "--batch-size", "1", "--iters", "2", "--save-every", "2", "--log-every", "1",
        "--source", "synthetic", "game", "--target", "synthetic", "city"]


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def old_run(tmp_path_factory) -> Path:
    """A finished run (iter_2.pth, latest.pth, log.jsonl) to be kept or replaced."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("old") / "run"
    assert main([*BASE, "--out", str(out)]) == 0
    assert {"latest.pth", "iter_2.pth", "log.jsonl"} <= {p.name for p in out.iterdir()}
    return out


def test_force_checks_everything_before_touching_the_previous_run(old_run, tmp_path, capsys):
    before = _digest(old_run)
    capsys.readouterr()
    bad_inputs = [["--pretrained", str(tmp_path / "typo.pth")],
                  ["--val", "synthetic", "nowhere", "val"],
                  ["--set", "warmup_iters=many"],
                  ["--workers", "-1"]]
    for extra in bad_inputs:
        assert main([*BASE, "--out", str(old_run), "--force", *extra]) == 2, extra   # the last --workers wins
        _one_line_error(capsys)
        assert _digest(old_run) == before, extra


def test_force_replaces_the_old_files_only_when_the_new_run_saves(old_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(old_run, run)
    before = _digest(run)
    cfg = AdaptConfig(SyntheticDataset("game", "train", 4, size=(32, 64)),
                      SyntheticDataset("city", "train", 4, size=(32, 64)), out=run, arch="tiny_daformer_r",
                      recipe=get_recipe(iters=3, batch_size=1, lr=1e30, warmup_iters=0, rcs=False),
                      save_every=100, log_every=1, force=True, progress=False)
    with pytest.raises(UserError, match="loss is nan"):
        adapt(cfg, log=lambda s: None)
    assert _digest(run) == before   # the NaN came before the new run's first checkpoint
    cfg.recipe = get_recipe(iters=1, batch_size=1, warmup_iters=0, rcs=False)
    adapt(cfg, log=lambda s: None)
    names = {p.name for p in run.iterdir()}
    assert names == {"latest.pth", "iter_1.pth", "log.jsonl"}   # old iter_2.pth gone with the old run
    assert [line.count('"iter"') for line in (run / "log.jsonl").read_text().splitlines()] == [1]


def _damaged(tmp_path: Path, old_run: Path) -> dict[str, Path]:
    good = torch.load(old_run / "latest.pth", map_location="cpu", weights_only=True)
    blob = (old_run / "latest.pth").read_bytes()
    variants: dict[str, object] = {
        "truncated": blob[: len(blob) // 2], "empty": b"", "text": b"iter: 4\n",
        "no_iter": {**good, "meta": {k: v for k, v in good["meta"].items() if k != "iter"}},
        "missing_keys": {**good, "state_dict": {k: v for k, v in good["state_dict"].items()
                                                if not k.startswith("model.decode_head")}},
        "bad_optimizer": {**good, "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}},
                                                "param_groups": good["optimizer"]["param_groups"]}},
        "bad_optimizer_shape": {**good, "optimizer": {
            "state": {i: {**s, "exp_avg": torch.zeros(7)} for i, s in good["optimizer"]["state"].items()},
            "param_groups": good["optimizer"]["param_groups"]}},
        "a_list": [1, 2, 3],
    }
    runs = {}
    for name, content in variants.items():
        run = tmp_path / name
        run.mkdir()
        if isinstance(content, bytes):
            (run / "latest.pth").write_bytes(content)
        else:
            torch.save(content, run / "latest.pth")
        runs[name] = run
    return runs


def test_resume_of_a_damaged_latest_is_a_one_line_error(old_run, tmp_path, capsys):
    capsys.readouterr()
    for name, run in _damaged(tmp_path, old_run).items():
        before = _digest(run)
        assert main([*BASE, "--iters", "4", "--out", str(run), "--resume"]) == 2, name
        err = _one_line_error(capsys, "latest.pth")
        assert _digest(run) == before, name
        if name != "a_list":
            assert any(w in err for w in ("damaged", "meta.iter", "missing", "optimizer", "empty")), (name, err)
        if name in ("truncated", "empty", "text"):   # the run's own file: the advice is its other checkpoints
            assert "iter_N.pth" in err and "--force" in err and "re-download" not in err, (name, err)


def test_unwritable_out_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    capsys.readouterr()
    assert main([*BASE, "--out", str(tmp_path / "file" / "run")]) == 2
    _one_line_error(capsys, "file")
    assert main([*BASE, "--out", str(tmp_path / "file")]) == 2
    _one_line_error(capsys, "not a folder")
    if os.geteuid() != 0:   # root writes into read-only modes; the probe file catches read-only mounts
        locked = tmp_path / "ro"
        locked.mkdir(mode=0o500)
        assert main([*BASE, "--out", str(locked / "run")]) == 2
        _one_line_error(capsys, "cannot create files")


def test_a_full_disk_during_a_checkpoint_is_a_one_line_error(tmp_path):
    """ulimit -f: the checkpoint write fails with EFBIG, reported naming the file; no temp file stays."""
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
              "from domainmerge.cli import main; sys.exit(main(sys.argv[1:]))")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", script, *BASE, "--out", str(out)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=300)
    err = proc.stderr.strip()
    assert proc.returncode == 2, err
    last = err.replace("\r", "\n").splitlines()[-1]   # after the progress bar
    assert "Traceback" not in err and "latest.pth: cannot write (File too large)" in last, err
    assert not out.exists() or not any(out.iterdir())


def test_a_second_run_into_a_locked_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # as a running adapt holds it
        capsys.readouterr()
        assert main([*BASE, "--out", str(out)]) == 2
        _one_line_error(capsys, "another adapt run")
    finally:
        os.close(fd)
    assert main([*BASE, "--out", str(out)]) == 0   # released: the run goes ahead


def _folder_dataset(root: Path, good: int, bad: int) -> None:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for i in range(good):
        Image.fromarray(rng.integers(0, 255, (32, 64, 3), dtype=np.uint8)).save(root / "images" / f"a{i}.png")
        Image.fromarray(np.full((32, 64), i % 3, dtype=np.uint8)).save(root / "labels" / f"a{i}.png")
    for i in range(bad):
        (root / "images" / f"b{i}.png").write_bytes(b"not a png")
        Image.fromarray(np.zeros((32, 64), dtype=np.uint8)).save(root / "labels" / f"b{i}.png")


def test_a_bad_target_image_read_by_a_worker_is_one_line(tmp_path, capsys):
    _folder_dataset(tmp_path / "tgt", good=1, bad=5)
    out = tmp_path / "run"
    args = [a for a in BASE if a != "city"]
    args[args.index("--target") + 1:args.index("--target") + 2] = ["folder", str(tmp_path / "tgt"), ""]
    args[args.index("--workers") + 1] = "1"
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 2
    _one_line_error(capsys, "unreadable image")
    assert not out.exists()   # a run that saved nothing leaves no folder


def test_late_failures_leave_no_folder_that_looks_like_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = AdaptConfig(SyntheticDataset("game", "train", 4, size=(32, 64)),
                      SyntheticDataset("city", "train", 4, size=(32, 64)), out=out, arch="tiny_daformer_r",
                      recipe=get_recipe(iters=3, batch_size=1, lr=1e30, warmup_iters=0, rcs=False),
                      save_every=100, log_every=1, progress=False)
    with pytest.raises(UserError, match="loss is nan"):
        adapt(cfg, log=lambda s: None)
    assert not out.exists()
    out.mkdir()
    (out / "log.jsonl").write_text('{"iter": 1}\n')   # a log without a checkpoint is not a run
    capsys.readouterr()
    assert main([*BASE, "--out", str(out)]) == 0
    assert (out / "latest.pth").exists() and '"iter": 1}' not in (out / "log.jsonl").read_text()
    capsys.readouterr()
    assert main([*BASE, "--out", str(tmp_path / "new"), "--resume"]) == 2
    _one_line_error(capsys, "no such folder")


def test_a_bad_val_set_is_found_at_start_and_the_checkpoint_is_saved_before_validating(tmp_path, capsys):
    _folder_dataset(tmp_path / "val", good=0, bad=2)
    capsys.readouterr()
    assert main([*BASE, "--val", "folder", str(tmp_path / "val"), "", "--out", str(tmp_path / "a")]) == 2
    _one_line_error(capsys, "unreadable image")
    assert not (tmp_path / "a").exists()

    class FailsLater(torch.utils.data.Dataset):   # readable at start, fails at the first validation
        def __init__(self):
            self.calls = 0
            self.inner = SyntheticDataset("city", "val", 2, size=(32, 64))

        def __len__(self):
            return 2

        def __getitem__(self, i):
            self.calls += 1
            if self.calls > 1:
                raise UserError("val image gone")
            return self.inner[i]

    out = tmp_path / "b"
    cfg = AdaptConfig(SyntheticDataset("game", "train", 4, size=(32, 64)),
                      SyntheticDataset("city", "train", 4, size=(32, 64)), out=out, arch="tiny_daformer_r",
                      recipe=get_recipe(iters=2, batch_size=1, warmup_iters=0, rcs=False), val=FailsLater(),
                      val_every=2, save_every=2, progress=False)
    with pytest.raises(UserError, match="val image gone"):
        adapt(cfg, log=lambda s: None)
    assert torch.load(out / "latest.pth", weights_only=True)["meta"]["iter"] == 2


def test_nan_in_pretrained_weights_is_reported_at_load(tmp_path, capsys):
    from domainmerge.models import build_model

    backbone = build_model("tiny_daformer_r").backbone.state_dict()
    key = next(k for k, v in backbone.items() if v.is_floating_point())
    backbone[key] = backbone[key].clone().fill_(float("nan"))
    torch.save(backbone, tmp_path / "nan.pth")
    capsys.readouterr()
    assert main([*BASE, "--pretrained", str(tmp_path / "nan.pth"), "--out", str(tmp_path / "run")]) == 2
    _one_line_error(capsys, "nan.pth", "NaN")
    assert not (tmp_path / "run").exists()


def test_recipe_values_from_the_command_line_and_crops_capped_to_the_images(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("warmup_iters: 7\nbetas: [0.8, 0.9]\n")
    args = [a for a in BASE if a not in ("--crop", "32")]
    out = tmp_path / "run"
    assert main([*args, "--recipe-file", str(tmp_path / "r.yaml"), "--set", "rcs=false", "--set", "lr=1e-4",
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "512x512 is larger than its images (64x128): cropping 64x128" in captured.out
    meta = torch.load(out / "latest.pth", weights_only=True)["meta"]["domainmerge"]
    assert meta["crop"] == [64, 128]
    assert (meta["recipe"]["warmup_iters"], meta["recipe"]["rcs"], meta["recipe"]["lr"]) == (7, False, 1e-4)
    assert tuple(meta["recipe"]["betas"]) == (0.8, 0.9)
    for bad, needles in ((["--set", "warmup_iters=soon"], ("warmup_iters", "integer")),
                         (["--set", "rcs=maybe"], ("rcs", "true or false")),
                         (["--set", "warmup"], ("NAME=VALUE",)),
                         (["--set", "crop=3"], ("'crop' is not a recipe setting",)),
                         (["--recipe-file", str(tmp_path / "none.yaml")], ("none.yaml",))):
        assert main([*args, *bad, "--out", str(tmp_path / "x")]) == 2
        _one_line_error(capsys, *needles)
    assert not (tmp_path / "x").exists()


def test_a_resumed_run_logs_each_iteration_once(tmp_path, capsys):
    out = tmp_path / "run"
    args = [*BASE, "--iters", "4", "--out", str(out)]
    assert main([*args]) == 0
    full = (out / "log.jsonl").read_text()
    os.link(out / "iter_2.pth", out / "latest.tmp")
    os.replace(out / "latest.tmp", out / "latest.pth")   # as if stopped after iteration 3's log line
    assert main([*args, "--resume"]) == 0
    iters = [json.loads(line)["iter"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert iters == [1, 2, 3, 4] and len(full.splitlines()) == 4

"""Fault injection: the commands run as real processes and are stopped by SIGTERM or SIGINT at
seeded random moments, denied a writable folder, limited in file size (``ulimit -f``), or made
to race for the same output. Each case asserts the exit status, a single line on stderr, no
temporary file or partial output left, and inputs unchanged (hashed before and after).

Read-only folder: tests run as root here, where permission bits do not stop writes, so the
folder is /sys (sysfs refuses new files to every user, root included). Size limit: RLIMIT_FSIZE
set in the child with SIGXFSZ ignored, so writes fail with EFBIG as under ``ulimit -f``.
"""

from __future__ import annotations

import hashlib
import os
import random
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
STATUS = {signal.SIGTERM: (143, "domainmerge: terminated"), signal.SIGINT: (130, "domainmerge: interrupted")}


def _child_setup(fsize: int | None = None) -> Callable[[], None]:
    def setup() -> None:
        # Default dispositions whatever the test runner set, so Python installs its own.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    return setup


def start(argv: list[str], fsize: int | None = None) -> subprocess.Popen[str]:
    """The command in its own session (process group), as a shell job or a scheduler's step."""
    return subprocess.Popen([sys.executable, "-m", "domainmerge", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, preexec_fn=_child_setup(fsize),
                            start_new_session=True)


def hashes(paths: list[Path]) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def leftovers(folder: Path) -> list[str]:
    """Hidden (temporary) files anywhere under ``folder``."""
    return sorted(str(p) for p in folder.rglob(".*"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Three 'models' of ~12 MB each (big enough that merging takes a while), a tiny network."""
    base = tmp_path_factory.mktemp("faults")
    paths = {}
    for i, name in enumerate(("a.pth", "b.pth", "c.safetensors")):
        g = torch.Generator().manual_seed(i)
        sd = {f"backbone.layer{j}.weight": torch.randn(250_000, generator=g) for j in range(12)}
        sd.update({"backbone.bn.running_mean": torch.randn(8, generator=g), "backbone.bn.running_var":
                   torch.rand(8, generator=g) + 0.5, "backbone.bn.num_batches_tracked": torch.tensor(10 + i),
                   "decode_head.conv_seg.weight": torch.randn(19, 8, generator=g)})
        paths[name] = base / name
        save_file(sd, paths[name]) if name.endswith(".safetensors") else torch.save(sd, paths[name])
    from domainmerge.checkpoint import save_checkpoint
    from domainmerge.models import build_model

    torch.manual_seed(0)
    paths["net"] = save_checkpoint(base / "net.pth", build_model("tiny_daformer_r").state_dict(), meta={},
                                   container="mmseg")
    return paths


def _merge_args(inputs: dict[str, Path], out: Path, heads: bool) -> list[str]:
    extra = ["--keep-heads", "decode_head."] if heads else []
    return ["merge", str(inputs["a.pth"]), str(inputs["b.pth"]), str(inputs["c.safetensors"]), "-o", str(out),
            "--quiet", *extra]


def _outputs(out: Path, heads: bool) -> list[Path]:
    return [out.with_name(f"{out.stem}.{i}{out.suffix}") for i in (1, 2, 3)] if heads else [out]


def _signal_when_busy(proc: subprocess.Popen[str], folder: Path, signum: int, delay: float,
                      group: bool = False) -> None:
    """Send ``signum`` ``delay`` seconds after the first temporary file appears under ``folder``
    (so the process is writing), or not at all if it exits first; ``group``: to the whole process
    group, DataLoader workers included (Ctrl-C in a terminal, a batch scheduler's SIGTERM)."""
    while proc.poll() is None and not any(folder.rglob(".*.tmp")) and not any(folder.rglob("*.png")):
        time.sleep(0.002)
    time.sleep(delay)
    if proc.poll() is None:
        if group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)


def _check_stopped(proc: subprocess.Popen[str], signum: int) -> bool:
    """Exit status and the single stderr line of a stopped process; True if it was stopped. It
    may also have finished before the signal (status 0), or have been past its work, in the
    interpreter's shutdown, when the signal's default action ended it (status -signum): both
    count as finished, and the callers check that every output is then complete."""
    _, err = proc.communicate(timeout=120)
    if proc.returncode in (0, -signum):
        assert err.strip() == "", err
        return False
    status, line = STATUS[signal.Signals(signum)]
    assert proc.returncode == status, err
    assert err.strip() == line, err
    return True


MERGE_SIGNALS = [(1, signal.SIGTERM, "m.pth", False), (2, signal.SIGTERM, "m.safetensors", True),
                 (3, signal.SIGTERM, "m.safetensors", False), (4, signal.SIGINT, "m.pth", True)]


@pytest.mark.parametrize("seed,signum,name,heads", MERGE_SIGNALS)
def test_merge_stopped_by_a_signal_leaves_nothing(tmp_path, inputs, seed, signum, name, heads):
    before = hashes([inputs["a.pth"], inputs["b.pth"], inputs["c.safetensors"]])
    out = tmp_path / name
    proc = start(_merge_args(inputs, out, heads))
    _signal_when_busy(proc, tmp_path, signum, random.Random(seed).uniform(0.0, 0.15))
    stopped = _check_stopped(proc, signum)
    assert leftovers(tmp_path) == []
    outputs = _outputs(out, heads)
    if stopped:  # all or nothing: the outputs still in progress are never left half-written
        for o in outputs:
            assert not o.exists() or len(load_file(o) if o.suffix == ".safetensors" else torch.load(o)) > 0
    else:
        assert all(o.exists() for o in outputs)
    assert hashes(list(before)) == before


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory) -> Path:
    """A Cityscapes-layout val split of 24 image files: read by DataLoader worker processes."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("cs")
    rng = np.random.default_rng(0)
    img_dir, lab_dir = root / "leftImg8bit" / "val" / "x", root / "gtFine" / "val" / "x"
    img_dir.mkdir(parents=True)
    lab_dir.mkdir(parents=True)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)).save(img_dir / f"x_{i}_leftImg8bit.png")
        label = rng.integers(0, 19, (64, 128), dtype=np.uint8)
        Image.fromarray(label).save(lab_dir / f"x_{i}_gtFine_labelTrainIds.png")
    return root


@pytest.mark.parametrize("seed,signum", [(5, signal.SIGTERM), (6, signal.SIGINT)])
def test_evaluate_with_workers_stopped_by_a_signal_leaves_nothing(tmp_path, inputs, cityscapes, seed, signum):
    before = hashes([inputs["net"], *sorted(cityscapes.rglob("*.png"))])
    pred, report = tmp_path / "pred", tmp_path / "r.json"
    proc = start(["evaluate", str(inputs["net"]), "--domain", "cs", "cityscapes", str(cityscapes), "--device", "cpu",
                  "--workers", "2", "--batch-size", "1", "--save-pred", str(pred), "--json", str(report),
                  "--quiet"])
    _signal_when_busy(proc, tmp_path, signum, random.Random(seed).uniform(0.0, 0.3), group=True)
    if _check_stopped(proc, signum):
        assert list(tmp_path.iterdir()) == []  # this run's predictions removed, no JSON
    else:
        assert report.exists() and len(list(pred.rglob("*.png"))) == 24
    assert leftovers(tmp_path) == []
    assert hashes(list(before)) == before


def _expect_one_line_error(proc: subprocess.Popen[str], pattern: str) -> None:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert pattern in err, err


def test_read_only_folder_merge_keep_heads(tmp_path, inputs):
    before = hashes([inputs["a.pth"], inputs["b.pth"], inputs["c.safetensors"]])
    _expect_one_line_error(start(_merge_args(inputs, Path("/sys/m.pth"), True)), "cannot create files in /sys")
    assert hashes(list(before)) == before


def test_read_only_folder_evaluate_json(tmp_path, inputs):
    _expect_one_line_error(start(["evaluate", str(inputs["net"]), "--domain", "city", "synthetic", "city", "val",
                                  "--json", "/sys/r.json", "--quiet"]), "cannot create files in /sys")


@pytest.mark.parametrize("name,heads", [("m.pth", False), ("m.safetensors", False), ("m.pth", True)])
def test_file_size_limit_is_one_line_and_leaves_nothing(tmp_path, inputs, name, heads):
    before = hashes([inputs["a.pth"], inputs["b.pth"], inputs["c.safetensors"]])
    out = tmp_path / name
    proc = start(_merge_args(inputs, out, heads), fsize=1 << 20)  # 1 MiB: the outputs are ~12 MB
    _expect_one_line_error(proc, "cannot write (File too large); raise the file size limit (ulimit -f)")
    assert list(tmp_path.iterdir()) == []
    assert hashes(list(before)) == before


def test_two_merges_racing_for_one_new_output(tmp_path, inputs):
    out = tmp_path / "m.safetensors"
    procs = [start(_merge_args(inputs, out, False)) for _ in range(2)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    results = [(p.returncode, err) for p, err in zip(procs, errs)]
    statuses = sorted(r[0] for r in results)
    assert statuses == [0, 2], results
    loser = next(err for status, err in results if status == 2)
    assert len(loser.strip().splitlines()) == 1
    assert ("exists; pass --force" in loser) or ("created by someone else" in loser), loser
    assert len(load_file(out)) == 16
    assert leftovers(tmp_path) == []

"""The self-training loop: resume, DDP equivalence, checkpoints other commands read, bad input,
and one step of the real networks."""

from __future__ import annotations

import importlib
import json
import os
import socket

import pytest
import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from domainmerge.cli import main
from domainmerge.data.synthetic import SyntheticDataset
from domainmerge.data.training import CropConfig
from domainmerge.errors import UserError
from domainmerge.training import AdaptConfig, adapt, get_recipe
from domainmerge.training.adapt import Trainer

WHOLE = CropConfig(None, None)


def _world(size=(32, 64), n=6):
    return SyntheticDataset("game", "train", n, size=size), SyntheticDataset("night", "train", n, size=size)


def _config(out=None, *, arch="tiny_daformer_r", recipe="daformer", iters=4, batch=2, **kw):
    src, tgt = _world()
    r = get_recipe(recipe, mic=kw.pop("mic", True), iters=iters, batch_size=batch, warmup_iters=2,
                   ignore_top=2, ignore_bottom=4, rcs_min_pixels=20, lr=kw.pop("lr", 6e-4))
    return AdaptConfig(src, tgt, out=out, arch=arch, recipe=r, source_crop=WHOLE, target_crop=WHOLE,
                       progress=False, save_every=2, log_every=1, **kw)


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# the MiT with stochastic depth; with --one-pass too; under bf16 (the GradShadow's leaves)
@pytest.mark.parametrize("arch,one_pass,amp", [("tiny_daformer_r", False, None), ("tiny_daformer_mit", False, None),
                                               ("tiny_daformer_mit", True, None), ("tiny_daformer_mit", False, "bf16")])
def test_resume_ends_bit_identical_to_an_uninterrupted_run(tmp_path, arch, one_pass, amp):
    torch.set_num_threads(1)
    adapt(_config(tmp_path / "a", arch=arch, one_pass=one_pass, amp=amp), log=lambda s: None)
    first = adapt(_config(tmp_path / "b", arch=arch, stop_at=2, one_pass=one_pass, amp=amp), log=lambda s: None)
    assert first.iterations == 2 and _load(tmp_path / "b" / "latest.pth")["meta"]["iter"] == 2
    adapt(_config(tmp_path / "b", arch=arch, resume=True, one_pass=one_pass, amp=amp), log=lambda s: None)
    a, b = _load(tmp_path / "a" / "latest.pth"), _load(tmp_path / "b" / "latest.pth")
    assert a["meta"]["iter"] == b["meta"]["iter"] == 4
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    # the weights moved, and the student is not the teacher
    assert not torch.equal(a["state_dict"]["model.decode_head.conv_seg.weight"],
                           a["state_dict"]["imnet_model.decode_head.conv_seg.weight"])
    assert not torch.equal(a["state_dict"]["model.decode_head.conv_seg.weight"],
                           a["state_dict"]["ema_model.decode_head.conv_seg.weight"])
    lines = [json.loads(s) for s in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [x["iter"] for x in lines] == [1, 2, 3, 4]
    for key in ("loss_source", "loss_fd", "loss_pseudo", "loss_mic", "pseudo_weight", "lr", "images_per_s"):
        assert key in lines[-1]


def test_checkpoints_are_the_authors_container_and_merge_and_evaluate_read_them(tmp_path, capsys):
    torch.set_num_threads(1)
    result = adapt(_config(tmp_path / "run", iters=2, val=SyntheticDataset("night", "val", 2, size=(32, 64)),
                           val_every=2), log=lambda s: None)
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == ["iter_2.pth", "latest.pth", "log.jsonl"]
    ck = _load(tmp_path / "run" / "iter_2.pth")
    assert ck["meta"]["iter"] == 2 and len(ck["meta"]["CLASSES"]) == 19 and ck["meta"]["domainmerge"]["arch"]
    prefixes = {k.split(".", 1)[0] for k in ck["state_dict"]}
    assert prefixes == {"model", "ema_model", "imnet_model"} and "optimizer" in ck
    for k, v in result.student.items():
        assert torch.equal(ck["state_dict"]["model." + k], v)
    assert 0 <= result.validation[0]["val"]["miou"] <= 100
    out = tmp_path / "merged.pth"
    assert main(["merge", str(tmp_path / "run" / "iter_2.pth"), str(tmp_path / "run" / "latest.pth"), "-o", str(out),
                 "--only", "model.", "--quiet"]) == 0
    assert main(["evaluate", str(out), "--domain", "night", "synthetic", "night", "val", "--device", "cpu",
                 "--workers", "0", "--quiet"]) == 0
    assert "night" in capsys.readouterr().out


def _first_step(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Iteration 0's losses (the mean over ranks, as one process's batch mean) and the last
    layer's gradient (DistributedDataParallel averages it over ranks)."""
    from domainmerge.runtime.distributed import all_reduce_sum, get_world_size

    losses = trainer.step(0)["losses"]
    names = sorted(losses)
    mean = all_reduce_sum(torch.stack([losses[k].float() for k in names])) / get_world_size()
    return {**{f"loss_{k}": v for k, v in zip(names, mean)},
            "conv_seg": trainer.model.decode_head.conv_seg.weight.grad.detach().clone()}


# bf16: a batch-1 and a batch-2 convolution sum in another order, and their outputs round to bf16
# (2^-8 relative) differently here and there; measured 2.6e-3 of the last layer's gradient scale,
# 0.51 when the ranks' gradients are not averaged. 5 bf16 steps of the scale:
TOL_BF16 = 2e-2


def _rank_first_step(rank: int, world: int, port: int, out: str, arch: str, option: bool | str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)})
    torch.set_num_threads(1)
    one_pass, amp = option == "one_pass", "bf16" if option == "bf16" else None
    compile = option if option not in ("one_pass", "bf16") else False
    if compile:   # dynamo's graphs without inductor's code generation (minutes on a CPU), as test_compile
        importlib.import_module("domainmerge.training.adapt").COMPILE_BACKEND = "aot_eager"
    trainer = Trainer(_config(arch=arch, iters=3, batch=1, arch_options={"dropout": 0.0}, compile=bool(compile),
                              compile_blocks=compile == "blocks", one_pass=one_pass, amp=amp), log=lambda s: None)
    reduced: list[int] = []

    def count(state, bucket):   # DDP's gradient reduction of one bucket
        reduced.append(bucket.index())
        return allreduce_hook(state, bucket)

    trainer.student.register_comm_hook(torch.distributed.group.WORLD, count)
    result = _first_step(trainer)
    if amp:   # the GradShadow's gradients reach .grad outside autograd: averaged after DDP's idle backward
        assert trainer.grad_shadow is not None and reduced == [], reduced
    else:     # the gradients are exchanged once per iteration (at the last backward), not once per view
        assert reduced and len(reduced) == len(set(reduced)), reduced
    if compile:
        graphs = importlib.import_module("torch._dynamo.utils").counters["stats"]["unique_graphs"]
        assert graphs > 0, "nothing was compiled"
    if rank == 0:
        torch.save(result, out)
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("arch,option", [("tiny_daformer_r", False), ("tiny_daformer_mit", False),
                                         ("tiny_daformer_mit", True), ("tiny_daformer_r", "blocks"),
                                         ("tiny_daformer_mit", "one_pass"), ("tiny_daformer_r", "bf16")])
def test_two_gloo_ranks_first_step_equals_one_process_to_rounding(tmp_path, arch, option):
    """Same samples, same augmentation, pseudo-label share and feature-distance mask over the global
    batch, BatchNorm over the global batch (GlobalBatchNorm2d): the first iteration's losses and
    the last layer's gradient of 2 ranks x batch 1 are one process's with batch 2, up to float32
    rounding. Dropout is off: it draws per process from torch's generator.

    Why the first iteration and the last layer: the two paths sum in different orders (batch 1
    convolutions, sums over ranks), so they differ by rounding (measured: 2e-6 relative). Past the
    first step AdamW divides by sqrt(v), turning rounding noise in near-zero gradients into
    lr-sized steps, and deeper in the network a ReLU gate after a BatchNorm channel of near-zero
    variance can flip on that noise (on AVX-512 and ATEN_CPU_CAPABILITY=default one such channel
    moved the backbone's gradients by 1-4 %), so comparing weights after steps, or every
    gradient, tests float32 luck rather than the claim. The losses are continuous functions of
    everything the claim is about; the last layer's gradient is (logit error x features) with no
    gate in between. Tolerance: float32 rounding through ~20 layers of sums of up to a few
    thousand terms, sqrt(n) x eps x depth ~ 1e-4 relative. With ``option`` True the ranks run
    ``--compile`` (compiled backbone and head inside DistributedDataParallel; ``blocks``: the
    backbone compiled block by block) against the eager single process; with ``one_pass`` the
    ranks take their views in one forward and one backward (one gradient reduction); with ``bf16``
    both sides run under bf16 autocast on the GradShadow, whose gradients DDP does not see: the
    ranks average them after the last backward (``TOL_BF16``)."""
    torch.set_num_threads(1)
    amp = "bf16" if option == "bf16" else None
    one = _first_step(Trainer(_config(arch=arch, iters=3, batch=2, arch_options={"dropout": 0.0}, amp=amp),
                              log=lambda s: None))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_rank_first_step, args=(2, port, str(tmp_path / "two.pt"), arch, option), nprocs=2,
                                join=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    assert one.keys() == two.keys() and {"loss_source", "loss_fd", "loss_pseudo"} <= one.keys()
    assert float(one["loss_pseudo"]) > 0   # the terms the ranks share are on (MiT's thing mask is empty here)
    assert float(one["loss_fd"]) > 0 or arch == "tiny_daformer_mit"
    tol = 1e-4 if amp is None else TOL_BF16
    for k, v in one.items():
        scale = float(v.abs().max())
        torch.testing.assert_close(two[k], v, rtol=0, atol=tol * max(scale, 1e-6), msg=k)


def _rank_run(rank: int, world: int, port: int, out: str, arch: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)})
    torch.set_num_threads(1)
    adapt(_config(out, arch=arch, iters=3, batch=1, arch_options={"dropout": 0.0}), log=lambda s: None)
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("arch", ["tiny_daformer_r", "tiny_daformer_mit"])
def test_two_gloo_ranks_with_batch_1_equal_one_process_with_batch_2(tmp_path, arch):
    """Same samples, same augmentation and ClassMix classes, MiT stochastic depth per slot,
    pseudo-label share and feature-distance mask over the global batch, BatchNorm over the global
    batch (GlobalBatchNorm2d), so the runs agree up to float rounding. Dropout is off: it draws
    per process from torch's generator.

    Rounding differs (DDP averages two gradients, BatchNorm sums over ranks), and AdamW divides
    by the gradient's root mean square: an element whose gradient is itself at rounding level (a
    unit that barely fires, a BatchNorm scale) can move by up to the learning rate either way. So
    the logged losses agree to rounding, and every tensor's update agrees with the other run's to
    a tenth of its size (a few hundredths on average); a rank drawing its own samples, masks or
    classes changes the losses and the updates by their whole size."""
    torch.set_num_threads(1)
    adapt(_config(tmp_path / "one", arch=arch, iters=3, batch=2, arch_options={"dropout": 0.0}), log=lambda s: None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_rank_run, args=(2, port, str(tmp_path / "two"), arch), nprocs=2, join=True)
    one, two = _load(tmp_path / "one" / "latest.pth"), _load(tmp_path / "two" / "latest.pth")
    assert two["meta"]["domainmerge"]["world_size"] == 2
    logs = [[json.loads(x) for x in (tmp_path / run / "log.jsonl").read_text().splitlines()] for run in ("one", "two")]
    for a, b in zip(*logs):
        for key in ("loss_source", "loss_fd", "loss_pseudo", "loss_mic", "pseudo_weight"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["iter"], key)
    rel = []
    for k, v in one["state_dict"].items():
        w = two["state_dict"][k]
        if not v.is_floating_point():
            assert torch.equal(w, v), k
            continue
        start = one["state_dict"]["imnet_model." + k.split(".", 1)[1]]
        moved = float((v - start).norm())
        if moved > 0:
            rel.append(float((w - v).norm()) / moved)
            assert rel[-1] < 0.1, (k, rel[-1])
        else:
            assert torch.equal(w, v), k
    assert len(rel) > 0 and sum(rel) / len(rel) < 0.02


def test_bad_input_is_a_one_line_error(tmp_path, capsys):
    base = ["adapt", "--arch", "tiny_daformer_r", "--device", "cpu", "--workers", "0"]
    assert main([*base, "--source", "cityscapes", str(tmp_path / "nope"), "--target", "synthetic", "city",
                 "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "labels").mkdir()
    assert main([*base, "--source", "folder", str(empty), "", "--target", "synthetic", "city",
                 "--out", str(tmp_path / "o")]) == 2
    assert str(empty) in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "latest.pth").write_bytes(b"")
    assert main([*base, "--source", "synthetic", "game", "--target", "synthetic", "city",
                 "--out", str(tmp_path / "run")]) == 2
    assert "--resume" in capsys.readouterr().err
    # a pretrained file of another architecture: the first differing key is named
    from domainmerge.models import build_model

    mit = tmp_path / "mit.pth"
    torch.save(build_model("tiny_daformer_mit").backbone.state_dict(), mit)
    assert main([*base, "--source", "synthetic", "game", "--target", "synthetic", "city", "--pretrained", str(mit),
                 "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "mit.pth" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(UserError, match="hrda"):
        adapt(_config(recipe="hrda"))


def test_a_nan_loss_stops_naming_the_iteration_and_keeps_the_last_checkpoint(tmp_path):
    torch.set_num_threads(1)
    cfg = _config(tmp_path / "run", iters=20, lr=1e30, mic=False)
    cfg.save_every = 1
    with pytest.raises(UserError, match=r"iteration (\d+): the \w+ loss is nan") as info:
        adapt(cfg, log=lambda s: None)
    bad = int(str(info.value).split()[1].rstrip(":"))
    kept = _load(tmp_path / "run" / "latest.pth")
    assert kept["meta"]["iter"] == bad - 1 and "latest.pth stays" in str(info.value)


@pytest.mark.parametrize("arch,recipe", [("daformer_mitb5", "daformer"), ("daformer_r101", "daformer"),
                                         ("hrda_mitb5", "hrda")])
def test_one_step_of_the_real_networks_trains_every_parameter(arch, recipe):
    torch.set_num_threads(1)
    src, tgt = SyntheticDataset("game", "train", 2, size=(64, 64)), SyntheticDataset("city", "train", 2, size=(64, 64))
    r = get_recipe(recipe, batch_size=1, ignore_top=4, ignore_bottom=8, rcs=False,
                   fd_classes=tuple(range(19)))     # every class, so the distance reaches the backbone on any crop
    tr = Trainer(AdaptConfig(src, tgt, arch=arch, recipe=r, source_crop=WHOLE, target_crop=WHOLE, progress=False))
    state = tr.step(0)
    assert set(state["losses"]) == {"source", "fd", "pseudo"}
    assert all(torch.isfinite(v) for v in state["losses"].values())
    missing = [n for n, p in tr.model.named_parameters() if p.requires_grad and
               (p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum() > 0)]
    assert missing == []
    assert tr.teacher is not None and tr.imnet is not None
    assert all(p.grad is None and not p.requires_grad for net in (tr.teacher, tr.imnet) for p in net.parameters())


def test_hrda_mic_under_bf16_autocast_trains_and_validates(tmp_path):
    """The HRDA path end to end (multi-resolution crops, fused sliding-window pseudo-labels, slide
    validation) under CPU bf16 autocast, the logic CUDA AMP runs."""
    torch.set_num_threads(1)
    cfg = _config(tmp_path / "h", arch="tiny_hrda_r", recipe="hrda", iters=2, amp="bf16",
                  val=SyntheticDataset("night", "val", 2, size=(32, 64)), val_every=2)
    cfg.val_mode = "whole"
    result = adapt(cfg, log=lambda s: None)
    last = result.records[-1]
    assert all(torch.isfinite(torch.tensor(last[k])) for k in ("loss_source", "loss_fd", "loss_pseudo", "loss_mic"))
    assert 0 <= result.validation[-1]["val"]["miou"] <= 100
    ck = _load(tmp_path / "h" / "latest.pth")
    assert any(k.startswith("model.decode_head.scale_attention.") for k in ck["state_dict"])

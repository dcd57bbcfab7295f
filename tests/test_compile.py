"""``adapt --compile``: the compiled iteration computes what the eager one computes, each compiled
part is traced once (no recompile per iteration: the per-iteration random draws, boxes and
learning rates stay outside the graphs), the only graph break is the stochastic-depth draw that
is kept eager on purpose, every variant (student, teacher, ImageNet copy, validation) is
compiled rather than left eager by dynamo's recompile limit, and the checkpoints keep their keys.

On the CPU the graphs run through ``aot_eager`` (dynamo's capture and AOT autograd's forward and
backward graphs, without inductor's code generation, which takes minutes on two cores); a CUDA
run with inductor and CUDA graphs (``reduce-overhead``) runs when a GPU is present."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch._dynamo
import torch._dynamo.utils

from domainmerge.cli import main
from domainmerge.data.synthetic import SyntheticDataset
from domainmerge.data.training import CropConfig
from domainmerge.errors import UserError
from domainmerge.evaluation import evaluate_model
from domainmerge.training import AdaptConfig, get_recipe
from domainmerge.training.adapt import LossLog, Trainer

WHOLE = CropConfig(None, None)
# the module (the package's name 'adapt' is the function)
adapt_module = importlib.import_module("domainmerge.training.adapt")


def _trainer(arch: str, recipe: str, compile: bool | str, device: str = "cpu", blocks: bool = False,
             amp: str | None = None) -> Trainer:
    src = SyntheticDataset("game", "train", 6, size=(64, 64))
    tgt = SyntheticDataset("night", "train", 6, size=(64, 64))
    r = get_recipe(recipe, mic=True, iters=4, batch_size=2, warmup_iters=2, ignore_top=2, ignore_bottom=4,
                   rcs_min_pixels=20)
    return Trainer(AdaptConfig(src, tgt, arch=arch, recipe=r, source_crop=WHOLE, target_crop=WHOLE, device=device,
                               progress=False, compile=compile, compile_blocks=blocks, amp=amp,
                               arch_options={"dropout": 0.0}),
                   log=lambda s: None)


def _graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _run(tr: Trainer, iters: range, after_first=None) -> list[dict]:
    log = LossLog(1, 4)
    for it in iters:
        log.add(it, tr.step(it))
        tr.update(it)
        if after_first is not None and it == iters[0]:
            after_first()
    return log.flush()


@pytest.mark.parametrize("arch,recipe", [("tiny_daformer_mit", "daformer"), ("tiny_hrda_r", "hrda")])
def test_a_compiled_iteration_equals_the_eager_one_and_compiles_once(arch, recipe, monkeypatch):
    """MiT (stochastic depth drawn per iteration) with DAFormer, and HRDA (context and detail
    views, boxes drawn per iteration) with MIC: 3 iterations eager and compiled."""
    monkeypatch.setattr(adapt_module, "COMPILE_BACKEND", "aot_eager")
    torch.set_num_threads(1)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager_tr = _trainer(arch, recipe, False)
    eager = _run(eager_tr, range(3))
    assert _graphs() == 0
    compiled_tr = _trainer(arch, recipe, True)
    first: list[int] = []
    compiled = _run(compiled_tr, range(3), after_first=lambda: first.append(_graphs()))
    assert first[0] > 0, "nothing was compiled"
    assert _graphs() == first[0], "a later iteration compiled again (a guard on a per-iteration value)"
    breaks = torch._dynamo.utils.counters["graph_break"]
    assert all("_path_divisors" in reason for reason in breaks), list(breaks)
    # validation as adapt runs it (eval mode, no grad, HRDA's slide windows): more variants of the
    # same forward code (the HRDA head's: 9), every one compiled, none left eager by a limit
    evaluate_model(compiled_tr.model, SyntheticDataset("night", "val", 2, size=(64, 64)),
                   mode="slide" if recipe == "hrda" else "whole", crop=(32, 32), stride=(16, 16), progress=False)
    frames = torch._dynamo.utils.counters["frames"]
    assert frames["total"] == frames["ok"] and not torch._dynamo.utils.counters["unimplemented"], \
        dict(torch._dynamo.utils.counters["unimplemented"])
    # AOT autograd decomposes a few operators (layer norm, GELU backward) into others, which round
    # differently: float32 agreement to a few ulps, amplified by nothing in 3 iterations' losses
    for a, b in zip(eager, compiled, strict=True):
        for k in a:
            if k.startswith("loss_") or k == "pseudo_weight":
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (a["iter"], k)
    es, cs = eager_tr.model.state_dict(), compiled_tr.model.state_dict()
    assert list(es) == list(cs)   # in-place compile: the checkpoint keys do not change
    for k, v in es.items():
        # AdamW moves each weight by up to lr (6e-5 x 10 for the head) per iteration whatever the
        # gradient's size: a gradient that is zero up to rounding may step the other way
        torch.testing.assert_close(cs[k], v, rtol=1e-5, atol=4e-4, msg=k)


def test_block_by_block_compiles_one_graph_per_stage_whatever_the_depth_and_equals_eager(monkeypatch):
    """``compile_blocks``: MiT-B0 (2 blocks per stage, each with its own stochastic-depth rate) compiles
    as many graphs as the tiny MiT (1 block per stage): the blocks of a stage share theirs (nothing
    guards on a block's rate); no graph breaks (the draw runs in the eager loop between blocks);
    the losses are the eager iteration's."""
    monkeypatch.setattr(adapt_module, "COMPILE_BACKEND", "aot_eager")
    torch.set_num_threads(1)
    graphs = {}
    for arch in ("tiny_daformer_mit", "daformer_mitb0"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        tr = _trainer(arch, "daformer", False, blocks=True)
        assert tr.compile == "default"   # compile_blocks implies compile
        compiled = _run(tr, range(2), after_first=lambda arch=arch: graphs.setdefault(arch, _graphs()))
        assert _graphs() == graphs[arch], "a later iteration compiled again"
        assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert graphs["tiny_daformer_mit"] == graphs["daformer_mitb0"] > 0, graphs
    eager = _run(_trainer("daformer_mitb0", "daformer", False), range(2))
    for a, b in zip(eager, compiled, strict=True):
        for k in a:
            if k.startswith("loss_") or k == "pseudo_weight":
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (a["iter"], k)


def test_reduce_overhead_keeps_gradients_in_fixed_buffers_and_validates_eagerly(monkeypatch):
    """What CUDA graphs need from the loop, checked on the CPU (where inductor leaves the graphs
    out and aot_eager ignores the mode): the 3 backward passes of an HRDA + MIC iteration
    accumulate into .grad buffers made before any graph and never replaced (a graph's own
    gradient outputs are freed at the next graph step), with the eager iteration's losses; and
    validation, which chains compiled parts without a backward pass, runs eagerly."""
    monkeypatch.setattr(adapt_module, "COMPILE_BACKEND", "aot_eager")
    torch.set_num_threads(1)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = _run(_trainer("tiny_hrda_r", "hrda", False), range(3))
    tr = _trainer("tiny_hrda_r", "hrda", "reduce-overhead")
    buffers = {name: p.grad for name, p in tr.model.named_parameters()}
    assert all(g is not None and not g.any() for g in buffers.values())
    compiled = _run(tr, range(3))
    assert all(p.grad is buffers[name] for name, p in tr.model.named_parameters())
    for a, b in zip(eager, compiled, strict=True):
        for k in a:
            if k.startswith("loss_") or k == "pseudo_weight":
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (a["iter"], k)
    graphs = _graphs()
    with tr.validation_stance():
        evaluate_model(tr.model, SyntheticDataset("night", "val", 2, size=(64, 64)), mode="slide", crop=(32, 32),
                       stride=(16, 16), progress=False)
    assert _graphs() == graphs, "validation compiled graphs of its own"
    tr.model.train()


@pytest.mark.parametrize("arch,recipe,mode,blocks", [("tiny_daformer_mit", "daformer", "default", True),
                                                     ("tiny_hrda_r", "hrda", "reduce-overhead", False)])
def test_bf16_compiled_parts_run_on_the_grad_shadows_leaves_and_equal_eager(arch, recipe, mode, blocks, monkeypatch):
    """Under bf16 the compiled student runs on the GradShadow's bf16 leaves (the casts leave its
    graphs): traced once for them (the leaves are the same tensors every iteration), no graph
    break beyond the stochastic-depth draw, the eager iteration's losses, and with
    reduce-overhead the 3 passes' gradients still land in the fixed float32 buffers."""
    monkeypatch.setattr(adapt_module, "COMPILE_BACKEND", "aot_eager")
    torch.set_num_threads(1)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = _run(_trainer(arch, recipe, False, amp="bf16"), range(3))
    tr = _trainer(arch, recipe, mode, blocks=blocks, amp="bf16")
    assert tr.grad_shadow is not None
    buffers = {name: p.grad for name, p in tr.model.named_parameters()}
    first: list[int] = []
    compiled = _run(tr, range(3), after_first=lambda: first.append(_graphs()))
    assert first[0] > 0 and _graphs() == first[0], "a later iteration compiled again"
    breaks = torch._dynamo.utils.counters["graph_break"]
    assert all("_path_divisors" in reason for reason in breaks), list(breaks)
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())
    if mode == "reduce-overhead":
        assert all(p.grad is buffers[name] for name, p in tr.model.named_parameters())
    for a, b in zip(eager, compiled, strict=True):
        for k in a:
            if k.startswith("loss_") or k == "pseudo_weight":
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (a["iter"], k)


def test_an_unknown_compile_mode_is_one_line_before_any_work(tmp_path, capsys):
    with pytest.raises(UserError, match="use one of default, reduce-overhead"):
        _trainer("tiny_daformer_r", "daformer", "fastest")
    capsys.readouterr()
    assert main(["adapt", "--arch", "tiny_daformer_r", "--device", "cpu", "--source", "synthetic", "game",
                 "--target", "synthetic", "city", "--out", str(tmp_path / "run"), "--compile", "fastest"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--compile" in err and "reduce-overhead" in err, err
    assert not (tmp_path / "run").exists()


def test_the_command_passes_its_speed_options_to_the_library(tmp_path, monkeypatch):
    import domainmerge.training

    seen = []
    result = adapt_module.AdaptResult({}, None, [], [], 0, None)
    monkeypatch.setattr(domainmerge.training, "adapt", lambda config: seen.append(config) or result)
    base = ["adapt", "--arch", "tiny_daformer_r", "--device", "cpu", "--source", "synthetic", "game",
            "--target", "synthetic", "city", "--out", str(tmp_path / "run")]
    for extra, mode, blocks in (([], False, False), (["--compile-blocks"], False, True),
                                (["--compile", "reduce-overhead", "--compile-blocks"], "reduce-overhead", True),
                                (["--compile"], "default", False)):
        assert main(base + extra) == 0
        assert (seen[-1].compile, seen[-1].compile_blocks) == (mode, blocks), extra
    assert main(base + ["--one-pass"]) == 0 and seen[-1].one_pass and not seen[0].one_pass


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_cuda_iterations_equal_eager_ones(mode):
    """inductor's kernels (and, with reduce-overhead, their CUDA graphs, replayed into memory that
    the next iteration reuses) against eager CUDA iterations, fp32 without TF32."""
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        torch._dynamo.reset()
        runs = [_run(_trainer("tiny_daformer_mit", "daformer", c, "cuda"), range(4)) for c in (False, mode)]
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    for a, b in zip(*runs, strict=True):
        for k in a:
            if k.startswith("loss_") or k == "pseudo_weight":
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["iter"], k)

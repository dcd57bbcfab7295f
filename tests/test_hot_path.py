"""The training iteration's fast paths against their plain forms: the multi-tensor EMA against a
per-parameter loop, MiT's fused attention against the explicit softmax, the deferred loss check
(values read every few iterations) against the per-iteration one, and, when CUDA is present, a
few iterations on the GPU against the same iterations on the CPU."""

from __future__ import annotations

import contextlib
import math
import traceback
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from domainmerge.data.synthetic import SyntheticDataset
from domainmerge.data.training import CropConfig
from domainmerge.errors import UserError
from domainmerge.evaluation import inference
from domainmerge.models import build_model
from domainmerge.models.mit import Attention, DropPath, DWConv, grid_tokens, path_divisors, token_grid
from domainmerge.tensors import normalize
from domainmerge.training import AdaptConfig, adapt, get_recipe
from domainmerge.training.adapt import LossLog, NonFiniteLoss, Trainer
from domainmerge.training.ema import ema_update
from domainmerge.training.shadows import CastShadow

WHOLE = CropConfig(None, None)


def test_foreach_ema_equals_the_per_parameter_loop_bit_for_bit():
    torch.manual_seed(0)
    student, teacher = build_model("tiny_daformer_mit"), build_model("tiny_daformer_mit")
    hand = [t.detach().clone() for t in teacher.parameters()]
    for it, alpha in ((0, 0.999), (3, 0.999), (5000, 0.999), (7, 0.5)):
        a = ema_update(teacher, student, alpha, it)
        assert a == min(1 - 1 / (it + 1), alpha)
        for t, s in zip(hand, student.parameters()):
            t.mul_(a).add_(s.detach(), alpha=1 - a)
    for t, h in zip(teacher.parameters(), hand):
        assert torch.equal(t, h)


def test_mit_attention_equals_the_explicit_softmax_attention():
    torch.manual_seed(0)
    for sr in (1, 2):
        attn = Attention(64, 2, sr_ratio=sr).eval()
        n, h, w, c, heads = 2, 6, 8, 64, 2
        x = torch.randn(n, h * w, c)
        # SegFormer's formulation: softmax(q k^T * d^-0.5) v per head, keys/values from the
        # spatially reduced grid (conv of stride sr, then LayerNorm)
        q = F.linear(x, attn.q.weight, attn.q.bias).reshape(n, h * w, heads, c // heads).transpose(1, 2)
        src = x
        if sr > 1:
            grid = F.conv2d(x.transpose(1, 2).reshape(n, c, h, w), attn.sr.weight, attn.sr.bias, stride=sr)
            src = F.layer_norm(grid.flatten(2).transpose(1, 2), (c,), attn.norm.weight, attn.norm.bias)
        kv = F.linear(src, attn.kv.weight, attn.kv.bias)
        k, v = kv[..., :c], kv[..., c:]
        k = k.reshape(n, -1, heads, c // heads).transpose(1, 2)
        v = v.reshape(n, -1, heads, c // heads).transpose(1, 2)
        weights = torch.softmax(q @ k.transpose(-2, -1) * (c // heads) ** -0.5, dim=-1)
        expected = F.linear((weights @ v).transpose(1, 2).reshape(n, h * w, c), attn.proj.weight, attn.proj.bias)
        # float32 sums of 64-term products in another order: a few ulps of values of order 1
        torch.testing.assert_close(attn(x, h, w), expected, rtol=1e-5, atol=1e-5)


def test_mit_convolutions_read_the_tokens_in_place_and_equal_segformers_transpose_reshape():
    """The depthwise conv of Mix-FFN and the reduction conv of attention read the tokens [N, h*w, C]
    as a channels-last image (a view) instead of SegFormer's copy ``x.transpose(1, 2).reshape``;
    outputs and input gradients agree with that form (a 3x3 or sr x sr sum in another order:
    float32 rounding)."""
    torch.manual_seed(0)
    n, h, w, c = 2, 6, 10, 32
    x = torch.randn(n, h * w, c, requires_grad=True)
    grid = token_grid(x, h, w)
    assert grid.data_ptr() == x.data_ptr() and grid.is_contiguous(memory_format=torch.channels_last)
    dw, sr = DWConv(c), torch.nn.Conv2d(c, c, 2, stride=2)
    for conv, ours in ((dw.dwconv, lambda t: dw(t, h, w)), (sr, lambda t: grid_tokens(sr(token_grid(t, h, w))))):
        segformer = conv(x.transpose(1, 2).reshape(n, c, h, w)).flatten(2).transpose(1, 2)
        got = ours(x)
        torch.testing.assert_close(got, segformer, rtol=1e-5, atol=1e-6)
        g = torch.randn_like(got)
        (want_grad,) = torch.autograd.grad(segformer, x, g)
        (got_grad,) = torch.autograd.grad(got, x, g)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)


def test_stochastic_depth_by_divisors_equals_timms_mask_and_scale_bit_for_bit():
    """One division by keep-or-infinity per branch (divisors of all blocks made at once) against
    timm's ``x / keep * floor(keep + u)``, forward and backward, float32."""
    torch.manual_seed(0)
    rates = [0.0, 0.05, 0.1, 0.3]
    u = torch.rand(6, len(rates), 2)
    keep = (1.0 - torch.tensor(rates, dtype=torch.float64)).float()
    divisors = path_divisors(keep, u)
    assert divisors.shape == (6, len(rates), 2)
    for k, p in enumerate(rates):
        drop = DropPath(p).train()
        for branch in range(2):
            x = torch.randn(6, 5, 8, requires_grad=True)
            grad = torch.randn(6, 5, 8)
            mask = torch.floor((1.0 - p) + u[:, k, branch]).view(-1, 1, 1)
            expected = x / (1.0 - p) * mask if p > 0 else x
            (expected_grad,) = torch.autograd.grad(expected, x, grad)
            got = drop(x, divisor=divisors[:, k, branch])
            (got_grad,) = torch.autograd.grad(got, x, grad)
            assert torch.equal(got, expected) and torch.equal(got_grad, expected_grad), (p, branch)
            assert torch.equal(drop(x, u[:, k, branch]), expected)   # the per-call form agrees


@pytest.mark.parametrize("arch", ["tiny_daformer_r", "tiny_hrda_r", "tiny_daformer_mit"])
def test_a_cast_shadow_gives_autocasts_outputs_to_the_bit_and_updates_the_nets_batchnorm(arch):
    """The teacher's forward under bf16 autocast through its CastShadow equals the forward of the
    teacher itself (autocast casting its float32 weights), also after the weights change and the
    shadow is refreshed; BatchNorm in training mode updates the teacher's own statistics."""
    torch.manual_seed(0)
    net, twin = build_model(arch, dropout=0.0), build_model(arch, dropout=0.0)
    twin.load_state_dict(net.state_dict())
    net.train(), twin.train()
    for m in [*net.modules(), *twin.modules()]:   # the teacher's stochastic depth is off
        if isinstance(m, DropPath):
            m.eval()
    shadow = CastShadow(net, torch.bfloat16)
    assert all(c.dtype == torch.bfloat16 for c in shadow.casts) and len(shadow.casts) > 0
    x = torch.randn(2, 3, 64, 64)
    for step in range(2):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            got, expected = shadow.module(x), twin(x)
        assert torch.equal(got, expected), step
        for name, b in twin.named_buffers():
            assert torch.equal(dict(net.named_buffers())[name], b), (step, name)
        with torch.no_grad():   # an EMA-like change of every parameter
            for p, q in zip(net.parameters(), twin.parameters()):
                p.mul_(0.9).add_(0.01)
                q.copy_(p)
        shadow.refresh()


class _WeightCasts(TorchDispatchMode):
    """Counts bf16 casts (``aten::_to_copy``) of the given weights, the multi-tensor copies from
    them, and every cast of a bf16 tensor to float32 (the backward passes' gradient casts)."""

    def __init__(self, weights):
        super().__init__()
        self.ptrs, self.count, self.foreach, self.to_float = {w.data_ptr() for w in weights}, 0, 0, 0
        self.multi: dict[str, int] = {}   # every multi-tensor operator

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16 \
                and args[0].data_ptr() in self.ptrs:
            self.count += 1
        if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.float32 \
                and args[0].dtype == torch.bfloat16:
            self.to_float += 1
        if func is torch.ops.aten._foreach_copy_.default and args[1][0].data_ptr() in self.ptrs:
            self.foreach += 1
        if func.__name__.startswith("_foreach_"):
            self.multi[func.__name__] = self.multi.get(func.__name__, 0) + 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("arch,recipe", [("tiny_daformer_mit", "daformer"), ("tiny_hrda_r", "hrda")])
def test_an_iteration_casts_each_student_weight_once_with_the_gradients_of_a_cast_per_forward(arch, recipe,
                                                                                            monkeypatch):
    """Under bf16 autocast the iteration's 3 student forwards (source, ClassMix, MIC) share one cast
    of each weight, made by one multi-tensor copy into the GradShadow's leaves, whose gradients
    reach the float32 ones by multi-tensor operators, not a cast per weight and backward pass.
    The losses and the gradients equal, to the bit, those of the plain form, where each forward
    is an autocast region of its own and casts every weight again (3 casts each, and 3 casts of
    each weight's gradient), and those of the cast-once region alone (1 cast, still 3 of the
    gradient)."""
    torch.set_num_threads(1)
    src, tgt = SyntheticDataset("game", "train", 6, size=(64, 64)), SyntheticDataset("night", "train", 6, size=(64, 64))
    r = get_recipe(recipe, mic=True, iters=4, batch_size=2, warmup_iters=2, ignore_top=2, ignore_bottom=4,
                   rcs_min_pixels=20)
    runs = {}
    for form in ("shadow", "region", "plain"):
        tr = Trainer(AdaptConfig(src, tgt, arch=arch, recipe=r, source_crop=WHOLE, target_crop=WHOLE, progress=False,
                                 amp="bf16", arch_options={"dropout": 0.0}), log=lambda s: None)
        assert tr.grad_shadow is not None
        shadowed = len(tr.grad_shadow.slots)
        if form != "shadow":
            tr.grad_shadow = None
        if form == "plain":
            monkeypatch.setattr(tr, "cast_once", contextlib.nullcontext)
        cast = [p for m in tr.model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
                for p in m.parameters()]   # what autocast casts: conv and linear weights and biases
        tr.step(0)
        tr.update(0)
        with _WeightCasts(cast) as casts:
            state = tr.step(1)
        assert all(p.dtype == torch.float32 for p in tr.model.parameters())   # the parameters are back
        runs[form] = state["losses"], [p.grad.clone() for p in tr.model.parameters()], casts
    n = len(cast)
    assert shadowed == n
    shadow, region, plain = (runs[f][2] for f in ("shadow", "region", "plain"))
    assert (shadow.count, shadow.foreach, region.count, region.foreach, plain.count) == (0, 1, n, 0, 3 * n)
    assert region.to_float - shadow.to_float == 3 * n and plain.to_float == region.to_float
    # the casts, then per backward pass a copy of the gradients (from the second pass on a copy
    # into scratch and an add, and an add of the norms' gradients): multi-tensor operators
    assert shadow.multi == {"_foreach_copy_.default": 1 + 3, "_foreach_add_.List": 2 + 2}, shadow.multi
    assert region.multi == plain.multi == {}
    losses, grads, _ = runs["shadow"]
    assert set(losses) == {"source", "fd", "pseudo", "mic"}
    for form in ("region", "plain"):
        for k in losses:
            assert torch.equal(losses[k], runs[form][0][k]), (form, k)
        for g, h in zip(grads, runs[form][1], strict=True):
            assert torch.equal(g, h), form


@pytest.mark.parametrize("arch,recipe,size", [("tiny_hrda_mit", "hrda", (64, 128)),
                                              ("tiny_daformer_r", "daformer", (64, 64))])
def test_one_pass_with_the_grad_shadow_gives_autocasts_gradients_to_the_bit(arch, recipe, size):
    """``one_pass`` under bf16: one forward, in which the heads run per view (and HRDA's on the
    context and the detail features) on the same cast of each weight. Through the GradShadow's
    leaves the losses and the float32 gradients are autocast's own, to the bit."""
    torch.set_num_threads(1)
    src, tgt = SyntheticDataset("game", "train", 6, size=size), SyntheticDataset("night", "train", 6, size=size)
    r = get_recipe(recipe, mic=True, iters=4, batch_size=2, warmup_iters=2, ignore_top=2, ignore_bottom=4,
                   rcs_min_pixels=20, pseudo_threshold=0.0, pseudo_margins=None)
    runs = []
    for shadow in (True, False):
        tr = Trainer(AdaptConfig(src, tgt, arch=arch, recipe=r, source_crop=WHOLE, target_crop=WHOLE, progress=False,
                                 amp="bf16", one_pass=True), log=lambda s: None)
        assert tr.grad_shadow is not None
        if not shadow:
            tr.grad_shadow = None
        state = tr.step(0)
        runs.append((state["losses"], {n: p.grad for n, p in tr.model.named_parameters()}))
    (losses, grads), (plain_losses, plain_grads) = runs
    assert float(losses["mic"]) > 0
    assert all(torch.equal(v, plain_losses[k]) for k, v in losses.items())
    assert grads.keys() == plain_grads.keys() and all(torch.equal(g, plain_grads[n]) for n, g in grads.items())


def test_grad_shadow_in_small_scratch_chunks_keeps_the_gradients_and_their_layout(monkeypatch):
    """3 backward passes through a channels-last convolution and linear layers, the scratch cut to
    50 elements (a chunk per tensor or two): the float32 gradients equal those of autocast's
    cached casts to the bit, in the parameters' own strides."""
    from domainmerge.runtime.precision import cast_once
    from domainmerge.training import shadows

    monkeypatch.setattr(shadows, "SCRATCH_ELEMENTS", 50)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(64, 6),
                              torch.nn.GELU(), torch.nn.Linear(6, 6))
    net[0].to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 6, 6)
    runs = []
    for shadow in (shadows.GradShadow(net, torch.bfloat16), None):
        for p in net.parameters():
            p.grad = None
        with shadow.swapped() if shadow is not None else cast_once(torch.device("cpu"), "bf16"):
            for k in range(3):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y = net(x * (k + 1))
                y.float().square().sum().backward()
                if shadow is not None:
                    shadow.collect()
        runs.append([p.grad.clone(memory_format=torch.preserve_format) for p in net.parameters()])
    assert all(p.grad.stride() == p.stride() for p in net.parameters())
    assert net[0].weight.grad.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_bf16_evaluation_casts_each_weight_once_and_predicts_what_a_cast_per_forward_predicts(monkeypatch):
    """evaluate_model under bf16 (HRDA slide windows, one image per forward): the weights are cast
    for the first forward only, and every predicted label map equals, to the pixel, the plain
    form's, where each forward is an autocast region of its own and casts every weight again."""
    torch.manual_seed(0)
    model = build_model("tiny_hrda_r", num_classes=19).eval()
    val = SyntheticDataset("night", "val", 3, size=(64, 64))
    weights = [p for p in model.parameters() if p.dim() > 1]
    runs = {}
    for once in (True, False):
        if not once:
            monkeypatch.setattr(inference, "cast_once", lambda device, amp: contextlib.nullcontext())
        preds: list[torch.Tensor] = []
        with _WeightCasts(weights) as casts:
            inference.evaluate_model(model, val, mode="slide", crop=(32, 32), stride=(16, 16), batch_size=1,
                                     amp="bf16", workers=0, progress=False,
                                     on_prediction=lambda name, pred, preds=preds: preds.append(pred))
        runs[once] = preds, casts.count
    (preds, count), (plain_preds, plain_count) = runs[True], runs[False]
    assert count == len(weights) and plain_count == 3 * len(weights), (count, plain_count, len(weights))
    assert len(preds) == 3 and all(torch.equal(a, b) for a, b in zip(preds, plain_preds))


@pytest.mark.parametrize("arch,recipe,size,student_calls", [("tiny_daformer_mit", "daformer", (64, 64), 1),
                                                           ("tiny_hrda_mit", "hrda", (64, 128), 1),
                                                           ("tiny_daformer_r", "daformer", (64, 64), 3)])
def test_one_pass_gives_the_gradients_of_a_backward_per_view(arch, recipe, size, student_calls):
    """``one_pass``: the source, ClassMix and MIC views in one forward (MiT: one backbone call for
    all of them, HRDA's context views and detail crops included; ResNet: a call per view, its
    BatchNorm normalising each view alone) and one backward of the losses' sum. Against the
    authors' form, a forward and a backward per view: the same losses and, after one iteration,
    the same gradients up to the order of float32 sums (dropout on: the heads draw in the same
    order)."""
    torch.set_num_threads(1)
    src, tgt = SyntheticDataset("game", "train", 6, size=size), SyntheticDataset("night", "train", 6, size=size)
    # threshold 0 and no margins: every pseudo-label counts, so the ClassMix and MIC losses carry
    # gradients (HRDA's margins of the stored image would cover these small images)
    r = get_recipe(recipe, mic=True, iters=4, batch_size=2, warmup_iters=2, ignore_top=2, ignore_bottom=4,
                   rcs_min_pixels=20, pseudo_threshold=0.0, pseudo_margins=None)
    runs = {}
    for one_pass in (False, True):
        tr = Trainer(AdaptConfig(src, tgt, arch=arch, recipe=r, source_crop=WHOLE, target_crop=WHOLE, progress=False,
                                 one_pass=one_pass), log=lambda s: None)
        calls: list[int] = []
        tr.model.backbone.register_forward_hook(lambda *args, calls=calls: calls.append(1))
        state = tr.step(0)
        runs[one_pass] = state["losses"], {n: p.grad.clone() for n, p in tr.model.named_parameters()}, len(calls)
    (losses, grads, calls_per_view), (one_losses, one_grads, one_calls) = runs[False], runs[True]
    assert set(losses) == set(one_losses) >= {"source", "pseudo", "mic"} and float(losses["mic"]) > 0
    assert one_calls == student_calls and calls_per_view == 3   # HRDA MiT: context and detail in one call
    for k, v in losses.items():
        torch.testing.assert_close(one_losses[k], v, rtol=1e-5, atol=1e-7, msg=k)
    for name, g in grads.items():
        # sums of a few thousand float32 terms in another order: 1e-5 of the tensor's scale
        torch.testing.assert_close(one_grads[name], g, rtol=0, atol=1e-5 * max(float(g.abs().max()), 1e-8),
                                   msg=name)


def test_normalize_caches_its_constants_per_device_and_keeps_the_formula():
    images = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    assert torch.equal(normalize(images), (images.float() - mean) / std)
    assert torch.equal(normalize(images), (images.float() - mean) / std)   # from the cache
    assert normalize(images.to("meta")).device.type == "meta"


def test_loss_log_names_the_first_bad_iteration_of_a_window():
    log = LossLog(world=1, images_per_iter=4)
    for it, value in enumerate([1.0, 2.0, math.inf, math.nan]):
        log.add(it, {"losses": {"source": torch.tensor(value), "pseudo": torch.tensor(0.5)}, "lr": 0.1,
                     "pseudo_weight": torch.tensor(0.25, dtype=torch.float64)})
    with pytest.raises(NonFiniteLoss, match=r"iteration 3: the source loss is inf"):
        log.flush()
    log.add(4, {"losses": {"source": torch.tensor(1.5)}, "lr": 0.2, "pseudo_weight": None})
    (record,) = log.flush()
    assert record["iter"] == 5 and record["loss_source"] == 1.5 and "pseudo_weight" not in record
    assert log.flush() == []


def _config(out, **kw):
    src, tgt = SyntheticDataset("game", "train", 6, size=(32, 64)), SyntheticDataset("night", "train", 6, size=(32, 64))
    # a learning rate that grows from 1e-3 to 1e3 over the warm-up: the losses go NaN a few
    # iterations in (at iteration 8 on the machines tried), after some good checkpoints
    r = get_recipe("daformer", mic=False, iters=20, batch_size=2, warmup_iters=10, warmup_ratio=1e-6,
                   ignore_top=2, ignore_bottom=4, rcs_min_pixels=20, lr=1e3)
    return AdaptConfig(src, tgt, out=out, arch=kw.pop("arch", "tiny_daformer_r"), recipe=r, source_crop=WHOLE,
                       target_crop=WHOLE, progress=False, **kw)


def _bad_iteration(err: pytest.ExceptionInfo[UserError]) -> int:
    return int(str(err.value).split()[1].rstrip(":"))


def test_a_nan_found_at_the_next_log_still_names_its_iteration_and_no_checkpoint_holds_it(tmp_path):
    """Losses are read every log_every iterations; the error names the first non-finite one (as a
    check every iteration does) and every checkpoint written is of a good state (checked before
    each save, so a save between the NaN and the next log cannot write it): the last one is the
    last save before the bad iteration."""
    torch.set_num_threads(1)
    with pytest.raises(UserError, match=r"iteration \d+: the \w+ loss is nan") as every:
        adapt(_config(tmp_path / "a", save_every=100, log_every=1), log=lambda s: None)
    with pytest.raises(UserError, match=r"iteration \d+: the \w+ loss is nan") as windowed:
        adapt(_config(tmp_path / "b", save_every=3, log_every=7), log=lambda s: None)
    bad = _bad_iteration(every)
    assert _bad_iteration(windowed) == bad and bad > 4   # found at the save before it or at iteration 7
    kept = torch.load(tmp_path / "b" / "latest.pth", map_location="cpu", weights_only=True)
    assert kept["meta"]["iter"] == (bad - 1) // 3 * 3


@pytest.mark.cuda
@pytest.mark.parametrize("arch,recipe,channels_last", [("tiny_daformer_r", "daformer", False),
                                                       ("tiny_daformer_r", "daformer", True),
                                                       ("tiny_daformer_mit", "daformer", False),
                                                       ("tiny_hrda_r", "hrda", False)])
def test_cuda_iterations_equal_the_cpu_ones_to_float_rounding(arch, recipe, channels_last):
    """fp32, TF32 off, dropout off (its draws differ per device): the same samples, augmentation
    and pseudo-labels, so losses and weights agree to float rounding after a few iterations
    (fused AdamW, pinned copies, and with channels_last NHWC convolutions on the GPU)."""
    torch.set_num_threads(1)
    results = {}
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for device in ("cpu", "cuda"):
            src = SyntheticDataset("game", "train", 6, size=(64, 64))
            tgt = SyntheticDataset("night", "train", 6, size=(64, 64))
            r = get_recipe(recipe, mic=True, iters=3, batch_size=2, warmup_iters=2, ignore_top=2, ignore_bottom=4,
                           rcs_min_pixels=20)
            results[device] = adapt(AdaptConfig(src, tgt, arch=arch, arch_options={"dropout": 0.0}, recipe=r,
                                                source_crop=WHOLE, target_crop=WHOLE, device=device, progress=False,
                                                log_every=1, channels_last=channels_last), log=lambda s: None)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    cpu, gpu = results["cpu"], results["cuda"]
    for a, b in zip(cpu.records, gpu.records):
        for k in a:
            if k.startswith("loss_") or k == "pseudo_weight":
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["iter"], k)
    for name, nets in (("student", (cpu.student, gpu.student)), ("teacher", (cpu.teacher, gpu.teacher))):
        for k, v in nets[0].items():
            # AdamW steps of 1e-4 x lr-scale per parameter: a gradient that is zero up to
            # rounding may take a different sign, hence the absolute part
            torch.testing.assert_close(nets[1][k], v, rtol=1e-4, atol=1e-4, msg=f"{name} {k}")


@pytest.mark.cuda
@pytest.mark.parametrize("arch,recipe,amp", [("tiny_daformer_r", "daformer", None), ("tiny_hrda_r", "hrda", None),
                                             ("tiny_daformer_mit", "daformer", "bf16")])
def test_a_cuda_iteration_does_not_wait_for_the_gpu(arch, recipe, amp):
    """Between two log points an iteration (step and update) makes no host-device synchronisation:
    torch's sync debug mode warns on any (a .item(), a boolean index, a blocking copy); the
    warnings name the lines that synchronised."""
    src, tgt = SyntheticDataset("game", "train", 6, size=(64, 64)), SyntheticDataset("night", "train", 6, size=(64, 64))
    r = get_recipe(recipe, mic=True, iters=4, batch_size=2, warmup_iters=2, ignore_top=2, ignore_bottom=4,
                   rcs_min_pixels=20)
    tr = Trainer(AdaptConfig(src, tgt, arch=arch, recipe=r, source_crop=WHOLE, target_crop=WHOLE, device="cuda",
                             progress=False, amp=amp))   # bf16: the cast shadows, MiT: stochastic depth
    log = LossLog(1, 4)
    log.add(0, tr.step(0))   # the first iteration builds caches (cuDNN plans) and may synchronise
    tr.update(0)
    torch.cuda.synchronize()
    syncs: set[str] = set()

    def record(message, *args, **kwargs):   # where in domainmerge each synchronising call was made
        if "synchroniz" in str(message):
            frames = [f for f in traceback.extract_stack() if "domainmerge" in f.filename]
            syncs.add(" < ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames[-3:])))

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            for it in (1, 2):
                log.add(it, tr.step(it))
                tr.update(it)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert not syncs, f"host syncs at {sorted(syncs)}"
    assert [x["iter"] for x in log.flush()] == [1, 2, 3]

"""Self-training ingredients against their formulas, computed by hand (numpy) in the tests."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from domainmerge.errors import UserError
from domainmerge.models import build_model
from domainmerge.training import get_recipe
from domainmerge.training.augment import mix, sample_generator
from domainmerge.training.ema import ema_update
from domainmerge.training.hrda import crop_to, detail_box, fuse
from domainmerge.training.init import reset_head
from domainmerge.training.mic import block_masks
from domainmerge.training.schedule import build_optimizer, lr_factor
from domainmerge.training.selftrain import feature_distance, pseudo_labels, pseudo_weight, weighted_ce


def test_recipes_carry_the_authors_values():
    d, h, m = get_recipe("daformer"), get_recipe("hrda"), get_recipe("hrda", mic=True)
    assert (d.lr, d.head_lr_mult, d.weight_decay, d.warmup_iters, d.iters, d.batch_size) == (6e-5, 10, 0.01, 1500,
                                                                                               40000, 2)
    assert (d.alpha, d.pseudo_threshold, d.fd_lambda, d.ignore_top, d.ignore_bottom) == (0.999, 0.968, 0.005, 15, 120)
    assert (d.jitter_strength, d.jitter_skip, d.blur) == (0.2, 0.2, True)
    assert (d.rcs_temperature, d.rcs_min_pixels, d.rcs_min_crop_ratio, d.pseudo_margins) == (0.01, 3000, 0.5, None)
    assert h.hrda and h.detail_loss_weight == 0.1 and h.crop_divisible == 8
    assert h.pseudo_margins == (30, 240, 30, 30) and h.ignore_top == h.ignore_bottom == 0
    assert h.rcs_min_crop_ratio == 2.0 and not h.mic
    assert m.mic and (m.mask_ratio, m.mask_block_size, m.mic_lambda) == (0.7, 64, 1.0)
    with pytest.raises(UserError, match="unknown"):
        get_recipe("dacs")
    with pytest.raises(UserError, match="lrr"):
        get_recipe("daformer", lrr=1.0)


def test_learning_rate_at_start_warmup_end_and_last_iteration():
    r = get_recipe("daformer")
    base = 6e-5

    def by_hand(it):   # mmcv poly (power 1) with linear warm-up from ratio 1e-6 over 1500 iterations
        regular = base * (1 - it / 40000)
        if it < 1500:
            return regular * (1 - (1 - it / 1500) * (1 - 1e-6))
        return regular

    model = build_model("tiny_daformer_mit")
    opt = build_optimizer(model, r)
    from domainmerge.training.schedule import set_lr

    for it in (0, 1, 1499, 1500, 39999):
        set_lr(opt, it, r)
        assert lr_factor(it, r) * base == pytest.approx(by_hand(it), rel=1e-9)
        lrs = sorted({g["lr"] for g in opt.param_groups})
        assert lrs == pytest.approx(sorted({by_hand(it), by_hand(it) * 10}), rel=1e-9)
    assert by_hand(0) == pytest.approx(6e-11) and by_hand(39999) == pytest.approx(base / 40000)


def test_parameter_groups_lr_and_decay_per_name():
    r = get_recipe("daformer")
    model = build_model("tiny_daformer_mit")
    opt = build_optimizer(model, r)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    expected = {   # name: (lr, weight decay), by the custom keys head x10 lr, norm / pos_block no decay
        "backbone.patch_embed1.proj.weight": (6e-5, 0.01),
        "backbone.patch_embed1.norm.weight": (6e-5, 0.0),
        "backbone.block1.0.norm1.bias": (6e-5, 0.0),
        "backbone.block1.0.attn.q.weight": (6e-5, 0.01),
        "backbone.norm4.weight": (6e-5, 0.0),
        "decode_head.conv_seg.weight": (6e-4, 0.01),
    }
    params = dict(model.named_parameters())
    for name, (lr, wd) in expected.items():
        g = group_of[id(params[name])]
        assert (g["initial_lr"], g["weight_decay"]) == pytest.approx((lr, wd)), name
    # every parameter is in exactly one group, and head parameters all train at x10
    assert sum(len(g["params"]) for g in opt.param_groups) == len(params)
    for name, p in params.items():
        assert group_of[id(p)]["initial_lr"] == pytest.approx(6e-4 if "head" in name else 6e-5)
        assert group_of[id(p)]["weight_decay"] == (0.0 if "norm" in name and "head" not in name else 0.01)


def test_ema_update_matches_the_formula():
    torch.manual_seed(1)
    teacher, student = nn.Linear(3, 2), nn.Linear(3, 2)
    t0 = [p.detach().numpy().copy() for p in teacher.parameters()]
    s0 = [p.detach().numpy().copy() for p in student.parameters()]
    ema_update(teacher, student, alpha=0.999, it=5000)       # min(1 - 1/5001, 0.999) = 0.999
    t1 = [p.detach().numpy().copy() for p in teacher.parameters()]
    for t, a, b in zip(t1, t0, s0):
        np.testing.assert_allclose(t, 0.999 * a + 0.001 * b, rtol=1e-6)
    ema_update(teacher, student, alpha=0.999, it=3)          # ramp-up: min(1 - 1/4, 0.999) = 0.75
    for t, a, b in zip(teacher.parameters(), t1, s0):
        np.testing.assert_allclose(t.detach().numpy(), 0.75 * a + 0.25 * b, rtol=1e-6)


def test_pseudo_label_weight_share_and_margins_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 5) * 3
    labels, confident = pseudo_labels(logits, threshold=0.9)
    p = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(1, keepdims=True)
    np.testing.assert_array_equal(labels.numpy(), p.argmax(1))
    share = (p.max(1) >= 0.9).sum() / p.max(1).size           # over the whole batch
    weight, s = pseudo_weight(confident, labels, ignore_top=1, ignore_bottom=2)
    assert s.dtype == torch.float64 and float(s) == pytest.approx(share)   # a device tensor, read when logged
    expected = np.full((2, 6, 5), share, dtype=np.float32)
    expected[:, :1] = 0
    expected[:, -2:] = 0
    np.testing.assert_allclose(weight.numpy(), expected, rtol=1e-6)
    # the weighted loss: per-pixel CE x weight, mean over all pixels (ignored pixels count 0)
    target = labels.clone()
    target[0, 0, 0] = 255
    ce = -np.log(np.take_along_axis(p, labels.numpy()[:, None], 1)[:, 0])
    ce[0, 0, 0] = 0
    assert float(weighted_ce(logits, target, weight)) == pytest.approx(float((ce * expected).mean()), rel=1e-5)


def test_feature_distance_is_masked_to_thing_classes():
    # labels 4x4 -> feature grid 2x2 (factor 2); cell (0,0): all person (11), thing; cell (0,1): 3 road +
    # 1 car -> road (0.75 >= 0.75), not a thing; cell (1,0): 2 car + 2 road -> 0.5 < 0.75, ignored;
    # cell (1,1): 3 car + 1 ignore -> car at 0.75, thing.
    lab = torch.tensor([[[11, 11, 0, 0], [11, 11, 0, 13], [13, 0, 13, 13], [13, 0, 13, 255]]])
    torch.manual_seed(0)
    f1, f2 = torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2)
    dsum, count = feature_distance(f1, f2, lab, (11, 12, 13), 0.75, 19)
    d = np.linalg.norm(f1.numpy() - f2.numpy(), axis=1)[0]
    assert float(count) == 2
    assert float(dsum) == pytest.approx(d[0, 0] + d[1, 1], rel=1e-5)


def test_sample_generator_is_a_pure_function_of_its_arguments():
    a = torch.rand(4, generator=sample_generator(3, 10, 1, "classmix"))
    assert torch.equal(a, torch.rand(4, generator=sample_generator(3, 10, 1, "classmix")))
    for other in [(3, 10, 2, "classmix"), (3, 11, 1, "classmix"), (4, 10, 1, "classmix"), (3, 10, 1, "mic_mask")]:
        assert not torch.equal(a, torch.rand(4, generator=sample_generator(*other)))


def test_mix_takes_the_pasted_values_inside_the_mask():
    mask = torch.tensor([[[True, False], [False, True]]])
    img_a, img_b = torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    assert torch.equal(mix(mask, img_a, img_b)[:, 0].bool(), mask)
    assert torch.equal(mix(mask, torch.full((1, 2, 2), 7), torch.full((1, 2, 2), 3)), torch.tensor([[[7, 3], [3, 7]]]))


def test_mic_block_mask_by_hand():
    mask = block_masks(128, 192, 64, 0.7, [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)])
    assert mask.shape == (2, 1, 128, 192)
    for b, seed in enumerate((5, 6)):
        cells = torch.rand((1, 2, 3), generator=torch.Generator().manual_seed(seed))[0].numpy()
        expected = np.kron((cells > 0.7).astype(np.float32), np.ones((64, 64), dtype=np.float32))
        np.testing.assert_array_equal(mask[b, 0].numpy(), expected)
    many = block_masks(640, 640, 64, 0.7, [torch.Generator().manual_seed(1)])
    assert abs(float(many.mean()) - 0.3) < 0.1              # about 30 % of 100 blocks visible


def test_hrda_detail_boxes_are_aligned_and_inside():
    seen_y, seen_x = set(), set()
    for i in range(300):
        y1, y2, x1, x2 = detail_box(96, 160, (32, 64), 8, torch.Generator().manual_seed(i))
        assert y1 % 8 == 0 and x1 % 8 == 0 and y2 - y1 == 32 and x2 - x1 == 64
        assert 0 <= y1 and y2 <= 96 and 0 <= x1 and x2 <= 160
        seen_y.add(y1)
        seen_x.add(x1)
    # HRDA: offsets d * randint(0, (margin + 1) // d): margins 64 and 96 -> 8 and 12 choices
    assert seen_y == set(range(0, 64, 8)) and seen_x == set(range(0, 96, 8))
    assert detail_box(32, 64, (32, 64), 8, torch.Generator()) == (0, 32, 0, 64)


def test_hrda_scale_attention_fusion_by_hand():
    # full-resolution crop 32x32, output stride 4 -> full grid 8x8; context at scale 0.5 -> 4x4 grid;
    # detail crop 16x16 at (8, 24, 16, 32) -> 4x4 detail logits placed at rows 2:6, cols 4:8.
    torch.manual_seed(0)
    context, att, detail = torch.randn(1, 2, 4, 4), torch.rand(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    box = (8, 24, 16, 32)
    fused = fuse(context, att, detail, [box], output_stride=4, lr_scale=0.5).numpy()
    a = att.numpy().copy()
    keep = np.zeros((4, 4))
    keep[1:3, 2:4] = 1                                        # the box on the context grid (stride 8)
    a = a * keep
    up = torch.nn.functional.interpolate
    ctx = up(torch.from_numpy((1 - a) * context.numpy()), scale_factor=2.0, mode="bilinear",
             align_corners=False).numpy()
    a_up = up(torch.from_numpy(a), scale_factor=2.0, mode="bilinear", align_corners=False).numpy()
    det = np.zeros((1, 2, 8, 8), dtype=np.float32)
    det[:, :, 2:6, 4:8] = detail.numpy()
    np.testing.assert_allclose(fused, a_up * det + ctx, rtol=1e-5, atol=1e-6)
    # far from the box the attention is 0: the context alone
    np.testing.assert_allclose(fused[:, :, :2, :2], ctx[:, :, :2, :2], rtol=1e-6)
    lab = torch.arange(32 * 32).reshape(1, 32, 32)
    assert torch.equal(crop_to(lab, [box]), lab[:, 8:24, 16:32])


def test_reset_head_is_seeded_and_leaves_backbone():
    torch.manual_seed(0)
    a = build_model("tiny_daformer_r", num_classes=19)
    torch.manual_seed(1)
    b = build_model("tiny_daformer_r", num_classes=19)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)
    reset_head(a, 7)
    reset_head(b, 7)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith("decode_head."))
    assert not torch.equal(sa["backbone.stem.0.weight"], sb["backbone.stem.0.weight"])
    assert math.isfinite(float(sa["decode_head.conv_seg.weight"].sum()))

"""The strong augmentation, MIC input, HRDA loss, stochastic depth and head initialisation against
independent references: the authors' rules written out in the test (colorsys for HSV, numpy
convolution, hand cross-entropy, binomial/hypergeometric rates)."""

from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import torch

from domainmerge.data.classes import MEAN, STD
from domainmerge.data.synthetic import SyntheticDataset
from domainmerge.data.training import CropConfig, TrainSet
from domainmerge.models.heads import DAFormerHead, DLV2Head
from domainmerge.models.mit import DropPath, MiTConfig, MixVisionTransformer
from domainmerge.training import AdaptConfig, get_recipe
from domainmerge.training.adapt import Trainer, _seg_loss
from domainmerge.training.augment import (
    Jitter,
    blur_kernel_size,
    classmix_masks,
    colour_jitter,
    drop_path_noise,
    gaussian_blur,
    sample_generator,
    shared_draws,
    strong_augment,
)
from domainmerge.training.mic import block_masks

WHOLE = CropConfig(None, None)


# -- colour jitter ------------------------------------------------------------------------------------

def test_jitter_runs_on_80_percent_of_iterations_and_blur_on_half_shared_by_the_batch():
    jitter = np.array([shared_draws(0, it, "jitter_mix").jitter > 0.2 for it in range(10_000)])
    blur = np.array([shared_draws(0, it, "jitter_mix").blur > 0.5 for it in range(10_000)])
    assert abs(jitter.mean() - 0.8) < 0.02 and abs(blur.mean() - 0.5) < 0.02
    # one decision for the batch: every image of an iteration changes, or none does
    torch.manual_seed(0)
    images = (torch.rand(3, 3, 8, 8) * 255).round()
    changed = []
    for it in range(40):
        out = strong_augment(images, seed=0, iteration=it, slots=[0, 1, 2], stream="jitter_mix", strength=0.2,
                             jitter_skip=0.2, blur=False, per_image=True)
        plain = (images - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
        per_image = [bool((out[b] - plain[b]).abs().max() > 1e-3) for b in range(3)]
        assert len(set(per_image)) == 1, it
        assert bool(per_image[0]) == (shared_draws(0, it, "jitter_mix").jitter > 0.2), it
        changed.append(per_image[0])
    assert 20 < sum(changed) < 40


@pytest.mark.parametrize("per_image", [True, False])
def test_a_batch_split_over_slots_augments_as_one_batch(per_image):
    torch.manual_seed(1)
    images = (torch.rand(2, 3, 24, 20) * 255).round()
    for it in range(6):
        kw = dict(seed=3, iteration=it, stream="jitter_mic", strength=0.2, jitter_skip=0.2, blur=True,
                  per_image=per_image)
        both = strong_augment(images, slots=[0, 1], **kw)
        for b in range(2):
            torch.testing.assert_close(strong_augment(images[b:b + 1], slots=[b], **kw)[0], both[b],
                                       rtol=0, atol=1e-5)


def _hsv_ref(rgb: np.ndarray, fn) -> np.ndarray:
    """Apply ``fn(h, s, v) -> (h, s, v)`` per pixel through colorsys (an independent HSV)."""
    out = np.empty_like(rgb)
    for y in range(rgb.shape[1]):
        for x in range(rgb.shape[2]):
            h, s, v = colorsys.rgb_to_hsv(*rgb[:, y, x])
            out[:, y, x] = colorsys.hsv_to_rgb(*fn(h, s, v))
    return out


def _jitter_ref(rgb: np.ndarray, b: float, c: float, s: float, hue: float, order) -> np.ndarray:
    """kornia 0.5 ColorJitter by hand: additive brightness, multiplicative contrast, HSV saturation
    and hue (hue in radians), each clamped to [0, 1], in ``order``."""
    x = rgb.astype(np.float64)
    for op in order:
        if op == 0:
            x = np.clip(x + b, 0, 1)
        elif op == 1:
            x = np.clip(x * c, 0, 1)
        elif op == 2:
            x = _hsv_ref(x, lambda h, sat, v: (h, min(max(sat * s, 0.0), 1.0), v))
        else:
            x = _hsv_ref(x, lambda h, sat, v: ((h + hue / (2 * math.pi)) % 1.0, sat, v))
    return x


def test_colour_jitter_equals_kornia_05_semantics_by_hand_in_each_images_order():
    rng = np.random.default_rng(0)
    images = rng.random((4, 3, 5, 6))
    params = Jitter(brightness=torch.tensor([0.15, -0.2, 0.05, 0.0]), contrast=torch.tensor([1.2, 0.8, 1.1, 1.0]),
                    saturation=torch.tensor([0.8, 1.2, 1.15, 1.0]), hue=torch.tensor([0.3, -1.2, 0.9, 0.0]),
                    order=torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1], [0, 1, 2, 3]]))
    out = colour_jitter(torch.from_numpy(images).float(), params).numpy()
    for i in range(4):
        ref = _jitter_ref(images[i], float(params.brightness[i]), float(params.contrast[i]),
                          float(params.saturation[i]), float(params.hue[i]), params.order[i].tolist())
        np.testing.assert_allclose(out[i], ref, atol=1e-5, rtol=0, err_msg=f"image {i}")
    # the identity parameters change nothing; brightness is additive (a grey image moves by b)
    np.testing.assert_allclose(out[3], images[3], atol=1e-6)
    grey = torch.full((1, 3, 2, 2), 0.5)
    shifted = colour_jitter(grey, Jitter(torch.tensor([0.1]), torch.tensor([1.0]), torch.tensor([1.0]),
                                         torch.tensor([0.0]), torch.tensor([[0, 1, 2, 3]])))
    torch.testing.assert_close(shifted, torch.full_like(grey, 0.6))


def test_hue_shifts_occur_and_factors_cover_the_authors_ranges():
    from domainmerge.training.augment import draw_jitter

    p = draw_jitter([sample_generator(0, it, 0, "jitter_mix") for it in range(2000)], 0.2)
    for name, lo, hi in (("brightness", -0.2, 0.2), ("contrast", 0.8, 1.2), ("saturation", 0.8, 1.2),
                         ("hue", -0.4 * math.pi, 0.4 * math.pi)):
        v = getattr(p, name)
        assert lo <= float(v.min()) < lo + 0.05 * (hi - lo) and hi - 0.05 * (hi - lo) < float(v.max()) <= hi, name
    assert len({tuple(o) for o in p.order.tolist()}) == 24      # every order of the four steps occurs
    red = torch.tensor([0.9, 0.1, 0.1]).view(1, 3, 1, 1)
    one = Jitter(torch.zeros(1), torch.ones(1), torch.ones(1), torch.tensor([2 * math.pi / 3]),
                 torch.tensor([[3, 0, 1, 2]]))
    torch.testing.assert_close(colour_jitter(red, one).flatten(), torch.tensor([0.1, 0.9, 0.1]), atol=1e-5, rtol=0)


# -- Gaussian blur --------------------------------------------------------------------------------------

def test_blur_kernel_size_and_output_by_hand():
    assert blur_kernel_size(512, 1024) == (51, 103)
    assert blur_kernel_size(1024, 2048) == (103, 205)
    assert blur_kernel_size(64, 128) == (7, 13) and blur_kernel_size(30, 10) == (3, 1)
    rng = np.random.default_rng(1)
    img = rng.random((2, 3, 40, 70)).astype(np.float32)
    sigmas = [0.4, 1.1]
    out = gaussian_blur(torch.from_numpy(img), torch.tensor(sigmas)).numpy()
    ky, kx = 3, 7
    for b, sigma in enumerate(sigmas):
        def taps(k: int, sigma: float = sigma) -> np.ndarray:
            x = np.arange(k) - k // 2
            g = np.exp(-x**2 / (2 * sigma**2))
            return g / g.sum()
        pad = np.pad(img[b].astype(np.float64), ((0, 0), (ky // 2, ky // 2), (kx // 2, kx // 2)), mode="reflect")
        ty, tx = taps(ky), taps(kx)
        ref = np.zeros_like(img[b], dtype=np.float64)
        for i in range(ky):
            for j in range(kx):
                ref += ty[i] * tx[j] * pad[:, i:i + 40, j:j + 70]
        np.testing.assert_allclose(out[b], ref, atol=1e-5, rtol=0)


def test_blur_sigma_follows_the_call_mic_shares_it():
    img = torch.zeros(2, 3, 41, 41)
    img[:, :, 20, 20] = 255.0
    blurred = 0
    for it in range(12):
        kw = dict(seed=0, iteration=it, slots=[0, 1], strength=0.0, jitter_skip=1.0, blur=True)
        mic = strong_augment(img, stream="jitter_mic", per_image=False, **kw)
        mixed = strong_augment(img, stream="jitter_mix", per_image=True, **kw)
        torch.testing.assert_close(mic[0], mic[1])                     # MIC: one sigma for the batch
        if shared_draws(0, it, "jitter_mix").blur > 0.5:               # DACS: one sigma per image
            blurred += 1
            assert not torch.allclose(mixed[0], mixed[1])
        else:
            torch.testing.assert_close(mixed[0], mixed[1])
    assert 0 < blurred < 12
    sigmas = [0.15 + shared_draws(0, it, "jitter_mic").sigma_u for it in range(500)]
    assert 0.15 <= min(sigmas) < 0.2 and 1.1 < max(sigmas) <= 1.15


# -- ClassMix -------------------------------------------------------------------------------------------

def test_classmix_draws_half_of_the_batch_union_ignore_included():
    # image 0 shows {0, 1, 2}, image 1 shows {3, 4, 255}: union n = 6, each image takes 3 values
    lab = torch.tensor([[[0, 1, 2, 0]], [[3, 4, 255, 3]]])
    counts = np.zeros((2, 4))
    picked_ignore = 0
    draws = 3000
    for it in range(draws):
        mask = classmix_masks(lab, [sample_generator(0, it, slot, "classmix") for slot in (0, 1)])
        for b in range(2):
            own = {int(v) for v in lab[b][mask[b]].unique()}
            counts[b, len(own)] += 1
            # the mask is exactly the pixels of the chosen values
            assert torch.equal(mask[b], torch.isin(lab[b], torch.tensor(sorted(own), dtype=lab.dtype)))
        picked_ignore += int(bool(mask[1][lab[1] == 255].all()))
    # hypergeometric: j of the image's 3 values among 3 drawn from 6
    expected = np.array([math.comb(3, j) * math.comb(3, 3 - j) / math.comb(6, 3) for j in range(4)])
    for b in range(2):
        np.testing.assert_allclose(counts[b] / draws, expected, atol=0.03)
    assert abs(picked_ignore / draws - 0.5) < 0.03                   # 255 is a value like any other


# -- MIC and the trainer's inputs ----------------------------------------------------------------------

def _trainer(arch: str = "tiny_daformer_r", recipe: str = "daformer", **kw):
    src = SyntheticDataset("game", "train", 4, size=(32, 64))
    tgt = SyntheticDataset("night", "train", 4, size=(32, 64))
    r = get_recipe(recipe, mic=True, batch_size=2, rcs=False, ignore_top=0, ignore_bottom=0, **kw)
    return Trainer(AdaptConfig(src, tgt, arch=arch, recipe=r, source_crop=WHOLE, target_crop=WHOLE,
                               progress=False), log=lambda s: None)


def test_mic_masks_the_normalised_image_hidden_pixels_are_exactly_zero(monkeypatch):
    torch.set_num_threads(1)
    tr = _trainer(mask_block_size=8)
    seen = {}
    original = tr._forward

    def spy(views, it, slots):
        for x, _, _, stream in views:
            seen[stream] = x.detach().clone()
        return original(views, it, slots)

    monkeypatch.setattr(tr, "_forward", spy)
    tr.step(0)
    x = seen["hrda_mic"]
    assert x.dtype == torch.float32
    keep = block_masks(32, 64, 8, tr.recipe.mask_ratio, [sample_generator(0, 0, s, "mic_mask") for s in (0, 1)])
    hidden = keep.expand_as(x) == 0
    assert hidden.any() and (~hidden).any()
    assert torch.equal(x[hidden], torch.zeros_like(x[hidden]))
    assert (x[~hidden] != 0).float().mean() > 0.9                  # visible pixels keep their normalised colour
    assert seen["hrda_mix"].dtype == torch.float32 and seen["hrda_source"].dtype == torch.uint8


# -- HRDA loss ------------------------------------------------------------------------------------------

def test_hrda_loss_is_09_fused_plus_01_detail():
    torch.manual_seed(0)
    fused, detail = torch.randn(2, 19, 16, 24), torch.randn(2, 19, 8, 8)
    labels = torch.randint(0, 19, (2, 16, 24))
    labels[0, :2] = 255
    weight = torch.rand(2, 16, 24)
    boxes = [(0, 8, 8, 16), (8, 16, 0, 8)]
    r = get_recipe("hrda")
    got = _seg_loss(fused, detail, labels, weight, boxes, r)

    def ce(logits, lab, w):
        logp = torch.log_softmax(logits.double(), 1)
        valid = lab != 255
        pix = -torch.gather(logp, 1, torch.where(valid, lab, 0)[:, None])[:, 0] * valid
        return (pix * w.double()).mean()

    lab_crop = torch.stack([labels[0, 0:8, 8:16], labels[1, 8:16, 0:8]])
    w_crop = torch.stack([weight[0, 0:8, 8:16], weight[1, 8:16, 0:8]])
    expected = 0.9 * ce(fused, labels, weight) + 0.1 * ce(detail, lab_crop, w_crop)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    assert float(_seg_loss(fused, None, labels, weight, None, r)) == pytest.approx(float(ce(fused, labels, weight)),
                                                                                  rel=1e-5)


# -- stochastic depth -----------------------------------------------------------------------------------

def _mit(rate: float = 0.1) -> MixVisionTransformer:
    return MixVisionTransformer(MiTConfig(embed_dims=(8, 16, 16, 16), num_heads=(1, 1, 1, 1), depths=(2, 2, 2, 2),
                                          sr_ratios=(1, 1, 1, 1), drop_path_rate=rate))


def _drop_rates(model: MixVisionTransformer, x: torch.Tensor) -> np.ndarray:
    """Share of samples whose branch output was zeroed, per DropPath call, in block order."""
    zeroed: list[list[float]] = []

    def hook(_m, _inp, out):
        zeroed.append([float((out.flatten(1).abs().sum(1) == 0).float().mean())])

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, DropPath)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return np.array(zeroed).reshape(-1, 2).mean(1)        # two calls (attention, MLP) per block


def test_stochastic_depth_drops_with_the_authors_rates_in_training_only():
    torch.manual_seed(0)
    model = _mit().train()
    expected = np.linspace(0, 0.1, 8)
    assert [m.p for m in model.modules() if isinstance(m, DropPath)] == pytest.approx(list(expected))
    x = torch.randn(3000, 3, 16, 16)
    np.testing.assert_allclose(_drop_rates(model, x), expected, atol=0.012)
    # the trainer's per-slot draws give the same rates, and a slot draws the same alone or in a batch
    slots = list(range(3000))
    wrapper = torch.nn.ModuleDict({"backbone": model})
    with drop_path_noise(wrapper, 0, 5, slots, "drop_mix"):
        np.testing.assert_allclose(_drop_rates(model, x), expected, atol=0.012)
    with drop_path_noise(wrapper, 0, 5, [0, 1], "drop_mix"), torch.no_grad():
        both = model(x[:2])
    for s in (0, 1):
        with drop_path_noise(wrapper, 0, 5, [s], "drop_mix"), torch.no_grad():
            alone = model(x[s:s + 1])
        for a, b in zip(alone, both):
            # same drops (a dropped branch moves features by O(1)); matmul blocking differs by batch size
            torch.testing.assert_close(a[0], b[s], rtol=1e-5, atol=1e-5)
    assert model.path_noise is None
    # eval mode: never
    model.eval()
    assert np.all(_drop_rates(model, x[:200]) == 0)


def test_teacher_and_imagenet_copy_never_drop_the_student_does():
    torch.set_num_threads(1)
    tr = _trainer("tiny_daformer_mit")
    student = [m for m in tr.model.modules() if isinstance(m, DropPath)]
    assert student and all(m.training for m in student) and max(m.p for m in student) == pytest.approx(0.1)
    for net in (tr.teacher, tr.imnet):
        assert all(not m.training for m in net.modules() if isinstance(m, DropPath))
    x = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        a, b = tr.teacher.backbone(x), tr.teacher.backbone(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


# -- head initialisation --------------------------------------------------------------------------------

@torch.no_grad()
def test_head_initialisation_is_mmsegs():
    torch.manual_seed(0)
    head = DAFormerHead([64, 128, 320, 512], 19)
    w = head.conv_seg.weight
    assert float(w.std()) == pytest.approx(0.01, rel=0.05) and abs(float(w.mean())) < 0.001
    assert torch.equal(head.conv_seg.bias, torch.zeros(19))
    # mmcv kaiming_init: normal, fan_out = out_channels x kernel area, gain sqrt(2), bias 0
    bottleneck = head.fuse_layer.bottleneck.conv.weight                      # [256, 1024, 3, 3]
    assert float(bottleneck.std()) == pytest.approx(math.sqrt(2 / (256 * 9)), rel=0.05)
    depthwise = head.fuse_layer.aspp_modules[1].depthwise_conv.conv.weight  # [1024, 1, 3, 3]
    assert float(depthwise.std()) == pytest.approx(math.sqrt(2 / (1024 * 9)), rel=0.05)
    assert torch.equal(head.fuse_layer.bottleneck.bn.weight, torch.ones(256))
    dlv2 = DLV2Head(2048, 19)
    conv = dlv2.aspp_modules[0].conv
    assert float(conv.weight.std()) == pytest.approx(math.sqrt(2 / (19 * 9)), rel=0.05)
    assert torch.equal(conv.bias, torch.zeros(19))
    # reset_head re-initialises the same way
    from domainmerge.models import build_model
    from domainmerge.training.init import reset_head

    net = build_model("daformer_r50")
    with torch.no_grad():
        net.decode_head.conv_seg.weight.fill_(1.0)
    reset_head(net, 3)
    assert float(net.decode_head.conv_seg.weight.std()) == pytest.approx(0.01, rel=0.05)


# -- pseudo-label margins -------------------------------------------------------------------------------

def test_margins_are_drawn_at_the_datasets_size_and_resized_with_the_image():
    reader = SyntheticDataset("city", "train", 1, size=(64, 128))
    crop = CropConfig(None, None, flip=0.0, pseudo_margins=(4, 16, 4, 8), margin_size=(128, 256))
    valid = TrainSet(reader, crop, seed=0, labeled=False).sample(0, 0)["valid"]
    expected = torch.ones(64, 128, dtype=torch.bool)
    expected[:2], expected[-8:], expected[:, :2], expected[:, -4:] = False, False, False, False
    assert torch.equal(valid, expected)
    own = TrainSet(reader, CropConfig(None, None, flip=0.0, pseudo_margins=(4, 16, 4, 8)), seed=0,
                   labeled=False).sample(0, 0)["valid"]
    assert int((~own[:, 64]).sum()) == 20                    # without margin_size: the stored image's pixels
    from domainmerge.data.training import recipe_crops

    assert recipe_crops("hrda", "gta", "idd")[1].margin_size == (1080, 1920)
    assert recipe_crops("hrda", "gta", "cityscapes")[1].margin_size == (1024, 2048)


def test_hrda_detail_box_is_one_per_batch_by_default_and_per_image_on_request():
    from domainmerge.models import build_model
    from domainmerge.training.adapt import _boxes

    model = build_model("tiny_hrda_r")
    batch, image = get_recipe("hrda"), get_recipe("hrda", detail_boxes="image")
    per_batch = [_boxes(True, model, (96, 160), batch, 0, it, [0, 1, 2], "hrda_mix") for it in range(20)]
    assert all(len(set(b)) == 1 for b in per_batch) and len({b[0] for b in per_batch}) > 1
    # a rank holding slot 2 alone draws the batch's box
    assert _boxes(True, model, (96, 160), batch, 0, 7, [2], "hrda_mix")[0] == per_batch[7][0]
    per_image = [_boxes(True, model, (96, 160), image, 0, it, [0, 1, 2], "hrda_mix") for it in range(20)]
    assert any(len(set(b)) > 1 for b in per_image)
    with pytest.raises(Exception, match="detail_boxes"):
        get_recipe("hrda", detail_boxes="crop")


def test_augmentation_classmix_and_masks_never_read_device_values():
    """On the meta device any host read of a tensor value (item, bool, tolist) raises: the
    ingredients run on the training device from CPU-drawn parameters only (no GPU sync)."""
    x = torch.empty(2, 3, 64, 128, device="meta", dtype=torch.uint8)
    for it in range(10):             # jitter and blur both taken and skipped among these
        for per_image in (True, False):
            y = strong_augment(x, seed=0, iteration=it, slots=[0, 1], stream="jitter_mix", strength=0.2,
                               jitter_skip=0.2, blur=True, per_image=per_image)
            assert y.device.type == "meta" and y.dtype == torch.float32
    assert {shared_draws(0, it, "jitter_mix").jitter > 0.2 for it in range(10)} == {True, False}
    assert {shared_draws(0, it, "jitter_mix").blur > 0.5 for it in range(10)} == {True, False}
    labels = torch.empty(2, 64, 128, device="meta", dtype=torch.int64)
    assert classmix_masks(labels, [sample_generator(0, 0, s, "classmix") for s in (0, 1)]).shape == (2, 64, 128)
    assert block_masks(64, 128, 8, 0.7, [torch.Generator()], "meta").shape == (1, 1, 64, 128)
    model = _mit().to("meta").train()
    with drop_path_noise(torch.nn.ModuleDict({"backbone": model}), 0, 0, [0, 1], "drop_mix"):
        assert model(torch.empty(2, 3, 16, 16, device="meta"))[-1].device.type == "meta"

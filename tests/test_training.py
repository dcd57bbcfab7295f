"""Self-training pieces against hand computations; one tiny STDA step."""

import math

import numpy as np
import torch
from torch import nn

from domainmerge.models import build_model
from domainmerge.training.augment import classmix_mask, colour_jitter, gaussian_blur, gaussian_kernel1d, mix
from domainmerge.training.loop import lr_factor, rare_class_weights
from domainmerge.training.pretrain import reset_head
from domainmerge.training.stda import STDAConfig, ema_update, pseudo_labels, train_stda


def test_one_stda_step_changes_student_weights():
    torch.manual_seed(0)
    model = build_model("tiny_daformer_r", num_classes=19)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    src = torch.randint(0, 256, (4, 3, 32, 64), dtype=torch.uint8)
    lab = torch.randint(0, 19, (4, 32, 64))
    tgt = torch.randint(0, 256, (4, 3, 32, 64), dtype=torch.uint8)
    stats = train_stda(model, src, lab, tgt, STDAConfig(iters=1, batch_size=2, warmup=1), g)
    after = model.state_dict()
    changed = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])]
    assert any(k.startswith("backbone.") for k in changed) and any(k.startswith("decode_head.") for k in changed)
    assert len(stats.source_loss) == 1 and math.isfinite(stats.target_loss[0])
    assert 0.0 <= stats.pseudo_weight[0] <= 1.0


def test_ema_update_matches_the_formula():
    torch.manual_seed(1)
    teacher, student = nn.Linear(3, 2), nn.Linear(3, 2)
    t0 = [p.detach().numpy().copy() for p in teacher.parameters()]
    s0 = [p.detach().numpy().copy() for p in student.parameters()]
    ema_update(teacher, student, alpha=0.99, it=500)       # min(1 - 1/501, 0.99) = 0.99
    t1 = [p.detach().numpy().copy() for p in teacher.parameters()]
    for t, a, b in zip(t1, t0, s0):
        np.testing.assert_allclose(t, 0.99 * a + 0.01 * b, rtol=1e-6)
    ema_update(teacher, student, alpha=0.99, it=3)         # ramp-up: min(1 - 1/4, 0.99) = 0.75
    for t, a, b in zip(teacher.parameters(), t1, s0):
        np.testing.assert_allclose(t.detach().numpy(), 0.75 * a + 0.25 * b, rtol=1e-6)


def test_pseudo_labels_and_weight_by_hand():
    logits = torch.tensor([[[[4.0, 0.0]], [[0.0, 0.3]]]])   # [1, 2 classes, 1, 2 pixels]
    labels, weight = pseudo_labels(logits, threshold=0.9)
    p = np.exp([4.0, 0.0]) / np.exp([4.0, 0.0]).sum()        # pixel 0: softmax over classes
    q = np.exp([0.0, 0.3]) / np.exp([0.0, 0.3]).sum()
    assert labels.tolist() == [[[0, 1]]]
    expected = ((p.max() >= 0.9) + (q.max() >= 0.9)) / 2
    assert float(weight) == expected == 0.5


def test_classmix_mask_takes_half_of_the_classes_whole():
    lab = torch.tensor([[[0, 0, 1, 1, 2, 2, 255, 5]]]).reshape(1, 2, 4)
    mask = classmix_mask(lab, torch.Generator().manual_seed(3))
    chosen = {int(c) for c in lab[mask].unique()}
    assert len(chosen) == 2                                  # ceil(4 classes / 2), 255 not a class
    assert 255 not in chosen
    expected = np.isin(lab.numpy(), list(chosen))
    assert np.array_equal(mask.numpy(), expected)
    img_a, img_b = torch.ones(1, 3, 2, 4), torch.zeros(1, 3, 2, 4)
    mixed = mix(mask, img_a, img_b)
    assert torch.equal(mixed[:, 0].bool(), mask)


def test_blur_matches_a_hand_kernel_and_jitter_with_p0_is_identity():
    img = torch.zeros(1, 1, 9, 9)
    img[0, 0, 4, 4] = 1.0
    out = gaussian_blur(img, torch.Generator().manual_seed(0), sigma_range=(1.0, 1.0), p=1.0)
    x = np.arange(-2, 3)
    k = np.exp(-x**2 / 2.0)
    k /= k.sum()
    np.testing.assert_allclose(out[0, 0, 2:7, 2:7].numpy(), np.outer(k, k), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gaussian_kernel1d(1.0, 2).numpy(), k, rtol=1e-6)
    imgs = torch.rand(3, 3, 4, 4) * 255
    assert torch.equal(colour_jitter(imgs, torch.Generator().manual_seed(0), p=0.0), imgs)


def test_lr_schedule_and_rare_class_weights_by_hand():
    assert lr_factor(0, 100, 10) == 0.1 and lr_factor(9, 100, 10) == 1.0
    assert math.isclose(lr_factor(55, 100, 10), 1 - 45 / 90)
    # Two images: image 0 has only class 0, image 1 classes 0 and 1 (1 pixel of class 1 of 8).
    labels = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1]])
    w = rare_class_weights(labels, num_classes=2, temperature=0.5).numpy()
    f = np.array([7 / 8, 1 / 8])
    pc = np.exp((1 - f) / 0.5) / np.exp((1 - f) / 0.5).sum()
    np.testing.assert_allclose(w, [pc[0] / 2, pc[0] / 2 + pc[1]], rtol=1e-5)


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

"""The synthetic world: deterministic, labelled in train ids, domains measurably different."""

import numpy as np
import pytest
import torch

from domainmerge.data import build_dataset
from domainmerge.data.synthetic import DOMAINS, TARGETS, USED_CLASSES, SyntheticDataset, make_sample
from domainmerge.errors import UserError

SIZE = (48, 96)


def _stack(domain: str, n: int = 24, split: str = "val") -> tuple[np.ndarray, np.ndarray]:
    pairs = [make_sample(domain, split, i, seed=3, size=SIZE) for i in range(n)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def test_same_arguments_same_pixels_and_seed_changes_them():
    a_img, a_lab = make_sample("city", "train", 5, seed=1, size=SIZE)
    b_img, b_lab = make_sample("city", "train", 5, seed=1, size=SIZE)
    c_img, _ = make_sample("city", "train", 5, seed=2, size=SIZE)
    d_img, _ = make_sample("city", "val", 5, seed=1, size=SIZE)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    assert not np.array_equal(a_img, c_img)
    assert not np.array_equal(a_img, d_img)


@pytest.mark.parametrize("domain", DOMAINS)
def test_shapes_types_and_label_range(domain):
    img, lab = make_sample(domain, "val", 0, size=SIZE)
    assert img.dtype == np.uint8 and img.shape == (3, *SIZE)
    assert lab.dtype == np.int64 and lab.shape == SIZE
    assert lab.min() >= 0 and lab.max() <= 18


def test_street_domains_cover_at_least_ten_train_classes():
    present = set()
    for domain in ("game", *TARGETS):
        present |= set(np.unique(_stack(domain, 16)[1]).tolist())
    assert {0, 1, 2, 5, 7, 8, 10, 11, 13} <= present
    assert len(present) >= 10
    assert present <= set(USED_CLASSES)


def test_night_is_much_darker_than_city_and_fog_has_less_contrast():
    city, night, fog = _stack("city")[0].astype(float), _stack("night")[0].astype(float), _stack("fog")[0].astype(float)
    assert night.mean() < 0.5 * city.mean()
    # Contrast: per-image standard deviation of the grey level.
    def contrast(x):
        return x.mean(1).reshape(len(x), -1).std(1).mean()
    assert contrast(fog) < 0.8 * contrast(city)


def test_idd_content_differs_no_sidewalk_more_people_and_motorcycles():
    _, city = _stack("city", 40)
    _, idd = _stack("idd", 40)
    freq = lambda lab, c: float((lab == c).mean())  # noqa: E731
    assert freq(idd, 1) == 0.0 and freq(city, 1) > 0.02          # sidewalk
    assert freq(idd, 11) > 1.5 * freq(city, 11)                    # person
    assert freq(idd, 17) > 0 and freq(city, 17) == 0               # motorcycle


def test_pretrain_family_is_disjoint_from_street_labels():
    _, lab = _stack("pretrain", 16, "train")
    assert set(np.unique(lab).tolist()) <= set(range(7))


def test_dataset_items_and_registry():
    ds = SyntheticDataset("night", "val", 3, seed=4, size=SIZE)
    image, label, name = ds[1]
    assert image.dtype == torch.uint8 and image.shape == (3, *SIZE)
    assert label.dtype == torch.int64 and label.shape == SIZE
    assert name == "night_val_00001"
    img_np, lab_np = make_sample("night", "val", 1, seed=4, size=SIZE)
    assert np.array_equal(image.numpy(), img_np) and np.array_equal(label.numpy(), lab_np)
    built = build_dataset("synthetic", "night", "val", length=3, seed=4, size=SIZE)
    assert torch.equal(built[1][0], image)


def test_unknown_domain_or_split_is_a_user_error():
    with pytest.raises(UserError, match="unknown"):
        make_sample("mars", "val", 0)
    with pytest.raises(UserError, match="split"):
        make_sample("city", "test", 0)

"""The protocol table (one test per row, values written out from the cited config files) and the
resolution of --protocol with explicit settings."""

from __future__ import annotations

import pytest

from domainmerge.errors import UserError
from domainmerge.evaluation.protocols import TABLE, Protocol, family_of, markdown_table, resolve, table_row
from domainmerge.models import get_spec

MTDA = "AIR-DISCOVER/Model-Merging-MTDA"

# (family, dataset, variant) -> (img_scale, mode, crop, stride, a file the row must cite), read off
# the config files by hand: the test pipeline's MultiScaleFlipAug img_scale and the model's test_cfg.
ROWS = {
    ("hrda", "cityscapes", "authors"): ((2048, 1024), "slide", 1024, 512, "uda_gtaHR_to_cityscapesHR_1024x1024.py"),
    ("hrda", "cityscapes", "mtda"): ((2048, 1024), "slide", 1024, 512, "test/dtda_cityscapes_test.py"),
    ("hrda", "idd", "authors"): ((1920, 1080), "slide", 512, 512, "configs/hrda/gtaHR2iddHR_hrda.py"),
    ("hrda", "idd", "mtda"): ((2048, 1024), "slide", 1024, 512, "gtaHR2csHR_and_iddHR_dtda_test_idd.py"),
    ("hrda", "acdc", "authors"): ((960, 540), "slide", 512, 512, "uda_gtaHR_to_acdcHR_512x512.py"),
    ("hrda", "darkzurich", "authors"): ((960, 540), "slide", 512, 512, "gtaHR2darkzurichHR_hrda_r101.py"),
    ("hrda", "gta", "authors"): ((1914, 1052), "slide", 1024, 512, "uda_gtaHR_to_gtaHR_1024x1024.py"),
    ("daformer", "cityscapes", "authors"): ((1024, 512), "whole", None, None, "uda_gta_to_cityscapes_512x512.py"),
    ("daformer", "acdc", "authors"): ((960, 540), "whole", None, None, "uda_cityscapes_to_acdc_512x512.py"),
    ("daformer", "darkzurich", "authors"): ((960, 540), "whole", None, None,
                                            "uda_cityscapes_to_darkzurich_512x512.py"),
    ("daformer", "idd", "authors"): ((960, 540), "whole", None, None, "not found in the index"),
    ("daformer", "gta", "authors"): ((1280, 720), "whole", None, None, "not found in the index"),
    ("deeplabv2", "cityscapes", "authors"): ((1024, 512), "whole", None, None, "deeplabv2_r50-d8.py"),
    ("deeplabv2", "acdc", "authors"): ((960, 540), "whole", None, None, "uda_cityscapes_to_acdc_512x512.py"),
    ("deeplabv2", "darkzurich", "authors"): ((960, 540), "whole", None, None,
                                             "uda_cityscapes_to_darkzurich_512x512.py"),
    ("deeplabv2", "idd", "authors"): ((960, 540), "whole", None, None, "not found in the index"),
    ("deeplabv2", "gta", "authors"): ((1280, 720), "whole", None, None, "not found in the index"),
}


def test_every_table_row_is_checked():
    assert set(TABLE) == set(ROWS)


@pytest.mark.parametrize("key", list(ROWS), ids=["-".join(k) for k in ROWS])
def test_row(key):
    family, dataset, variant = key
    scale, mode, crop, stride, cited = ROWS[key]
    got = resolve(family, dataset, None if variant == "authors" else variant)
    assert (got.img_scale, got.mode) == (scale, mode)
    assert got.crop == ((crop, crop) if crop else None) and got.stride == ((stride, stride) if stride else None)
    assert got.name == variant and cited in got.source


def test_family_from_the_checkpoint_spec():
    assert family_of(get_spec("hrda_mitb5")) == "hrda"
    assert family_of(get_spec("hrda_deeplabv2_r101")) == "hrda"
    assert family_of(get_spec("daformer_r101")) == "daformer"
    assert family_of(get_spec("deeplabv2_r101")) == "deeplabv2"
    assert family_of(get_spec("tiny_daformer_r")) == "daformer"


def test_mtda_without_a_multi_target_config_gives_the_single_target_row():
    p = resolve("daformer", "cityscapes", "mtda")
    assert (p.name, p.img_scale, p.mode) == ("mtda", (1024, 512), "whole")
    assert "no multi-target test config" in p.source
    assert table_row("hrda", "acdc", "mtda").img_scale == (960, 540)


def test_explicit_settings_mean_custom():
    p = resolve("hrda", "cityscapes", mode="slide", crop=(64, 64))   # windows overlap by half, as 1024 / 512
    assert p == Protocol("custom", "slide", (64, 64), (32, 32), None, "command-line options")
    p = resolve("hrda", "cityscapes", img_scale=(1024, 512))
    assert (p.name, p.mode, p.crop, p.img_scale) == ("custom", "whole", None, (1024, 512))
    assert resolve("hrda", "cityscapes", "custom") == Protocol("custom", "whole", None, None, None,
                                                               "command-line options")


@pytest.mark.parametrize("protocol", ["authors", "mtda"])
def test_explicit_settings_with_authors_or_mtda_is_an_error(protocol):
    with pytest.raises(UserError, match=f"^protocol='{protocol}' .*drop mode, stride") as info:
        resolve("hrda", "cityscapes", protocol, mode="slide", stride=(8, 8))
    # the command line names the flags
    assert f"--protocol {protocol} " in info.value.for_command() and "--mode, --stride" in info.value.for_command()


def test_unknown_pairs():
    # The demo's synthetic world (and folder datasets): whole image, native resolution by default.
    for family, kind in (("daformer", "synthetic"), ("hrda", "folder"), (None, "cityscapes")):
        p = resolve(family, kind)
        assert (p.name, p.mode, p.img_scale, p.crop) == ("native", "whole", None, None)
    with pytest.raises(UserError, match="no authors protocol .* synthetic"):
        resolve("daformer", "synthetic", "authors")
    with pytest.raises(UserError, match="unknown"):
        resolve("daformer", "cityscapes", "paper")


def test_describe_and_json():
    p = resolve("hrda", "idd", "mtda")
    assert p.describe().startswith("mtda: resize to fit 2048x1024, slide 1024x1024 stride 512x512 (")
    assert resolve("daformer", "synthetic").describe().startswith("native: native resolution, whole image (")
    d = p.to_dict()
    assert d["img_scale"] == [2048, 1024] and d["crop"] == [1024, 1024] and d["mode"] == "slide"
    assert markdown_table().count("\n") == len(TABLE) + 2

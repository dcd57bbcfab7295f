"""The authors' test protocols: image scale, whole or sliding-window inference, window and stride,
per network family and dataset kind, read from the configs the reference code tests with.

Every row cites its file (repository and path). ``authors`` is the single-target setting a
checkpoint of that family was evaluated with; ``mtda`` the multi-target test configs of
Model-Merging-MTDA (``configs/dtda/test/*``), which only exist for HRDA on Cityscapes and IDD:
elsewhere ``mtda`` gives the single-target row and says so. Where no config exists in the
public code a row says where its value comes from instead.

Scales are mmseg's ``img_scale=(long, short)`` with ``keep_ratio=True`` (fit inside, aspect
kept); the logits are resized back to the label size before the argmax.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from domainmerge.errors import Option, UserError

if TYPE_CHECKING:   # protocols stay importable without torch (the command line's help, tables)
    from domainmerge.models.spec import ModelSpec

FAMILIES = ("hrda", "daformer", "deeplabv2")
DATASETS = ("cityscapes", "idd", "acdc", "darkzurich", "gta")
VARIANTS = ("authors", "mtda")
PROTOCOLS = ("authors", "mtda", "custom")

MTDA = "AIR-DISCOVER/Model-Merging-MTDA"
DAFORMER = "lhoyer/DAFormer"
HRDA = "lhoyer/HRDA"

# Defaults of the explicit (custom) settings, domainmerge's own since before protocols existed.
CUSTOM_DEFAULTS: dict[str, Any] = {"mode": "whole", "crop": (1024, 1024), "stride": (512, 512), "img_scale": None}


@dataclass(frozen=True)
class Protocol:
    """How images of one domain go through one network: ``mode`` whole or slide, ``crop`` and
    ``stride`` of the slide windows (None in whole mode), ``img_scale`` (long, short) to fit
    images in, or None for native resolution. ``name`` is authors, mtda, custom or native (no
    table row); ``source`` where the values come from."""

    name: str
    mode: str
    crop: tuple[int, int] | None
    stride: tuple[int, int] | None
    img_scale: tuple[int, int] | None
    source: str

    def describe(self) -> str:
        """One line, e.g. 'authors: resize to fit 2048x1024, slide 1024x1024 stride 512x512 (source)'."""
        scale = f"resize to fit {self.img_scale[0]}x{self.img_scale[1]}" if self.img_scale else "native resolution"
        how = "whole image"
        if self.mode == "slide" and self.crop and self.stride:
            how = f"slide {self.crop[0]}x{self.crop[1]} stride {self.stride[0]}x{self.stride[1]}"
        return f"{self.name}: {scale}, {how} ({self.source})"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples as lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def _row(mode: str, img_scale: tuple[int, int], source: str, crop: int | None = None,
         stride: int | None = None) -> Protocol:
    return Protocol("authors", mode, (crop, crop) if crop else None, (stride, stride) if stride else None,
                    img_scale, source)


def _whole(img_scale: tuple[int, int], source: str) -> Protocol:
    return _row("whole", img_scale, source)


_DAF_TEST = f"test_cfg mode='whole': {DAFORMER} configs/_base_/models/daformer_conv1_mitb5.py"
_DLV2_TEST = f"test_cfg mode='whole': {DAFORMER} configs/_base_/models/deeplabv2_r50-d8.py"
_DAF_CS = f"{DAFORMER} configs/_base_/datasets/uda_gta_to_cityscapes_512x512.py"
_DAF_ACDC = f"{DAFORMER} configs/_base_/datasets/uda_cityscapes_to_acdc_512x512.py"
_DAF_DZ = f"{DAFORMER} configs/_base_/datasets/uda_cityscapes_to_darkzurich_512x512.py"
_DAF_IDD = (f"not found in the index (no low-resolution IDD config in {DAFORMER} or {MTDA}); value from {MTDA} "
            "configs/_base_/datasets/uda_gtaHR_to_iddHR_1024x1024.py (1920, 1080) halved, as DAFormer's ACDC and "
            "Dark Zurich configs halve those datasets' 1920x1080")
_DAF_GTA = (f"not found in the index (no GTA test config in {DAFORMER}); value from the GTA training Resize "
            f"(1280, 720) in {_DAF_CS}")


def _lowres(test: str) -> dict[tuple[str, str], Protocol]:
    """DAFormer's and DeepLabV2's rows: whole images at the low-resolution dataset scales."""
    return {
        ("cityscapes", "authors"): _whole((1024, 512), f"{_DAF_CS}; {test}"),
        ("acdc", "authors"): _whole((960, 540), f"{_DAF_ACDC}; {test}"),
        ("darkzurich", "authors"): _whole((960, 540), f"{_DAF_DZ}; {test}"),
        ("idd", "authors"): _whole((960, 540), f"{_DAF_IDD}; {test}"),
        ("gta", "authors"): _whole((1280, 720), f"{_DAF_GTA}; {test}"),
    }


_HRDA_ROWS: dict[tuple[str, str], Protocol] = {
    ("cityscapes", "authors"): _row(
        "slide", (2048, 1024), f"{HRDA} configs/_base_/datasets/uda_gtaHR_to_cityscapesHR_1024x1024.py; test_cfg: "
        f"{MTDA} configs/hrda/gtaHR2csHR_hrda.py", 1024, 512),
    ("cityscapes", "mtda"): replace(_row(
        "slide", (2048, 1024), f"{MTDA} configs/_base_/datasets/test/dtda_cityscapes_test.py; test_cfg: "
        "configs/dtda/test/gtaHR2csHR_and_iddHR_dtda_test_cs.py", 1024, 512), name="mtda"),
    ("idd", "authors"): _row(
        "slide", (1920, 1080), f"{MTDA} configs/_base_/datasets/uda_gtaHR_to_iddHR_1024x1024.py; test_cfg: "
        "configs/hrda/gtaHR2iddHR_hrda.py", 512, 512),
    ("idd", "mtda"): replace(_row(
        "slide", (2048, 1024), f"{MTDA} configs/_base_/datasets/test/dtda_idd_test.py; test_cfg: "
        "configs/dtda/test/gtaHR2csHR_and_iddHR_dtda_test_idd.py", 1024, 512), name="mtda"),
    # The paper's four-target results use ResNet-101 HRDA (gta*_hrda_r101.py); the MiT-B5 ACDC config
    # is the same, the MiT-B5 Dark Zurich one (gtaHR2darkzurichHR_hrda.py) tests at (1920, 1080) with
    # 1024 / 512 windows instead.
    ("acdc", "authors"): _row(
        "slide", (960, 540), f"{MTDA} configs/_base_/datasets/uda_gtaHR_to_acdcHR_512x512.py; test_cfg: "
        "configs/hrda/gtaHR2acdcHR_hrda_r101.py", 512, 512),
    ("darkzurich", "authors"): _row(
        "slide", (960, 540), f"{MTDA} configs/_base_/datasets/uda_gtaHR_to_darkzurichHR_512x512.py; test_cfg: "
        "configs/hrda/gtaHR2darkzurichHR_hrda_r101.py", 512, 512),
    ("gta", "authors"): _row(
        "slide", (1914, 1052), f"{MTDA} configs/_base_/datasets/uda_gtaHR_to_gtaHR_1024x1024.py; test_cfg: "
        "configs/hrda/gtaHR2gtaHR_hrda.py", 1024, 512),
}

TABLE: dict[tuple[str, str, str], Protocol] = {
    **{("hrda", d, v): p for (d, v), p in _HRDA_ROWS.items()},
    **{("daformer", d, v): p for (d, v), p in _lowres(_DAF_TEST).items()},
    **{("deeplabv2", d, v): p for (d, v), p in _lowres(_DLV2_TEST).items()},
}


def family_of(spec: ModelSpec) -> str:
    """Network family of a :class:`~domainmerge.models.spec.ModelSpec`: hrda (HRDA wrapper,
    any head), else daformer or deeplabv2 by decode head."""
    if spec.hrda is not None:
        return "hrda"
    return "deeplabv2" if spec.head == "dlv2" else "daformer"


def table_row(family: str, dataset: str, variant: str = "authors") -> Protocol | None:
    """The table's protocol for (family, dataset, variant); ``mtda`` falls back to the
    single-target row (noted in ``source``) where no multi-target test config exists; None
    where the table has no row."""
    row = TABLE.get((family, dataset, variant))
    if row is not None or variant == "authors":
        return row
    single = TABLE.get((family, dataset, "authors"))
    if single is None:
        return None
    return replace(single, name="mtda", source=f"no multi-target test config for {family} on {dataset}; "
                                                f"the single-target row: {single.source}")


def resolve(family: str | None, dataset: str, protocol: str | None = None, *, mode: str | None = None,
            crop: tuple[int, int] | None = None, stride: tuple[int, int] | None = None,
            img_scale: tuple[int, int] | None = None) -> Protocol:
    """The settings to evaluate ``dataset`` (kind) with a network of ``family``.

    ``protocol`` None: ``custom`` when any of mode/crop/stride/img_scale is given, else the
    ``authors`` row when the table has one, else native resolution, whole image. ``authors`` or
    ``mtda`` together with explicit settings is an error naming both; ``authors``/``mtda``
    for a (family, dataset) without a row is an error. ``custom`` fills what is not given with
    whole image, native resolution, windows 1024 / stride 512.
    """
    given = {k: v for k, v in (("mode", mode), ("crop", crop), ("stride", stride), ("img_scale", img_scale))
             if v is not None}
    if protocol is not None and protocol not in PROTOCOLS:
        raise UserError(Option("protocol", protocol), f": unknown; use one of {', '.join(PROTOCOLS)}")
    if protocol in VARIANTS and given:
        opts = [part for i, k in enumerate(given) for part in ((", " if i else ""), Option(k))]
        raise UserError(Option("protocol", protocol), " sets mode, windows and scale itself; drop ", *opts,
                        " or use ", Option("protocol", "custom"))
    if protocol == "custom" or (protocol is None and given):
        check_protocol_settings(protocol, mode=mode, crop=crop, stride=stride, img_scale=img_scale)
        s = {**CUSTOM_DEFAULTS, **_default_stride(given)}
        slide = s["mode"] == "slide"
        return Protocol("custom", s["mode"], tuple(s["crop"]) if slide else None,
                        tuple(s["stride"]) if slide else None,
                        tuple(s["img_scale"]) if s["img_scale"] else None, "command-line options")
    variant = protocol or "authors"
    row = table_row(family, dataset, variant) if family else None
    if row is not None:
        return row
    if protocol is not None:
        raise UserError(Option("protocol", protocol), f": no {variant} protocol for a {family or 'unknown'} "
                        f"network on dataset kind {dataset}; use ", Option("protocol", "custom"), " with ",
                        Option("mode"), "/", Option("crop"), "/", Option("stride"), "/", Option("img_scale"))
    return Protocol("native", "whole", None, None, None,
                    f"no authors' protocol for a {family or 'unknown'} network on dataset kind {dataset}")


def _default_stride(given: dict[str, Any]) -> dict[str, Any]:
    """Windows given without a stride overlap by half, as the default 1024 / 512 do."""
    if given.get("crop") is not None and given.get("stride") is None:
        return {**given, "stride": (max(1, given["crop"][0] // 2), max(1, given["crop"][1] // 2))}
    return given


def check_protocol_settings(protocol: str | None = None, *, mode: str | None = None,
                            crop: tuple[int, int] | None = None, stride: tuple[int, int] | None = None,
                            img_scale: tuple[int, int] | None = None) -> None:
    """Explicit test settings that cannot work, refused before any work: sizes that are not two
    positive numbers, and (slide mode) a stride larger than the windows, which would leave the
    pixels between windows without a prediction."""
    given = {k: v for k, v in (("crop", crop), ("stride", stride), ("img_scale", img_scale)) if v is not None}
    for name in ("crop", "stride", "img_scale"):
        value = given.get(name)
        if value is None:
            continue
        pair = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        if len(pair) != 2 or not all(isinstance(v, int) and v >= 1 for v in pair):
            raise UserError(Option(name), f" {' '.join(map(str, pair))}: must be two positive sizes")
    if protocol in VARIANTS:
        return
    s = {**CUSTOM_DEFAULTS, **_default_stride(given), **({"mode": mode} if mode else {})}
    if s["mode"] == "slide" and (s["stride"][0] > s["crop"][0] or s["stride"][1] > s["crop"][1]):
        raise UserError(Option("stride"), f" ({s['stride'][0]}, {s['stride'][1]}) is larger than the windows ",
                        Option("crop"), f" ({s['crop'][0]}, {s['crop'][1]}): the pixels between windows would "
                        "get no prediction; give a stride of at most the crop")


def markdown_table() -> str:
    """The whole table as Markdown (family, dataset, variant, scale, mode, crop/stride, source)."""
    lines = ["| family | dataset | variant | img_scale | mode | crop / stride | source |", "|---" * 7 + "|"]
    for (family, dataset, variant), p in TABLE.items():
        scale = f"{p.img_scale[0]}x{p.img_scale[1]}" if p.img_scale else "native"
        win = f"{p.crop[0]} / {p.stride[0]}" if p.crop and p.stride else "-"
        lines.append(f"| {family} | {dataset} | {variant} | {scale} | {p.mode} | {win} | {p.source} |")
    return "\n".join(lines) + "\n"

"""The authors' self-training recipes as one frozen dataclass, with defaults per recipe.

Values and where they come from (files of lhoyer/DAFormer, lhoyer/HRDA, lhoyer/MIC and
AIR-DISCOVER/Model-Merging-MTDA; the merging paper trains with the HRDA recipe):

- optimiser: ``configs/_base_/schedules/adamw.py`` (AdamW lr 6e-5, betas (0.9, 0.999), weight
  decay 0.01) and the per-experiment ``paramwise_cfg`` (``head`` lr x10, ``pos_block`` and
  ``norm`` decay x0), e.g. ``configs/hrda/gtaHR2iddHR_hrda.py``;
- schedule: ``configs/_base_/schedules/poly10warm.py`` (poly power 1.0, min_lr 0, linear
  warm-up 1500 iterations from ratio 1e-6); ``runner max_iters=40000``; batch 2
  (``samples_per_gpu=2`` in the dataset bases);
- self-training: ``configs/_base_/uda/dacs.py`` (pseudo threshold 0.968, ClassMix, colour jitter
  strength 0.2 with ``color_jitter_probability`` 0.2, which DACS compares as ``uniform > p``, so
  the jitter runs on 80 % of iterations; Gaussian blur on 50 %) and ``dacs_a999_fdthings.py`` (alpha 0.999,
  ImageNet feature distance lambda 0.005 on classes 6, 7, 11-18 with min ratio 0.75);
- DAFormer: ``configs/daformer/gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5_s0.py``
  (pseudo-weight ignore top 15 / bottom 120 rows; RCS temperature 0.01, min pixels 3000, min crop
  ratio 0.5) and ``configs/_base_/datasets/uda_gta_to_cityscapes_512x512.py`` (GTA resized to
  1280x720, Cityscapes to 1024x512, 512x512 crops, cat_max_ratio 0.75, flip 0.5);
- HRDA: ``configs/hrda/gtaHR2csHR_hrda.py`` (scales [1, 0.5], detail crop 512, detail loss
  0.1, crop coordinates divisible by 8, features for the distance at scale 0.5, RCS min crop
  ratio 2.0, pseudo-label margins [30, 240, 30, 30] of the stored image) and
  ``configs/_base_/datasets/uda_gtaHR_to_cityscapesHR_1024x1024.py`` (GTA at 2560x1440,
  Cityscapes at 2048x1024, 1024x1024 crops); the resize and crop sizes per dataset kind live in
  :func:`domainmerge.data.training.recipe_crops`;
- MIC: ``seg/configs/mic/gtaHR2csHR_mic_hrda.py`` (mode ``separatetrgaug``, block masks of 64
  pixels, mask ratio 0.7, lambda 1, same teacher and threshold as self-training).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from domainmerge.errors import Option, UserError

RECIPES = ("daformer", "hrda")
DETAIL_BOXES = ("batch", "image")
# Cityscapes train ids of the 'thing' classes: pole, traffic light, traffic sign, person, rider,
# car, truck, bus, train, motorcycle, bicycle minus pole (dacs_a999_fdthings.py).
THING_CLASSES = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)


@dataclass(frozen=True)
class Recipe:
    """Every hyper-parameter of one self-training run (defaults: DAFormer's GTA->Cityscapes)."""

    name: str = "daformer"
    # -- optimisation
    iters: int = 40000
    batch_size: int = 2                    # images per domain, iteration and process
    lr: float = 6e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    head_lr_mult: float = 10.0             # custom key 'head'
    no_decay_keys: tuple[str, ...] = ("pos_block", "norm")
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    power: float = 1.0
    # -- self-training (DACS)
    uda: bool = True                       # False: supervised training on the source only
    alpha: float = 0.999
    pseudo_threshold: float = 0.968
    ignore_top: int = 15                   # pseudo-weight rows ignored at the top of the crop
    ignore_bottom: int = 120
    jitter_strength: float = 0.2
    jitter_skip: float = 0.2               # DACS color_jitter_probability: jitter when U(0, 1) > it (80 %)
    blur: bool = True                      # blur when U(0, 1) > 0.5
    fd_lambda: float = 0.005
    fd_classes: tuple[int, ...] = THING_CLASSES
    fd_min_ratio: float = 0.75
    # -- data (resize and crop sizes per dataset kind: domainmerge.data.training.recipe_crops)
    pseudo_margins: tuple[int, int, int, int] | None = None   # HRDA: (top, bottom, left, right) of the image
    rcs: bool = True
    rcs_temperature: float = 0.01
    rcs_min_pixels: int = 3000
    rcs_min_crop_ratio: float = 0.5
    # -- HRDA
    hrda: bool = False
    detail_crop: tuple[int, int] = (512, 512)
    detail_loss_weight: float = 0.1
    crop_divisible: int = 8
    detail_boxes: str = "batch"            # 'batch': one detail box per batch (HRDA); 'image': one per image
    # -- MIC
    mic: bool = False
    mask_ratio: float = 0.7
    mask_block_size: int = 64
    mic_lambda: float = 1.0

    def __post_init__(self) -> None:
        if self.detail_boxes not in DETAIL_BOXES:
            raise UserError(f"recipe {self.name!r}: detail_boxes {self.detail_boxes!r}; choose one of "
                            f"{', '.join(DETAIL_BOXES)}")
        if not 0.0 <= self.jitter_skip <= 1.0:
            raise UserError(f"recipe {self.name!r}: jitter_skip {self.jitter_skip} must lie in [0, 1]")

    def replace(self, **changes: Any) -> Recipe:
        """A copy with ``changes``; unknown names are a UserError."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise UserError(f"recipe {self.name!r}: unknown setting(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)


def get_recipe(name: str = "daformer", *, mic: bool = False, **overrides: Any) -> Recipe:
    """The authors' settings for ``name``, with MIC when ``mic``.

    Args:
        name: ``'daformer'`` (DAFormer's DACS recipe) or ``'hrda'`` (HRDA's multi-resolution one).
        mic: add MIC's masked image consistency.
        overrides: fields of :class:`Recipe` to change (``iters=...``, ``batch_size=...``).

    Returns:
        The frozen :class:`Recipe`.

    Example:
        >>> from domainmerge import get_recipe
        >>> r = get_recipe("hrda", mic=True, iters=10)
        >>> r.name, r.hrda, r.mic, r.iters, r.pseudo_margins
        ('hrda', True, True, 10, (30, 240, 30, 30))
    """
    if name not in RECIPES:
        raise UserError(Option("recipe", name), f": unknown; choose one of {', '.join(RECIPES)}")
    recipe = Recipe()
    if name == "hrda":
        # HRDA masks the pseudo-label margins of the stored image (before resize and crop)
        # instead of the top/bottom rows of the crop.
        recipe = recipe.replace(name="hrda", hrda=True, rcs_min_crop_ratio=2.0, ignore_top=0, ignore_bottom=0,
                                pseudo_margins=(30, 240, 30, 30))
    if mic:
        recipe = recipe.replace(mic=True)
    return recipe.replace(**overrides)


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _describe_type(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe_type(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe_type(args[0]).split(' ', 1)[-1]}s"
        return f"a list of {len(args)} {_describe_type(args[0]).split(' ', 1)[-1]}s"
    return _TYPE_NAMES.get(kind, getattr(kind, "__name__", str(kind)))


def _convert(value: Any, kind: Any) -> tuple[bool, Any]:
    """(True, ``value`` as type ``kind``) or (False, None)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        for a in args:
            if (value is None) if a is type(None) else value is not None:
                ok, out = _convert(value, a)
                if ok:
                    return True, out
        return False, None
    if origin is tuple:
        if not isinstance(value, list | tuple):
            return False, None
        items = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(items) != len(value):
            return False, None
        converted = [_convert(v, t) for v, t in zip(value, items)]
        return (True, tuple(c[1] for c in converted)) if all(c[0] for c in converted) else (False, None)
    if kind is bool or kind is str:
        return (True, value) if isinstance(value, kind) else (False, None)
    if isinstance(value, bool):
        return False, None
    if kind is int:
        return (True, value) if isinstance(value, int) else (False, None)
    if kind is float:
        try:   # YAML 1.1 reads 1e-4 (no dot) as a string
            return (True, float(value)) if isinstance(value, int | float | str) else (False, None)
        except ValueError:
            return False, None
    return False, None


def recipe_settings(settings: Mapping[str, Any], *, where: str = "recipe") -> dict[str, Any]:
    """Recipe values (e.g. read from YAML or ``name=value`` strings parsed as YAML) checked
    against the fields of :class:`Recipe` and converted to their types (lists become tuples).
    ``where`` names the source in errors (a file, or the option that gave them)."""
    hints = typing.get_type_hints(Recipe)
    out: dict[str, Any] = {}
    for name, value in settings.items():
        if name not in hints or name == "name":
            known = ", ".join(f.name for f in dataclasses.fields(Recipe) if f.name != "name")
            raise UserError(f"{where}: {name!r} is not a recipe setting; known: {known}")
        ok, typed = _convert(value, hints[name])
        if not ok:
            raise UserError(f"{where}: recipe setting {name}={value!r}: expected {_describe_type(hints[name])}")
        out[name] = typed
    return out


def parse_settings(items: list[str] | tuple[str, ...], *, where: str = "recipe") -> dict[str, Any]:
    """``['warmup_iters=50', 'rcs=false', 'betas=[0.9, 0.99]']`` -> typed recipe values (each
    value is read as YAML, then checked as :func:`recipe_settings` does)."""
    import yaml

    raw: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise UserError(f"{where}: {item!r}: give NAME=VALUE, e.g. warmup_iters=50")
        try:
            raw[name.strip()] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raw[name.strip()] = text
    return recipe_settings(raw, where=where)


def read_recipe_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The typed recipe values of a YAML file holding a mapping ``setting: value``."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"{p}: cannot read the recipe file ({exc.strerror or type(exc).__name__})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{p}: not a YAML recipe file ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{p}: a recipe file holds a mapping of settings (e.g. 'warmup_iters: 50'), "
                        f"not a {type(data).__name__}")
    return recipe_settings({str(k): v for k, v in data.items()}, where=str(p))

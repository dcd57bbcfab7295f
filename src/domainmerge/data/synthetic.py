"""A procedural multi-domain driving world: street scenes with Cityscapes train-id labels.

One labeled source domain (``game``: clean, saturated rendering) and unlabeled target domains
that differ in appearance AND content, the way the paper's datasets do:

- ``city``  Cityscapes-like: grey roads with sidewalks, tall buildings, parked cars.
- ``idd``   IDD-like unstructured road: dirt road without sidewalks, terrain verges, low
            buildings, many people, motorcycles and trucks, dusty tint.
- ``fog``   ACDC-like adverse weather: city content under depth haze, low contrast, rain streaks.
- ``night`` Dark-Zurich-like: dark, blue-tinted, sensor noise, lit windows, lamps and car lights.

``pretrain`` is a disjoint family (random textured shapes) standing in for ImageNet: the
backbone learns generic colour/edge/texture features there, never street scenes.

Everything is a pure function of (seed, domain, split, index): the same arguments give the same
pixels on any machine. Images are uint8 [3, H, W], labels int64 [H, W] in train ids 0..18.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from domainmerge.errors import UserError

ROAD, SIDEWALK, BUILDING, FENCE, POLE, LIGHT, SIGN, VEG, TERRAIN, SKY = 0, 1, 2, 4, 5, 6, 7, 8, 9, 10
PERSON, CAR, TRUCK, MOTORCYCLE = 11, 13, 14, 17
#: The train ids this world draws (14 of the 19 Cityscapes classes).
USED_CLASSES = (ROAD, SIDEWALK, BUILDING, FENCE, POLE, LIGHT, SIGN, VEG, TERRAIN, SKY,
                PERSON, CAR, TRUCK, MOTORCYCLE)
SOURCE = "game"
TARGETS = ("city", "idd", "fog", "night")
DOMAINS = (SOURCE, *TARGETS, "pretrain")
SPLITS = ("train", "val")
DEFAULT_SIZE = (64, 128)


@dataclass(frozen=True)
class Content:
    """What a domain's scenes contain (layout and class frequencies)."""

    sidewalk: float = 1.0          # probability that the road has sidewalks
    fence: float = 0.3             # probability of a fence along the verge
    building: float = 0.85         # share of the skyline covered by buildings
    building_height: tuple[float, float] = (0.25, 0.7)  # of the horizon height
    road_width: tuple[float, float] = (0.55, 0.8)      # half width at the bottom, of W
    cars: tuple[int, int] = (1, 4)
    trucks: tuple[int, int] = (0, 1)
    persons: tuple[int, int] = (0, 3)
    motorcycles: tuple[int, int] = (0, 1)
    poles: tuple[int, int] = (1, 4)
    trees: tuple[int, int] = (1, 4)
    lane_marks: bool = True


@dataclass(frozen=True)
class Look:
    """How a domain renders: class colours, saturation, texture noise and weather/light effects."""

    palette: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    saturation: float = 1.0        # 1 keeps colours, < 1 pulls them towards grey
    noise: float = 4.0             # per-pixel texture noise (0-255 scale)
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    gain: float = 1.0              # global brightness factor
    fog: float = 0.0               # haze strength at the horizon
    rain: int = 0                  # number of rain streaks
    night: bool = False            # lamps, lit windows, head/tail lights, dark sky


_GAME = {ROAD: (70, 68, 84), SIDEWALK: (226, 140, 190), BUILDING: (190, 92, 64), FENCE: (200, 160, 150),
         POLE: (230, 220, 40), LIGHT: (255, 150, 20), SIGN: (250, 230, 0), VEG: (40, 200, 50),
         TERRAIN: (170, 210, 70), SKY: (60, 150, 255), PERSON: (230, 30, 70), CAR: (30, 40, 230),
         TRUCK: (20, 190, 200), MOTORCYCLE: (130, 20, 230)}
_CITY = {ROAD: (112, 106, 108), SIDEWALK: (160, 150, 146), BUILDING: (128, 122, 112),
         FENCE: (150, 145, 135), POLE: (120, 120, 125), LIGHT: (90, 90, 70), SIGN: (190, 170, 60),
         VEG: (80, 112, 60), TERRAIN: (125, 135, 85), SKY: (190, 200, 215), PERSON: (100, 80, 90),
         CAR: (90, 95, 120), TRUCK: (120, 130, 120), MOTORCYCLE: (70, 60, 80)}
_IDD = {**_CITY, ROAD: (138, 116, 88), TERRAIN: (150, 122, 82), BUILDING: (176, 142, 110),
        VEG: (104, 124, 56), SKY: (205, 202, 188), TRUCK: (160, 120, 60), MOTORCYCLE: (60, 50, 60)}

CONTENT: dict[str, Content] = {
    "game": Content(cars=(1, 4), persons=(0, 3), trucks=(0, 1), motorcycles=(0, 1)),
    "city": Content(building=0.95, building_height=(0.35, 0.85), cars=(2, 6), persons=(1, 3),
                    trucks=(0, 1), motorcycles=(0, 0), trees=(0, 3)),
    "idd": Content(sidewalk=0.0, fence=0.1, building=0.5, building_height=(0.15, 0.45),
                   road_width=(0.4, 0.6), cars=(0, 2), trucks=(1, 2), persons=(3, 7),
                   motorcycles=(2, 4), poles=(0, 2), trees=(2, 5), lane_marks=False),
    "fog": Content(building=0.9, cars=(1, 5), persons=(0, 3), motorcycles=(0, 0)),
    "night": Content(building=0.95, building_height=(0.35, 0.85), cars=(2, 5), persons=(0, 2),
                     motorcycles=(0, 0), poles=(2, 4)),
}
LOOK: dict[str, Look] = {
    "game": Look(_GAME, saturation=1.0, noise=3.0),
    "city": Look(_CITY, saturation=0.8, noise=7.0),
    "idd": Look(_IDD, saturation=0.85, noise=9.0, tint=(1.08, 1.0, 0.86)),
    "fog": Look(_CITY, saturation=0.6, noise=6.0, fog=0.75, rain=60, tint=(0.96, 0.98, 1.04)),
    "night": Look(_CITY, saturation=0.5, noise=10.0, gain=0.28, tint=(0.85, 0.9, 1.2), night=True),
}


def _rng(seed: int, domain: str, split: str, index: int) -> np.random.Generator:
    """A generator that depends only on (seed, domain, split, index), stable across platforms."""
    digest = hashlib.sha256(f"{seed}/{domain}/{split}/{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _rect(label: np.ndarray, y0: float, y1: float, x0: float, x1: float, cls: int) -> tuple[int, ...]:
    """Paint an axis-aligned box (clipped, at least one pixel) and return its integer corners."""
    h, w = label.shape
    a, b = int(np.clip(round(y0), 0, h - 1)), int(np.clip(round(y1), 1, h))
    c, d = int(np.clip(round(x0), 0, w - 1)), int(np.clip(round(x1), 1, w))
    b, d = max(b, a + 1), max(d, c + 1)
    label[a:b, c:d] = cls
    return a, b, c, d


def _street(rng: np.random.Generator, content: Content, h: int, w: int
            ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int]], float]:
    """The label map of one street scene, a per-pixel instance shade, light spots, horizon row.

    Returns (label [H, W] int64, shade [H, W] float in [-1, 1], lights [(y, x, kind)], horizon).
    """
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    horizon = float(h * rng.uniform(0.36, 0.5))
    vx = float(w * rng.uniform(0.4, 0.6))                       # vanishing point column
    label = np.full((h, w), SKY, np.int64)
    shade = np.zeros((h, w))
    lights: list[tuple[int, int, int]] = []

    # Skyline: piecewise-constant building blocks, trees in the gaps.
    x = 0.0
    while x < w:
        bw = rng.uniform(0.08, 0.25) * w
        if rng.random() < content.building:
            top = horizon * (1 - rng.uniform(*content.building_height))
            a, b, c, e = _rect(label, top, horizon + 1, x, x + bw, BUILDING)
            shade[a:b, c:e] = rng.uniform(-0.6, 0.6)
        x += bw
    for _ in range(rng.integers(content.trees[0], content.trees[1] + 1)):
        cx, cy = rng.uniform(0, w), horizon * rng.uniform(0.5, 0.95)
        r = rng.uniform(0.08, 0.2) * h
        label[(yy - cy) ** 2 + ((xx - cx) * 0.8) ** 2 < r * r] = VEG
        _rect(label, cy, horizon + 1, cx - 0.6, cx + 0.6, VEG)   # trunk counts as vegetation

    # Ground: road trapezoid towards the vanishing point, sidewalks or terrain verges beside it.
    below = yy >= horizon
    depth = np.clip((yy - horizon) / (h - horizon), 0, 1)      # 0 at the horizon, 1 at the bottom
    half = (0.02 + rng.uniform(*content.road_width)) * w * depth
    off = np.abs(xx - vx - (xx * 0 + rng.uniform(-0.1, 0.1) * w * depth))
    has_sidewalk = rng.random() < content.sidewalk
    label[below] = TERRAIN if not has_sidewalk or rng.random() < 0.5 else SIDEWALK
    if has_sidewalk:
        label[below & (off < half * 1.45)] = SIDEWALK
    road = below & (off < half)
    label[road] = ROAD
    if content.lane_marks:
        shade[road & (np.abs(xx - vx) < 0.6 + depth) & (np.floor(depth * 10) % 2 == 0)] = 1.0
    if rng.random() < content.fence:
        fy = horizon + rng.uniform(0.0, 0.1) * h
        side = (xx < vx - half * 1.5) | (xx > vx + half * 1.5)
        label[side & (yy >= fy - 0.08 * h) & (yy < fy + 0.06 * h) & (yy >= horizon - 0.08 * h)] = FENCE

    # Objects, far to near so nearer ones occlude: each scales with its depth.
    objects: list[tuple[float, str]] = []
    for kind, (lo, hi) in (("pole", content.poles), ("car", content.cars), ("truck", content.trucks),
                           ("person", content.persons), ("moto", content.motorcycles)):
        objects += [(rng.uniform(0.05, 0.95), kind) for _ in range(rng.integers(lo, hi + 1))]
    for dd, kind in sorted(objects):
        d = float(dd)
        base = horizon + d * (h - horizon)                   # ground row of the object
        scale = 0.15 + 0.85 * d                              # perspective size
        half_road = (0.02 + float(np.mean(content.road_width))) * w * d
        if kind == "pole":
            x0 = vx + rng.choice([-1, 1]) * half_road * rng.uniform(1.2, 1.8)
            top = base - scale * h * 0.9
            _rect(label, top, base, x0, x0 + max(1.0, 1.5 * scale), POLE)
            if rng.random() < 0.5:
                _rect(label, top, top + 5 * scale + 1, x0 - 2 * scale, x0 + 3 * scale + 1, SIGN)
            else:
                _rect(label, top, top + 6 * scale + 1, x0, x0 + 2 * scale + 1, LIGHT)
            lights.append((int(np.clip(top, 0, h - 1)), int(np.clip(x0, 0, w - 1)), 0))
        elif kind in ("car", "truck"):
            cw = (26 if kind == "car" else 34) * scale
            ch = (12 if kind == "car" else 24) * scale
            x0 = vx + rng.uniform(-1.0, 0.9) * half_road - cw / 2
            a, b, c, e = _rect(label, base - ch, base, x0, x0 + cw, CAR if kind == "car" else TRUCK)
            shade[a:b, c:e] = rng.uniform(-1, 1)
            lights.append((int(b - 1 - (b - a) // 3), c, 1))
            lights.append((int(b - 1 - (b - a) // 3), e - 1, 1))
        elif kind == "person":
            ph, pw = 26 * scale, 7 * scale
            x0 = vx + rng.choice([-1, 1]) * half_road * rng.uniform(0.8, 1.4)
            a, b, c, e = _rect(label, base - ph, base, x0, x0 + pw, PERSON)
            shade[a:b, c:e] = rng.uniform(-1, 1)
        else:  # motorcycle with its rider (labelled person, as riders mostly look like people here)
            mh, mw = 9 * scale, 14 * scale
            x0 = vx + rng.uniform(-0.9, 0.8) * half_road
            _rect(label, base - mh - 12 * scale, base - mh * 0.6, x0 + mw * 0.3, x0 + mw * 0.7, PERSON)
            a, b, c, e = _rect(label, base - mh, base, x0, x0 + mw, MOTORCYCLE)
            shade[a:b, c:e] = rng.uniform(-1, 1)
    return label, shade, lights, horizon


def _render(rng: np.random.Generator, label: np.ndarray, shade: np.ndarray,
            lights: list[tuple[int, int, int]], horizon: float, look: Look) -> np.ndarray:
    """Colour a label map in a domain's look; returns float RGB [H, W, 3] in 0..255."""
    h, w = label.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    lut = np.zeros((256, 3))
    for cls, rgb in look.palette.items():
        lut[cls] = rgb
    img = lut[label]
    # Instances differ in colour (cars, people), buildings in brightness: shape, not colour alone.
    hue = np.stack([np.sin(shade * 3.1 + k * 2.1) for k in range(3)], -1)
    thing = np.isin(label, (PERSON, CAR, TRUCK, MOTORCYCLE))[..., None]
    img = img + np.where(thing, 70 * hue, 40 * shade[..., None])
    # Textures: windows on buildings, leafy noise on vegetation, gradient sky, lane marks.
    windows = (label == BUILDING) & (yy % 6 < 3) & (xx % 5 < 2)
    img[windows] *= 0.55
    img[label == VEG] *= (0.75 + 0.5 * rng.random((int((label == VEG).sum()), 1)))
    sky = label == SKY
    img[sky] *= (0.85 + 0.3 * (yy[sky] / max(horizon, 1.0)))[:, None]
    img[(shade == 1.0) & (label == ROAD)] = 235.0
    # Saturation, tint and brightness, then weather.
    grey = img.mean(-1, keepdims=True)
    img = grey + look.saturation * (img - grey)
    img = img * np.asarray(look.tint) * look.gain
    if look.night:
        # A dark sky, brightest at the horizon (city glow): dark, yet still a smooth sky-like region.
        glow_sky = 0.35 + 0.65 * (yy[sky] / max(horizon, 1.0))
        img[sky] = glow_sky[:, None] * np.asarray([22.0, 28.0, 58.0])
        lit = windows & (rng.random((h, w)) < 0.25)
        img[lit] = np.asarray([230.0, 190.0, 90.0])
        for y, x, kind in lights:
            r2 = (yy - y) ** 2 + (xx - x) ** 2
            glow = np.exp(-r2 / (6.0 if kind == 0 else 2.5))
            colour = np.asarray([255.0, 220.0, 150.0] if kind == 0 else [255.0, 80.0, 60.0])
            img = img + glow[..., None] * colour * (0.9 if kind == 0 else 0.7)
    if look.fog > 0:
        dist = np.exp(-np.abs(yy - horizon) / (0.35 * h))      # haze thickest at the horizon
        alpha = (look.fog * (0.55 + 0.45 * dist))[..., None]
        img = (1 - alpha) * img + alpha * np.asarray([200.0, 203.0, 208.0])
    if look.rain:
        for _ in range(look.rain):
            x0, y0, n = rng.uniform(0, w), rng.uniform(-10, h), int(rng.integers(4, 10))
            ys = np.clip((y0 + np.arange(n)).astype(int), 0, h - 1)
            xs = np.clip((x0 + 0.3 * np.arange(n)).astype(int), 0, w - 1)
            img[ys, xs] = 0.5 * img[ys, xs] + 0.5 * 235.0
    img = img + rng.normal(0.0, look.noise, img.shape)
    return np.clip(img, 0, 255)


_SHAPE_COLOURS = np.asarray([[220, 40, 40], [40, 200, 60], [40, 80, 230], [230, 220, 40],
                             [200, 60, 220], [40, 210, 210], [240, 140, 30], [130, 130, 130]], float)


def _pretrain_scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A disjoint generic task: textured shapes on a textured background, labelled by shape kind.

    Labels 0 background, 1 disc, 2 box, 3 striped box, 4 ring, 5 thin bar, 6 checker blob; the
    colours are random, so the backbone learns shape/edge/texture features, not a colour code.
    """
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    label = np.zeros((h, w), np.int64)
    img = np.ones((h, w, 3)) * rng.uniform(30, 220, 3)
    img += rng.normal(0, rng.uniform(2, 25), (h, w, 1)) + 30 * np.sin(xx / rng.uniform(2, 9))[..., None] * (
        rng.random() < 0.5)
    for _ in range(rng.integers(3, 9)):
        kind = int(rng.integers(1, 7))
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = rng.uniform(0.06, 0.25) * h
        if kind == 1:
            m = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        elif kind == 2:
            m = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r * rng.uniform(0.5, 2))
        elif kind == 3:
            m = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r * 1.5) & (yy % 4 < 2)
        elif kind == 4:
            d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
            m = (d < r) & (d > 0.6 * r)
        elif kind == 5:
            m = (np.abs(xx - cx) < 1.2) & (np.abs(yy - cy) < 2 * r)
        else:
            m = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) & (((yy // 3) + (xx // 3)) % 2 == 0)
        colour = _SHAPE_COLOURS[rng.integers(len(_SHAPE_COLOURS))] * rng.uniform(0.4, 1.1)
        img[m] = colour + rng.normal(0, 8, (int(m.sum()), 3))
        label[m] = kind
    return np.clip(img, 0, 255), label


def make_sample(domain: str, split: str, index: int, *, seed: int = 0,
                size: tuple[int, int] = DEFAULT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8 [3, H, W], label int64 [H, W]) pair, a pure function of its arguments."""
    if domain not in DOMAINS:
        raise UserError(f"synthetic domain {domain!r} unknown; choose one of {', '.join(DOMAINS)}")
    if split not in SPLITS:
        raise UserError(f"synthetic split {split!r} unknown; choose one of {', '.join(SPLITS)}")
    h, w = size
    rng = _rng(seed, domain, split, index)
    if domain == "pretrain":
        img, label = _pretrain_scene(rng, h, w)
    else:
        label, shade, lights, horizon = _street(rng, CONTENT[domain], h, w)
        img = _render(rng, label, shade, lights, horizon, LOOK[domain])
    image = np.ascontiguousarray(np.round(img).astype(np.uint8).transpose(2, 0, 1))
    return image, label


class SyntheticDataset(torch.utils.data.Dataset):
    """``length`` scenes of one domain and split; items are (image uint8 [3,H,W], label int64 [H,W], name).

    Scenes are generated once on construction and kept in memory (64x128 x 1000 images ~ 33 MB).
    """

    #: Items are indexed from memory: loaders need no worker processes (see evaluation.inference).
    in_memory = True

    def __init__(self, domain: str, split: str = "train", length: int = 100, *, seed: int = 0,
                 size: tuple[int, int] = DEFAULT_SIZE) -> None:
        if length < 1:
            raise UserError(f"synthetic dataset length {length} must be at least 1")
        self.domain, self.split, self.seed = domain, split, seed
        pairs = [make_sample(domain, split, i, seed=seed, size=size) for i in range(length)]
        self.images = torch.from_numpy(np.stack([p[0] for p in pairs]))
        self.labels = torch.from_numpy(np.stack([p[1] for p in pairs]))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        return self.images[index], self.labels[index], f"{self.domain}_{self.split}_{index:05d}"

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, str]]:
        return (self[i] for i in range(len(self)))


def _factory(root: str | object, split: str, *, strict: bool = True, length: int = 100, seed: int = 0,
             size: tuple[int, int] = DEFAULT_SIZE) -> SyntheticDataset:
    """``build_dataset('synthetic', DOMAIN, split, length=..., seed=..., size=...)``: the root names the domain."""
    del strict  # generated scenes are always complete
    return SyntheticDataset(str(root), split, length, seed=seed, size=tuple(size))  # type: ignore[arg-type]


def _register() -> None:
    from domainmerge.data.readers import register_dataset

    register_dataset("synthetic", _factory, overwrite=True)


_register()

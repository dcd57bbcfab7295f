"""Label-id conversions to the 19 Cityscapes train ids (255 = ignored).

- Cityscapes label ids (also used by GTA5 and ACDC's *_labelIds.png) follow cityscapesScripts'
  labels.py.
- IDD: the IDD tools (AutoNUE public-code, helpers/anue_labels.py) give every fine label a
  ``csTrainId``; their *_gtFine_labelcsTrainIds.png files already hold train ids, except that
  some releases use 19-22 for IDD-only classes (animal, autorickshaw, billboard, bridge), which
  the 19-class protocol ignores. From the coarser level-3 ids (*_gtFine_labellevel3Ids.png) the
  mapping is lossy: level 3 merges labels whose csTrainIds differ, and we take the csTrainId of
  the label that names the level-3 class (3 'non-drivable fallback' -> terrain, 4 'person',
  12 'vehicle fallback' -> ignored (train is inseparable from caravan/trailer there), 20 'pole'
  (includes polegroup), 25 'sky' (includes fallback background)).
- IDD polygons (*_gtFine_polygons.json, the release as downloaded): each object's label name
  maps to its ``csTrainId`` (IDD_NAME_TO_TRAIN_ID); ``rasterize_polygons`` draws them as the
  IDD tools' json2labelImg does (see its docstring).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from domainmerge.data.classes import IGNORE_INDEX
from domainmerge.errors import UserError

# Cityscapes label id -> train id; every id not listed maps to 255.
CITYSCAPES_ID_TO_TRAIN_ID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
    25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}

# IDD level-3 id -> Cityscapes train id (see the module docstring for the merged classes).
IDD_LEVEL3_TO_TRAIN_ID: dict[int, int] = {
    0: 0,     # road
    1: 255,   # drivable fallback (+ parking)
    2: 1,     # sidewalk
    3: 9,     # non-drivable fallback -> terrain (+ rail track)
    4: 11,    # person (+ animal)
    5: 12,    # rider
    6: 17,    # motorcycle
    7: 18,    # bicycle
    8: 255,   # autorickshaw
    9: 13,    # car
    10: 14,   # truck
    11: 15,   # bus
    12: 255,  # vehicle fallback (+ caravan, trailer, train)
    13: 255,  # curb
    14: 3,    # wall
    15: 4,    # fence
    16: 255,  # guard rail
    17: 255,  # billboard
    18: 7,    # traffic sign
    19: 6,    # traffic light
    20: 5,    # pole (+ polegroup)
    21: 255,  # obs-str-bar-fallback
    22: 2,    # building
    23: 255,  # bridge (+ tunnel)
    24: 8,    # vegetation
    25: 10,   # sky (+ fallback background)
}

# IDD csTrainId -> train id: 0-18 stay, anything else (19-22 in some releases, 255) is ignored.
IDD_CS_TRAIN_ID_TO_TRAIN_ID: dict[int, int] = {i: i for i in range(19)}

# IDD label name -> Cityscapes train id: the csTrainId column of the IDD tools' anue_labels.py
# (identical in its releases). 'train' keeps train id 16; IDD-only and void labels are ignored.
IDD_NAME_TO_TRAIN_ID: dict[str, int] = {
    "road": 0, "parking": 255, "drivable fallback": 255,
    "sidewalk": 1, "rail track": 255, "non-drivable fallback": 9,
    "person": 11, "animal": 255, "rider": 12,
    "motorcycle": 17, "bicycle": 18, "autorickshaw": 255, "car": 13,
    "truck": 14, "bus": 15, "caravan": 255, "trailer": 255, "train": 16, "vehicle fallback": 255,
    "curb": 255, "wall": 3, "fence": 4, "guard rail": 255,
    "billboard": 255, "traffic sign": 7, "traffic light": 6, "pole": 5, "polegroup": 255,
    "obs-str-bar-fallback": 255,
    "building": 2, "bridge": 255, "tunnel": 255,
    "vegetation": 8, "sky": 10, "fallback background": 255,
    "unlabeled": 255, "ego vehicle": 255, "rectification border": 255, "out of roi": 255,
    "license plate": 255,
}


def rasterize_polygons(json_obj: Any, name_to_id: dict[str, int], *,
                       source: str | Path = "polygon JSON") -> np.ndarray:
    """A uint8 [imgHeight, imgWidth] label map drawn from a Cityscapes-style polygon annotation.

    As the IDD/Cityscapes json2labelImg: the background is 255 (unlabeled); objects are drawn
    in file order, later ones over earlier ones; objects with a true ``deleted`` are skipped;
    a name that is unknown but ends in ``group`` (e.g. ``cargroup``) is read without that
    suffix. Each polygon is filled and outlined with its id (PIL.ImageDraw), so its boundary
    pixels belong to it whatever the Pillow version. An unknown label, or a malformed
    annotation, raises UserError naming ``source``.
    """
    from PIL import Image, ImageDraw

    def bad(what: str) -> UserError:
        return UserError(f"{source}: {what}; expected a polygon annotation "
                         '{"imgHeight": H, "imgWidth": W, "objects": [{"label": ..., "polygon": [[x, y], ...]}]}')

    if not isinstance(json_obj, dict):
        raise bad(f"top level is {type(json_obj).__name__}, not an object")
    for key in ("imgHeight", "imgWidth"):
        value = json_obj.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise bad(f"{key} is {value!r}, not a positive integer")
    objects = json_obj.get("objects")
    if not isinstance(objects, list):
        raise bad(f"objects is {type(objects).__name__}, not a list")
    image = Image.new("L", (json_obj["imgWidth"], json_obj["imgHeight"]), IGNORE_INDEX)
    draw = ImageDraw.Draw(image)
    for index, obj in enumerate(objects):
        if not isinstance(obj, dict) or not isinstance(obj.get("label"), str):
            raise bad(f"object {index} has no string 'label'")
        if obj.get("deleted"):
            continue
        name = obj["label"]
        if name not in name_to_id and name.endswith("group"):
            name = name[:-len("group")]
        if name not in name_to_id:
            raise UserError(f"{source}: object {index} has unknown label {obj['label']!r}; "
                            "rename it to an IDD label (the IDD tools' anue_labels.py) or mark the object deleted")
        value = name_to_id[name]
        if not 0 <= value <= 255:
            raise ValueError(f"label {name!r} maps to {value}, outside 0-255")
        try:
            points = [(float(x), float(y)) for x, y in obj["polygon"]]
            draw.polygon(points, fill=value, outline=value)
        except (KeyError, TypeError, ValueError) as exc:
            raise bad(f"object {index} ({obj['label']!r}) has an unusable polygon ({exc})") from exc
    return np.array(image, dtype=np.uint8)


def lookup_table(mapping: dict[int, int], default: int = IGNORE_INDEX) -> np.ndarray:
    """A 256-entry uint8 table: table[id] = mapping.get(id, default)."""
    table = np.full(256, default, dtype=np.uint8)
    for src, dst in mapping.items():
        table[src] = dst
    return table


def remap(label: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """Map an 8-bit id image through ``mapping`` (unlisted ids -> 255); returns uint8."""
    if label.dtype != np.uint8:
        if label.size and (label.min() < 0 or label.max() > 255):
            raise ValueError(f"label ids must be 0-255, got {label.min()}..{label.max()}")
        label = label.astype(np.uint8)
    return lookup_table(mapping)[label]

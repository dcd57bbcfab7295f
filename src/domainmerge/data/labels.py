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
"""

from __future__ import annotations

import numpy as np

from domainmerge.data.classes import IGNORE_INDEX

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

"""domainmerge.data: dataset readers, label-id tables and the 19-class protocol's constants."""

from domainmerge.data.classes import CLASSES, IGNORE_INDEX, MEAN, NUM_CLASSES, PALETTE, STD
from domainmerge.data.readers import (
    LAYOUTS,
    PairedFolderDataset,
    SegDataset,
    build_dataset,
    dataset_kinds,
    folder_dataset,
    image_dataset,
    load_image,
    load_label,
    pair_files,
    read_label_map,
    register_dataset,
)

__all__ = [
    "CLASSES", "IGNORE_INDEX", "LAYOUTS", "MEAN", "NUM_CLASSES", "PALETTE", "STD",
    "PairedFolderDataset", "SegDataset", "build_dataset", "dataset_kinds", "folder_dataset", "image_dataset",
    "load_image", "load_label", "pair_files", "read_label_map", "register_dataset",
]

"""Checkpoint files: read lazily, unwrap containers, write atomically in the input's format.

Formats read: ``.safetensors`` and PyTorch pickles (``.pth``/``.pt``/``.bin``/``.ckpt``) holding a
bare state dict or a container (``{'state_dict': ...}`` as mmseg/mmcv and Lightning write,
``{'model': ...}``, with ``meta``, ``optimizer`` and other entries). Pickles are loaded with
``weights_only=True`` unless the caller trusts the file.

Low memory: safetensors tensors are read one at a time with plain file reads (no mapping of the
whole file), zip-format pickles are memory-mapped, and a safetensors output can be written
tensor by tensor (:class:`SafetensorsWriter`), so merging K checkpoints never holds K copies.

Modules, by responsibility: ``core`` (the opened :class:`Checkpoint`, formats, container
vocabulary), ``pages`` (dropping clean pages of mapped tensors), ``safetensors_io`` (header
parser and streaming writer), ``pickles`` (state-dict classification, safe loading,
``write_pickle``), ``reading`` (``open_checkpoint``, ``load_state_dict``), ``prefixes`` (wrapper
prefixes and the ``'auto'`` rule), ``writing`` (containers, records, ``save_checkpoint``).
Import the names below from ``domainmerge.checkpoint``.
"""

from domainmerge.checkpoint.core import (
    CONTAINERS,
    DROPPED_ENTRIES,
    PICKLE_SUFFIXES,
    STATE_DICT_KEYS,
    Checkpoint,
    TensorInfo,
)
from domainmerge.checkpoint.pickles import write_pickle
from domainmerge.checkpoint.prefixes import (
    DA_TRAINING,
    WRAPPER_PREFIXES,
    Layout,
    detect_prefixes,
    network_prefix,
    strip_model_prefix,
)
from domainmerge.checkpoint.reading import load_state_dict, open_checkpoint
from domainmerge.checkpoint.safetensors_io import SafetensorsWriter
from domainmerge.checkpoint.writing import (
    CheckpointWriter,
    build_container,
    checkpoint_writer,
    output_format,
    safetensors_metadata,
    save_checkpoint,
    updated_record,
)

__all__ = [
    "CONTAINERS", "DA_TRAINING", "DROPPED_ENTRIES", "PICKLE_SUFFIXES", "STATE_DICT_KEYS", "WRAPPER_PREFIXES",
    "Checkpoint",
    "CheckpointWriter", "Layout", "SafetensorsWriter", "TensorInfo", "build_container", "checkpoint_writer",
    "detect_prefixes", "load_state_dict", "network_prefix", "open_checkpoint", "output_format",
    "safetensors_metadata", "save_checkpoint", "strip_model_prefix", "updated_record", "write_pickle",
]

"""Plain-PyTorch segmentation networks whose state_dict keys and shapes match DAFormer, HRDA and
MIC (mmseg 0.x) checkpoints, with architecture detection from a checkpoint's keys and shapes, and
the one way to read a network from a checkpoint file and write it back (``StoredNetwork``)."""

from domainmerge.models.detect import detect_arch, model_from_state_dict, resolve_spec
from domainmerge.models.registry import ARCHS, build_model, get_spec
from domainmerge.models.spec import HRDAConfig, ModelSpec
from domainmerge.models.stored import StoredNetwork

__all__ = ["ARCHS", "HRDAConfig", "ModelSpec", "build_model", "detect_arch", "get_spec", "model_from_state_dict",
           "resolve_spec", "StoredNetwork"]

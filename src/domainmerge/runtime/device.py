"""The device a run uses."""

from __future__ import annotations

from domainmerge.errors import Option, UserError


def resolve_device(requested: str | None) -> str:
    """``requested``, or cuda when available else cpu; ``cuda`` becomes this process's current device
    (torchrun sets it per rank); a clear error when CUDA is asked for but absent."""
    import torch

    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(Option("device", device), ": no CUDA device is available; use ", Option("device", "cpu"))
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    return device

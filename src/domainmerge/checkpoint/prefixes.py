"""The wrapper prefixes of DA training checkpoints and DataParallel, and the rule that picks the
student network's (``prefix='auto'``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from domainmerge.errors import Option, UserError

# Prefixes that wrap the network inside DA training checkpoints and DataParallel.
WRAPPER_PREFIXES = ("model.", "ema_model.", "imnet_model.", "module.")


def detect_prefixes(keys: Iterable[str]) -> list[str]:
    """The wrapper prefixes (``model.``, ``ema_model.`` ...) that some key starts with."""
    keys = list(keys)
    return [p for p in WRAPPER_PREFIXES if any(k.startswith(p) for k in keys)]


def network_prefix(keys: Iterable[str]) -> str:
    """The wrapper prefix of the student network: ``model.`` when some key has it (DA training
    checkpoints also hold ``ema_model.`` and ``imnet_model.``), else ``module.`` (DataParallel),
    else ``""`` (a bare network). The rule behind every ``prefix='auto'``."""
    found = detect_prefixes(keys)
    return "model." if "model." in found else ("module." if "module." in found else "")


def strip_model_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = "auto") -> dict[str, torch.Tensor]:
    """The student network's tensors without their wrapper prefix.

    ``auto`` takes ``model.`` when present (DA training checkpoints also hold ``ema_model.``
    and ``imnet_model.``), else ``module.``, else keeps keys as they are. An explicit prefix
    selects the keys under it; ``""`` keeps everything.

    Args:
        state_dict: tensor name -> tensor, e.g. from :func:`load_state_dict`.
        prefix: ``"auto"``, an explicit wrapper prefix (``"ema_model."``), or ``""``.

    Returns:
        A new dict of the selected tensors, keys without the prefix (the tensors are not copied).

    Raises:
        UserError: no key starts with the explicit ``prefix``.

    Example:
        >>> import torch
        >>> from domainmerge.checkpoint import strip_model_prefix
        >>> sd = {"model.w": torch.zeros(1), "ema_model.w": torch.ones(1)}
        >>> strip_model_prefix(sd)
        {'w': tensor([0.])}
        >>> strip_model_prefix(sd, "ema_model.")
        {'w': tensor([1.])}
    """
    if prefix == "auto":
        prefix = network_prefix(state_dict)
    if not prefix:
        return dict(state_dict)
    out = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not out:
        raise UserError(f"no tensor key starts with {prefix!r}; found prefixes "
                        f"{detect_prefixes(state_dict) or 'none'}; give the right ", Option("prefix"))
    return out

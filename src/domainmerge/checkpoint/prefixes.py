"""The wrapper prefixes of DA training checkpoints and DataParallel, the named layout of a DA
training container (:data:`DA_TRAINING`) and the rule that picks the student network's
(``prefix='auto'``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from domainmerge.errors import Option, UserError


@dataclass(frozen=True)
class Layout:
    """Where the networks of a container sit in its state dict: one wrapper prefix per role.

    ``wrap`` puts networks under their prefixes (roles in the layout's order), ``network`` takes
    one back out (keys without the prefix).
    """

    name: str
    prefixes: tuple[tuple[str, str], ...]    # (role, prefix), in the order they are written

    def prefix(self, role: str) -> str:
        """The wrapper prefix of ``role`` (``'student'`` -> ``'model.'`` in :data:`DA_TRAINING`)."""
        for r, p in self.prefixes:
            if r == role:
                return p
        raise KeyError(f"{self.name}: no role {role!r}; roles: {', '.join(r for r, _ in self.prefixes)}")

    def wrap(self, **networks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One state dict holding each network under its role's prefix (roles in layout order;
        a role not given is left out)."""
        unknown = set(networks) - {r for r, _ in self.prefixes}
        if unknown:
            raise KeyError(f"{self.name}: no role {sorted(unknown)[0]!r}")
        return {p + k: v for r, p in self.prefixes if r in networks for k, v in networks[r].items()}

    def network(self, state_dict: Mapping[str, torch.Tensor], role: str) -> dict[str, torch.Tensor]:
        """The tensors of ``role``'s network, keys without its prefix (:func:`strip_model_prefix`:
        a UserError when no key has it)."""
        return strip_model_prefix(state_dict, self.prefix(role))

    def networks(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """Every role's tensors, keys without its prefix (empty for a role the state dict lacks);
        keys under no role's prefix are left out."""
        return {role: {k[len(p):]: v for k, v in state_dict.items() if k.startswith(p)} for role, p in self.prefixes}


# The container DAFormer / HRDA / MIC training (and domainmerge adapt) writes: the student, its EMA
# teacher and the frozen ImageNet copy for the feature distance, in one mmseg state dict.
DA_TRAINING = Layout("DA training checkpoint", (("student", "model."), ("teacher", "ema_model."),
                                                 ("imnet", "imnet_model.")))

# Prefixes that wrap the network inside DA training checkpoints and DataParallel.
WRAPPER_PREFIXES = (*(p for _, p in DA_TRAINING.prefixes), "module.")


def detect_prefixes(keys: Iterable[str]) -> list[str]:
    """The wrapper prefixes (``model.``, ``ema_model.`` ...) that some key starts with."""
    keys = list(keys)
    return [p for p in WRAPPER_PREFIXES if any(k.startswith(p) for k in keys)]


def network_prefix(keys: Iterable[str]) -> str:
    """The wrapper prefix of the student network: ``model.`` when some key has it (DA training
    checkpoints also hold ``ema_model.`` and ``imnet_model.``), else ``module.`` (DataParallel),
    else ``""`` (a bare network). The rule behind every ``prefix='auto'``."""
    found = detect_prefixes(keys)
    student = DA_TRAINING.prefix("student")
    return student if student in found else ("module." if "module." in found else "")


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

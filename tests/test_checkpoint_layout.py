"""The DA-training container layout (checkpoint.DA_TRAINING) and StoredNetwork: a network read out
of a container and written back, every other entry kept (compared with the tensors put in)."""

from __future__ import annotations

import pytest
import torch

from domainmerge.checkpoint import DA_TRAINING, load_state_dict, open_checkpoint, save_checkpoint
from domainmerge.errors import UserError
from domainmerge.models import StoredNetwork, build_model


def test_layout_wraps_and_unwraps_by_role() -> None:
    a, b = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
    sd = DA_TRAINING.wrap(teacher=b, student=a)
    assert list(sd) == ["model.w", "ema_model.w"]          # layout order, not argument order
    assert DA_TRAINING.networks({**sd, "other.x": torch.ones(1)}) == {"student": a, "teacher": b, "imnet": {}}
    assert DA_TRAINING.network(sd, "teacher") == b
    with pytest.raises(UserError, match="imnet_model"):
        DA_TRAINING.network(sd, "imnet")
    with pytest.raises(KeyError):
        DA_TRAINING.wrap(ema=a)


def test_stored_network_writes_back_only_its_tensors(tmp_path) -> None:
    torch.manual_seed(0)
    net = build_model("tiny_daformer_r").state_dict()
    half = {k: v.half() if v.is_floating_point() else v for k, v in net.items()}
    path = save_checkpoint(tmp_path / "run.pth", DA_TRAINING.wrap(student=half, teacher=net), meta={"iter": 3})
    with StoredNetwork.open(path, prefix="ema_model.") as stored:
        assert stored.prefix == "ema_model."
        model = stored.build()
        changed = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
        out = stored.save(tmp_path / "out.pth", changed, record=stored.updated_record(step="test"))
    written = load_state_dict(out)
    for k, v in net.items():
        assert torch.equal(written["model." + k], half[k])                      # the student untouched
        assert torch.equal(written["ema_model." + k], changed[k].to(v.dtype))   # the teacher replaced
    with open_checkpoint(out) as ck:
        assert ck.extras["meta"]["iter"] == 3 and ck.extras["meta"]["domainmerge"] == {"step": "test"}
    with StoredNetwork.open(path) as stored:                                    # 'auto': the student
        assert stored.prefix == "model." and stored.state_dict()["decode_head.conv_seg.bias"].dtype == torch.half


def test_stored_network_errors_name_the_file(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "odd.pth", {"model.w": torch.ones(2)})
    with StoredNetwork.open(str(path)) as stored, pytest.raises(UserError, match="odd.pth: "):
        stored.build()

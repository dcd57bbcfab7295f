"""The README's Python API section runs as written, and does what its comments say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(section: str) -> list[str]:
    """The ```python blocks of the README section whose heading is ``section``."""
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end if end != -1 else None], re.S)


def test_python_api_section_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(1)
    blocks = python_blocks("Python API")
    assert blocks, "the README has no Python API example"
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    # The merged file keeps the first input's container: its meta, no optimizer, the record added.
    out = torch.load(tmp_path / "merged.pth", weights_only=True)
    assert set(out) == {"meta", "state_dict"}
    assert out["meta"]["iter"] == 40000 and out["meta"]["target"] == "cs"
    assert out["meta"]["domainmerge"]["inputs"] == ["cs.pth", "idd.pth"]
    # Parameters are the plain average of the two files (computed here from the raw files).
    a, b = (torch.load(tmp_path / n, weights_only=True)["state_dict"] for n in ("cs.pth", "idd.pth"))
    key = next(k for k in a if k.endswith("conv_seg.weight"))
    torch.testing.assert_close(out["state_dict"][key], (a[key] + b[key]) / 2)
    # H is the harmonic mean of the two domains' mIoU.
    scores = namespace["scores"]
    m = list(scores.miou.values())  # type: ignore[attr-defined]
    expected = 2 * m[0] * m[1] / (m[0] + m[1]) if min(m) > 0 else 0.0
    assert scores.h == pytest.approx(expected)  # type: ignore[attr-defined]

"""Markdown tables, JSON and CSV output of domainmerge.reporting."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from domainmerge.errors import UserError
from domainmerge.evaluation.metrics import scores_from_confusion
from domainmerge.reporting import (
    class_rows,
    class_table,
    domain_rows,
    domain_table,
    to_csv,
    to_json,
    write_csv,
    write_json,
)


def cells(table: str) -> list[list[str]]:
    """The table's rows (header first, the alignment rule dropped) as stripped cell strings."""
    lines = table.splitlines()
    assert set(lines[1]) <= set("|:-")
    return [[c.strip() for c in line.strip("|").split("|")] for line in [lines[0]] + lines[2:]]


def test_domain_table_like_the_paper() -> None:
    results = {"STDA GTA->CS": {"C": 61.9, "I": 44.3}, "Merged": {"C": 58.8, "I": 54.0}}
    rows = cells(domain_table(results))
    assert rows[0] == ["Model", "C", "I", "H", "Mean"]
    # H = 2CI / (C + I) and the mean, by hand, one decimal.
    assert rows[1] == ["STDA GTA->CS", "61.9", "44.3", "51.6", "53.1"]
    assert rows[2] == ["Merged", "58.8", "54.0", "56.3", "56.4"]


def test_domain_table_four_domains_missing_value_and_order() -> None:
    results = {"all four": {"C": 51.6, "I": 47.3, "A": 45.8, "D": 21.1}, "C only": {"C": 61.0}}
    rows = cells(domain_table(results, name="Merge"))
    assert rows[0] == ["Merge", "C", "I", "A", "D", "H", "Mean"]
    assert rows[1][-2:] == ["36.4", f"{(51.6 + 47.3 + 45.8 + 21.1) / 4:.1f}"]
    assert rows[2] == ["C only", "61.0", "n/a", "n/a", "n/a", "n/a", "n/a"]
    assert cells(domain_table(results, domains=["D", "C"]))[0] == ["Model", "D", "C", "H", "Mean"]


def test_single_domain_has_no_h_and_with_h_false() -> None:
    assert cells(domain_table({"m": {"C": 50.0}}))[0] == ["Model", "C"]
    assert cells(domain_table({"m": {"C": 50.0, "I": 40.0}}, with_h=False))[0] == ["Model", "C", "I"]


def scores_two_domains() -> dict:
    conf_c = np.zeros((19, 19), np.int64)
    conf_c[0, 0], conf_c[0, 1], conf_c[1, 1] = 3, 1, 4      # road 3/4, sidewalk 4/5, rest absent
    conf_i = np.eye(19, dtype=np.int64) * 2
    conf_i[2, 3] = 2                                       # building 2/4, wall 2/4
    return {"C": scores_from_confusion(conf_c), "I": scores_from_confusion(conf_i)}


def test_class_table_rows_and_values() -> None:
    rows = cells(class_table(scores_two_domains()))
    assert rows[0] == ["Class", "C", "I"]
    assert [r[0] for r in rows[1:]][:3] == ["road", "sidewalk", "building"]
    assert rows[1] == ["road", "75.0", "100.0"]
    assert rows[2] == ["sidewalk", "80.0", "100.0"]
    assert rows[3] == ["building", "n/a", "50.0"]
    assert rows[-1] == ["mIoU", "77.5", f"{(17 * 100 + 2 * 50) / 19:.1f}"]
    assert len(rows) == 1 + 19 + 1


def test_json_is_strict_and_nan_is_null(tmp_path: Path) -> None:
    scores = scores_two_domains()
    out = tmp_path / "r.json"
    write_json(out, {"scores": scores, "h": math.nan, "n": np.int64(3), "t": (1.5, 2)})

    def reject(token: str) -> None:
        raise AssertionError(f"non-standard JSON token {token}")

    data = json.loads(out.read_text(), parse_constant=reject)
    assert data["h"] is None and data["n"] == 3 and data["t"] == [1.5, 2]
    assert data["scores"]["C"]["iou"]["road"] == pytest.approx(75.0)
    assert data["scores"]["C"]["iou"]["building"] is None
    assert data["scores"]["C"]["miou"] == pytest.approx(77.5)
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]   # no temporary left behind
    assert to_json({"a": 1}).endswith("\n")


def test_csv_rows(tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    write_csv(out, domain_rows({"merged": {"C": 58.8, "I": 54.0}, "half": {"C": 1.0, "I": math.nan}}))
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert list(rows[0]) == ["model", "C", "I", "H", "mean"]
    assert float(rows[0]["H"]) == pytest.approx(2 * 58.8 * 54.0 / (58.8 + 54.0), abs=1e-4)
    assert rows[1]["I"] == "" and rows[1]["H"] == ""
    class_csv = list(csv.DictReader(io.StringIO(to_csv(class_rows(scores_two_domains())))))
    assert class_csv[0]["class"] == "road" and float(class_csv[0]["C"]) == 75.0
    assert class_csv[-1]["class"] == "mIoU"


def test_write_into_missing_folder_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        write_json(tmp_path / "no" / "r.json", {})

"""Image sampling for the data-using steps: indices spread evenly over domains."""

from __future__ import annotations

from domainmerge.data.sampling import spread_indices


def test_spread_indices_shares_images_evenly() -> None:
    # 7 images over 3 domains: 3, 2, 2; evenly spaced; a short domain gives what it has.
    got = spread_indices({"a": 10, "b": 5, "c": 1}, 7)
    assert got == {"a": [0, 4, 9], "b": [0, 4], "c": [0]}
    assert spread_indices({"a": 4}, 10) == {"a": [0, 1, 2, 3]}

"""The processing steps on hand-made tables: k-core, duplicates, trimming, negatives, key order."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from merlin_mllm.data import processing


def _table(pairs, timestamps=None) -> pd.DataFrame:
    users, items = zip(*pairs)
    timestamps = timestamps if timestamps is not None else list(range(len(pairs)))
    return pd.DataFrame(
        {"user_key": list(users), "item_key": list(items), "timestamp": np.array(timestamps, dtype=np.int64), "line": np.arange(len(pairs), dtype=np.int64)}
    )


def test_k_core_cascades():
    # Every user and item but "d" passes a 2-core at first; each removal exposes the next one.
    pairs = [("x", "a"), ("x", "b"), ("x", "c"), ("y", "a"), ("y", "b"), ("z", "c"), ("z", "d")]
    core, rounds = processing.k_core(_table(pairs), min_user=2, min_item=2)
    # Pass 1 drops item "d"; pass 2 user "z" (1 left); pass 3 item "c" (1 user left); pass 4 is stable.
    assert sorted(map(tuple, core[["user_key", "item_key"]].to_numpy())) == [("x", "a"), ("x", "b"), ("y", "a"), ("y", "b")]
    assert rounds == 4
    assert core.groupby("user_key").size().min() >= 2 and core.groupby("item_key").size().min() >= 2


def test_k_core_can_empty_everything_and_rejects_negative():
    core, _ = processing.k_core(_table([("x", "a"), ("y", "b")]), 2, 1)
    assert core.empty
    with pytest.raises(ValueError, match=">= 0"):
        processing.k_core(_table([("x", "a")]), -1, 1)


def test_drop_duplicates_keeps_earliest_then_file_order():
    pairs = [("u", "a"), ("u", "a"), ("u", "b"), ("u", "b"), ("v", "a")]
    table = _table(pairs, timestamps=[50, 10, 7, 7, 1])
    kept, removed = processing.drop_duplicates(table)
    assert removed == 2
    assert kept.set_index("item_key").loc[["a", "b"]].query("user_key == 'u'")["timestamp"].tolist() == [10, 7]
    assert kept[kept["item_key"] == "b"]["line"].tolist() == [2]  # the tie goes to the earlier line


def test_order_and_trim_ties_by_natural_item_order():
    pairs = [("u", "10"), ("u", "9"), ("u", "2"), ("u", "1"), ("v", "3")]
    trimmed = processing.order_and_trim(_table(pairs, timestamps=[5, 5, 5, 1, 1]), max_history=3)
    user = trimmed[trimmed["user_key"] == "u"]
    # time 1 first, then the three ties by numeric item order; the latest 3 are kept.
    assert user["item_key"].tolist() == ["2", "9", "10"] and user["position"].tolist() == [0, 1, 2]
    assert processing.order_and_trim(_table(pairs), 0)["position"].max() == 3


def test_natural_order():
    assert processing.natural_order(["10", "9", "100", "9"]).tolist() == ["9", "10", "100"]
    assert processing.natural_order(["b10", "b9", "a"]).tolist() == ["a", "b10", "b9"]


def test_sample_negatives_excludes_forbidden_and_is_seeded():
    forbidden = np.arange(1, 900, 2, dtype=np.int64)  # every odd id below 900
    first = processing.sample_negatives(np.random.default_rng(0), 1000, forbidden, 50)
    again = processing.sample_negatives(np.random.default_rng(0), 1000, forbidden, 50)
    other = processing.sample_negatives(np.random.default_rng(1), 1000, forbidden, 50)
    assert first.tolist() == again.tolist() and first.tolist() != other.tolist()
    assert len(set(first.tolist())) == 50 and not set(first.tolist()) & set(forbidden.tolist())
    assert first.min() >= 1 and first.max() <= 1000
    # Nearly everything forbidden: the explicit path returns exactly what is left.
    left = processing.sample_negatives(np.random.default_rng(0), 10, np.array([1, 2, 3, 5, 6, 7, 8], dtype=np.int64), 3)
    assert sorted(left.tolist()) == [4, 9, 10]
    with pytest.raises(ValueError, match="cannot draw 4 negatives: only 3 of 10"):
        processing.sample_negatives(np.random.default_rng(0), 10, np.array([1, 2, 3, 5, 6, 7, 8], dtype=np.int64), 4)


def test_sample_negatives_is_uniform():
    rng = np.random.default_rng(0)
    counts = np.zeros(21, dtype=np.int64)
    forbidden = np.array([1, 2], dtype=np.int64)
    for _ in range(3000):
        counts[processing.sample_negatives(rng, 20, forbidden, 3)] += 1
    allowed = counts[3:]
    # 3000 * 3 / 18 = 500 draws expected per allowed id.
    assert counts[:3].sum() == 0 and allowed.min() > 420 and allowed.max() < 580

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


def test_order_and_trim_ties_in_a_seeded_random_order():
    pairs = [("u", "10"), ("u", "9"), ("u", "2"), ("u", "1"), ("v", "3")]
    table = _table(pairs, timestamps=[5, 5, 5, 1, 1])
    trimmed = processing.order_and_trim(table, max_history=3, rng=np.random.default_rng(0))
    user = trimmed[trimmed["user_key"] == "u"]
    # Time 1 is the oldest and dropped; the three events at time 5 are kept, in a random order.
    assert sorted(user["item_key"]) == ["10", "2", "9"] and user["position"].tolist() == [0, 1, 2]
    orders = {tuple(processing.order_and_trim(table, 0, np.random.default_rng(seed)).query("user_key == 'u'")["item_key"])
              for seed in range(20)}
    # Always time order (item "1" first), the ties in every one of their 6 orders across seeds (not
    # by item key), and the same order again for the same seed.
    assert all(order[0] == "1" for order in orders) and len(orders) == 6
    again = [processing.order_and_trim(table, 0, np.random.default_rng(3))["item_key"].tolist() for _ in range(2)]
    assert again[0] == again[1]
    assert processing.order_and_trim(table, 0, np.random.default_rng(0))["position"].max() == 3


def test_earlier_events_counts_strictly_earlier_times():
    events = pd.DataFrame({"user_id": [1, 1, 1, 1, 2, 2], "timestamp": [3, 5, 5, 9, 5, 5],
                           "position": [0, 1, 2, 3, 0, 1]})
    assert processing.earlier_events(events).tolist() == [0, 1, 1, 3, 0, 0]


def _events(rows):
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    frame["position"] = frame.groupby("user_id").cumcount()
    return frame


def test_timeline_targets_one_per_user_and_window():
    events = _events([(1, 11, 1), (1, 12, 4), (1, 13, 6), (1, 14, 8), (1, 15, 8),
                      (2, 21, 2), (2, 22, 3),
                      (3, 31, 7), (3, 32, 9)])
    targets = processing.timeline_targets(events, valid_cut=5, test_cut=8)
    as_lists = {split: list(zip(t.user_id.tolist(), t.item_id.tolist(), t.target_position.tolist(), t.timestamp.tolist()))
                for split, t in targets.items()}
    # User 1: its last event before 5, in [5, 8), and at/after 8 (two at 8: the later position,
    # whose history stops before time 8, so 3 events).
    assert as_lists["train"] == [(1, 12, 1, 4), (2, 22, 1, 3)]
    assert as_lists["valid"] == [(1, 13, 2, 6), (3, 31, 0, 7)]
    assert as_lists["test"] == [(1, 15, 3, 8), (3, 32, 1, 9)]
    kept, dropped = processing.with_history_only(targets["valid"])
    assert kept.user_id.tolist() == [1] and dropped == 1
    with pytest.raises(ValueError, match="before the test cut"):
        processing.timeline_targets(events, valid_cut=8, test_cut=8)


def test_timeline_cuts():
    stamps = np.arange(100, dtype=np.int64)
    cuts = processing.timeline_cuts(stamps)
    assert cuts["valid"]["timestamp"] == 69 and cuts["test"]["timestamp"] == 79  # the 0.7 / 0.8 quantiles (lower)
    assert cuts["test"]["fraction_of_k_core_events_before"] == 0.79
    fixed = processing.timeline_cuts(stamps, valid_cut=10, test_quantile=0.5)
    assert (fixed["valid"]["timestamp"], fixed["valid"]["quantile"], fixed["test"]["timestamp"]) == (10, None, 49)
    with pytest.raises(ValueError, match="before the test cut"):
        processing.timeline_cuts(stamps, valid_cut=60, test_cut=60)


def test_negatives_from_items_seen_before_the_row():
    # Items 1..6 first seen at times 10..60; the user saw item 2.
    first_seen = np.array([processing.NEVER_SEEN, 10, 20, 30, 40, 50, 60], dtype=np.int64)
    targets = processing.Targets(np.array([1, 1]), np.array([1, 2]), np.array([3, 6]), np.array([41, 61]))
    history = {1: np.array([2, 3, 6], dtype=np.int64)}
    rows = processing.build_rows(targets, 2, 6, history, np.random.default_rng(0), 0, first_seen=first_seen)
    first, second = rows.iloc[1:3]["item_id"].tolist(), rows.iloc[4:6]["item_id"].tolist()
    assert sorted(first) == [1, 4]  # seen before 41 (1..4), less the user's 2 and 3
    assert set(second) <= {1, 4, 5} and len(set(second)) == 2
    # A row at time 35 has only item 1 left: asking for 2 negatives is refused, naming the user.
    early = processing.Targets(np.array([1]), np.array([1]), np.array([3]), np.array([35]))
    with pytest.raises(ValueError, match="only 1 of 6 items seen before the row's time 35 are unseen by user 1"):
        processing.check_negatives(early, 2, 6, history, "test groups", first_seen=first_seen)
    processing.check_negatives(early, 1, 6, history, "test groups", first_seen=first_seen)


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

"""A leakage audit of prepared folders, by brute force, for every split of every protocol.

Real ML-100k folders (the copy in the recbole wheel), 150 users each, prepared once per module
for the ``paper``, ``leave-last-out`` and ``timeline`` protocols. Every check recomputes what it
needs from the written tables or from the raw file, not from the pipeline's bookkeeping:

* every history event of a row is strictly earlier than the row (events in the same second as
  the target are not history), and the history is exactly the user's kept events before it;
* ``training_events(split)`` never holds an event at or after a row's own time for that user,
  and on timeline folders every event precedes the split's cut;
* timeline rows lie in their split's time window;
* every timeline negative had an event in the k-core data (any user) before the row's time, and
  none is an item its user ever interacted with.

The counts and features audit (``CollaborativeFeatures`` as of each row's time) lives beside the
features, in the other helper's test file (see issue 21, part "features").
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from merlin_mllm.choices import PROTOCOLS  # every protocol is audited, a new one included
from merlin_mllm.data.prepare import prepare_dataset
from merlin_mllm.data.sources import BadLines, read_source
from merlin_mllm.data.splits import split_cuts, training_events
from merlin_mllm.data.tables import read_table

SPLITS = ("train", "valid", "test")
USERS = 150


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    folders = {}
    for protocol in PROTOCOLS:
        out = tmp_path_factory.mktemp(protocol)
        prepare_dataset("ml-100k", protocol, out, max_users=USERS, seed=7, n_negatives_test=10,
                        train_targets="blocks", train_negatives=2)
        folders[protocol] = out
    return folders


@pytest.fixture(scope="module")
def raw_core():
    """The raw ML-100k interactions and their 5/5 k-core, computed here with plain pandas."""
    raw = read_source("ml-100k", None, BadLines("error")).interactions
    raw = raw.sort_values(["timestamp", "line"]).drop_duplicates(["user_key", "item_key"])
    core = raw
    while True:
        keep = (core.groupby("user_key")["item_key"].transform("size") >= 5) & \
               (core.groupby("item_key")["user_key"].transform("size") >= 5)
        if keep.all():
            return raw, core
        core = core[keep]


def _keyed(frame: pd.DataFrame, data_dir) -> pd.DataFrame:
    users = read_table(data_dir / "users").set_index("user_id")["user_key"].astype(str)
    items = read_table(data_dir / "items").set_index("item_id")["item_key"].astype(str)
    return frame.assign(user_key=frame["user_id"].map(users), item_key=frame["item_id"].map(items))


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("split", SPLITS)
def test_every_history_event_is_strictly_earlier_than_its_row(folders, protocol, split):
    data_dir = folders[protocol]
    events = read_table(data_dir / "events")
    rows = read_table(data_dir / split).drop_duplicates("group_id")
    assert len(rows) > 0
    exploded = rows[["group_id", "user_id", "timestamp", "history_item_ids"]].explode("history_item_ids")
    exploded = exploded.dropna(subset=["history_item_ids"]).astype({"history_item_ids": np.int64})
    joined = exploded.merge(events[["user_id", "item_id", "timestamp"]], how="left",
                            left_on=["user_id", "history_item_ids"], right_on=["user_id", "item_id"],
                            suffixes=("", "_event"))
    assert joined["timestamp_event"].notna().all()  # every history item is one of the user's events
    late = joined[joined["timestamp_event"] >= joined["timestamp"]]
    assert late.empty, f"{protocol}/{split}: {len(late)} history events at or after their row, e.g.\n{late.head()}"
    # And the history is the whole of the user's kept past: every event strictly before the row.
    before = rows[["group_id", "user_id", "timestamp"]].merge(events[["user_id", "timestamp"]], on="user_id",
                                                              suffixes=("", "_event"))
    n_before = before[before["timestamp_event"] < before["timestamp"]].groupby("group_id").size()
    n_before = n_before.reindex(rows["group_id"], fill_value=0).to_numpy()
    assert (rows["history_item_ids"].map(len).to_numpy() == n_before).all()
    assert (rows["target_position"].to_numpy() == n_before).all()
    assert (n_before >= 1).all()  # every target has at least one history event


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("split", SPLITS)
def test_training_events_never_reach_a_row_of_the_split(folders, protocol, split):
    """For each user, nothing counted for split S is at or after that user's earliest row of S."""
    data_dir = folders[protocol]
    kept = training_events(data_dir, split)
    earliest = read_table(data_dir / split).groupby("user_id")["timestamp"].min()
    limit = kept["user_id"].map(earliest)
    late = kept[limit.notna() & (kept["timestamp"] >= limit)]
    assert late.empty, f"{protocol}/{split}: {len(late)} training events at or after their user's row"


@pytest.mark.parametrize("split", SPLITS)
def test_timeline_training_events_precede_the_cut(folders, split):
    data_dir = folders["timeline"]
    cuts = split_cuts(data_dir)
    cut = cuts.test if split == "test" else cuts.valid
    kept = training_events(data_dir, split)
    events = read_table(data_dir / "events")
    assert len(kept) > 0 and (kept["timestamp"] < cut).all()
    if split != "train":  # everything before the cut is there
        assert len(kept) == int((events["timestamp"] < cut).sum())
    else:
        first_target = read_table(data_dir / "train").groupby("user_id")["timestamp"].min()
        limit = events["user_id"].map(first_target).fillna(cut).clip(upper=cut)
        assert len(kept) == int((events["timestamp"] < limit).sum())


def test_timeline_rows_lie_in_their_windows(folders):
    data_dir = folders["timeline"]
    cuts = split_cuts(data_dir)
    assert cuts is not None and cuts.valid < cuts.test
    train, valid, test = (read_table(data_dir / split) for split in SPLITS)
    assert (train["timestamp"] < cuts.valid).all()
    assert ((valid["timestamp"] >= cuts.valid) & (valid["timestamp"] < cuts.test)).all()
    assert (test["timestamp"] >= cuts.test).all()
    # One valid and one test group per user with an event in the window: the user's last one.
    events = read_table(data_dir / "events")
    for split, frame, low, high in (("valid", valid, cuts.valid, cuts.test), ("test", test, cuts.test, None)):
        positives = frame[frame["label"] == 1]
        assert positives["user_id"].is_unique, split
        window = events[(events["timestamp"] >= low) & ((events["timestamp"] < high) if high else True)]
        last = window.groupby("user_id")["timestamp"].max()
        assert (positives.set_index("user_id")["timestamp"] == last.loc[positives["user_id"]]).all(), split


@pytest.mark.parametrize("split", SPLITS)
def test_timeline_negatives_existed_and_were_never_the_users(folders, raw_core, split):
    raw, core = raw_core
    data_dir = folders["timeline"]
    first_seen = core.groupby("item_key")["timestamp"].min()
    seen = raw.groupby("user_key")["item_key"].agg(set)
    negatives = _keyed(read_table(data_dir / split), data_dir)
    negatives = negatives[negatives["label"] == 0]
    assert len(negatives) > 0
    existed = negatives["item_key"].map(first_seen)
    assert existed.notna().all()
    assert (existed < negatives["timestamp"]).all(), split
    assert not any(item in seen[user] for user, item in zip(negatives["user_key"], negatives["item_key"]))


@pytest.mark.parametrize("protocol", ("paper", "leave-last-out"))
def test_other_protocols_keep_their_negatives_apart_from_the_users_history(folders, raw_core, protocol):
    raw, _ = raw_core
    seen = raw.groupby("user_key")["item_key"].agg(set)
    for split in SPLITS:
        negatives = _keyed(read_table(folders[protocol] / split), folders[protocol])
        negatives = negatives[negatives["label"] == 0]
        assert not any(item in seen[user] for user, item in zip(negatives["user_key"], negatives["item_key"]))


# The counts/features audit (every count equals a brute-force as-of count) belongs to the features
# part of issue 21; it goes in its own test file beside CollaborativeFeatures.

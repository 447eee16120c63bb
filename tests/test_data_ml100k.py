"""prepare_dataset on MovieLens-100k (the copy in the recbole wheel): both protocols, negatives,
trimming, k-core, determinism, and the Merlin schema of every output table.

The raw file is re-read here with pandas, independently of the code under test, so the checks
compare against the data rather than against the pipeline's own bookkeeping.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from merlin_mllm.data.prepare import prepare_dataset
from merlin_mllm.data.tables import Tags, read_schema, read_table
from merlin_mllm.models.embedded import package_dir

ML100K = package_dir("recbole", "recbole") / "dataset_example" / "ml-100k"
TABLES = ("train", "valid", "test", "events", "items", "users")


@pytest.fixture(scope="module")
def raw() -> pd.DataFrame:
    frame = pd.read_csv(ML100K / "ml-100k.inter", sep="\t", dtype=str)
    frame.columns = [name.split(":")[0] for name in frame.columns]
    return frame.assign(timestamp=frame["timestamp"].astype(float).astype(np.int64))


def _load(out: Path) -> dict[str, pd.DataFrame]:
    return {name: read_table(out / name) for name in TABLES}


def _with_keys(frame: pd.DataFrame, tables: dict) -> pd.DataFrame:
    users = tables["users"].set_index("user_id")["user_key"]
    items = tables["items"].set_index("item_id")["item_key"]
    return frame.assign(user_key=frame["user_id"].map(users), item_key=frame["item_id"].map(items))


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper")
    report = prepare_dataset("ml-100k", "paper", out, max_users=60, seed=3)
    return out, report, _load(out)


@pytest.fixture(scope="module")
def leave_last_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("leave_last_out")
    report = prepare_dataset("ml-100k", "leave-last-out", out, max_users=60, seed=5)
    return out, report, _load(out)


def test_paper_groups_and_split(paper):
    out, report, tables = paper
    assert report["users_per_split"] == {"train": 48, "valid": 6, "test": 6}
    for split, size in (("train", 2), ("valid", 2), ("test", 21)):
        rows = tables[split]
        groups = rows.groupby("group_id")
        assert (groups.size() == size).all(), split
        assert (groups["label"].sum() == 1).all(), split
        # One group per user, and every row of a group shares user, target and time.
        assert groups["user_id"].nunique().eq(1).all() and rows.groupby("user_id")["group_id"].nunique().eq(1).all()
        assert groups["target_position"].nunique().eq(1).all() and groups["timestamp"].nunique().eq(1).all()
        assert report["rows_per_split"][split] == len(rows)
    test_users = tables["test"].groupby("user_id").size()
    assert len(test_users) == 6 and (test_users == 21).all()
    split_users = {split: set(tables[split]["user_id"]) for split in ("train", "valid", "test")}
    assert not (split_users["train"] & split_users["valid"]) and not (split_users["train"] & split_users["test"])
    assert not (split_users["valid"] & split_users["test"])
    assert set().union(*split_users.values()) == set(tables["users"]["user_id"])
    by_table = tables["users"].set_index("user_id")["split"]
    for split, users in split_users.items():
        assert set(by_table[by_table == split].index) == users
    # Group ids are unique across the three splits.
    all_groups = pd.concat([tables[split]["group_id"] for split in ("train", "valid", "test")])
    assert all_groups.nunique() == report["users_per_split"]["train"] + 12


def _earlier(events: pd.DataFrame, user_ids, timestamps) -> np.ndarray:
    """How many of each user's kept events are strictly earlier than the given time."""
    return np.array([int(((events["user_id"] == user) & (events["timestamp"] < stamp)).sum())
                     for user, stamp in zip(user_ids, timestamps)])


def test_paper_target_is_last_kept_event(paper):
    _, _, tables = paper
    events = tables["events"]
    last = events.sort_values("position").groupby("user_id").tail(1).set_index("user_id")
    for split in ("train", "valid", "test"):
        positives = tables[split][tables[split]["label"] == 1].set_index("user_id")
        assert (positives["item_id"] == last.loc[positives.index, "item_id"]).all()
        assert (positives["timestamp"] == last.loc[positives.index, "timestamp"]).all()
        # target_position: the user's events strictly before the target's time (not its position,
        # when the last event shares its second with earlier ones).
        assert (positives["target_position"] == _earlier(events, positives.index, positives["timestamp"])).all()
        assert (positives["target_position"] >= 1).all()  # a non-empty history


def test_negatives_never_seen_by_user(paper, leave_last_out, raw):
    seen = raw.groupby("user_id")["item_id"].agg(set)  # the full raw history
    for _, _, tables in (paper, leave_last_out):
        for split in ("train", "valid", "test"):
            negatives = _with_keys(tables[split], tables)
            negatives = negatives[negatives["label"] == 0]
            assert len(negatives) > 0
            hits = [item in seen[user] for user, item in zip(negatives["user_key"], negatives["item_key"])]
            assert not any(hits), split
            # Without replacement inside a group, and never the positive.
            assert not tables[split].duplicated(["group_id", "item_id"]).any()
            assert negatives["item_id"].isin(tables["items"]["item_id"]).all()


def test_leave_last_out_targets(leave_last_out, raw):
    _, report, tables = leave_last_out
    events = tables["events"]
    lengths = events.groupby("user_id").size()
    n_users = len(tables["users"])
    assert n_users == 60 and set(tables["users"]["split"]) == {"all"}
    assert report["protocol"] == "leave-last-out" and report["targets_without_history"] == {"train": 0, "valid": 0, "test": 0}
    positives = {}
    for split, offset in (("test", 1), ("valid", 2), ("train", 3)):
        rows = tables[split]
        assert rows["user_id"].nunique() == n_users and rows["group_id"].nunique() == n_users
        assert rows.groupby("group_id").size().eq(21 if split == "test" else 2).all()
        pos = rows[rows["label"] == 1].set_index("user_id").sort_index()
        # The target is the event `offset` places from the end of the seeded time order ...
        chosen = events[events["position"] == events["user_id"].map(lengths) - offset].set_index("user_id").sort_index()
        assert (chosen["item_id"] == pos["item_id"]).all() and (chosen["timestamp"] == pos["timestamp"]).all(), split
        # ... and its history is every kept event strictly before its time.
        assert (pos["target_position"] == _earlier(events, pos.index, pos["timestamp"])).all(), split
        assert (pos["target_position"] <= chosen["position"]).all()
        positives[split] = pos
    test, valid, train = positives["test"], positives["valid"], positives["train"]
    assert (train["timestamp"] <= valid["timestamp"]).all() and (valid["timestamp"] <= test["timestamp"]).all()
    assert (train["target_position"] <= valid["target_position"]).all()
    # Ties are common: some users' valid and test targets share their second, and so their history.
    assert (valid["target_position"] == test["target_position"]).any()
    # The test positive is the user's latest interaction among the items that survived filtering.
    keyed = _with_keys(test.reset_index(), tables).set_index("user_key")
    kept_items = set(tables["items"]["item_key"])
    latest = raw[raw["item_id"].isin(kept_items)].groupby("user_id")["timestamp"].max()
    assert (keyed["timestamp"] == latest.loc[keyed.index]).all()


def test_max_history_keeps_the_latest_events(tmp_path, raw):
    # No k-core, so the kept window can be recomputed from the raw file alone.
    prepare_dataset("ml-100k", "leave-last-out", tmp_path, max_users=25, max_history=5, min_user_interactions=0, min_item_interactions=0, seed=1)
    tables = {name: read_table(tmp_path / name) for name in ("events", "users", "items")}
    events = _with_keys(tables["events"], tables)
    assert events.groupby("user_id").size().eq(5).all()
    for user_key, kept in events.groupby("user_key"):
        history = raw[raw["user_id"] == user_key].sort_values("timestamp")
        kept = kept.sort_values("position")
        assert kept["position"].tolist() == [0, 1, 2, 3, 4]
        # The 5 latest times, in time order; every event strictly after the 5th latest time is
        # kept (ties at that time are chosen by the seeded tie order).
        assert kept["timestamp"].tolist() == history["timestamp"].tail(5).tolist()
        newer = history[history["timestamp"] > kept["timestamp"].iloc[0]]["item_id"]
        assert set(newer) <= set(kept["item_key"]) and set(kept["item_key"]) <= set(history["item_id"])


def test_k_core_holds_iteratively(tmp_path, raw):
    report = prepare_dataset("ml-100k", "paper", tmp_path, max_history=0, min_user_interactions=40, min_item_interactions=60, n_negatives_test=5)
    events = read_table(tmp_path / "events")
    assert events.groupby("user_id").size().min() >= 40
    assert events.groupby("item_id").size().min() >= 60
    assert report["after_k_core"]["interactions"] == len(events)
    assert report["after_k_core"]["rounds"] > 2
    # A single pass over the raw counts would leave users below the threshold: the loop matters.
    one_pass = raw[raw.groupby("user_id")["item_id"].transform("size").ge(40) & raw.groupby("item_id")["user_id"].transform("size").ge(60)]
    assert one_pass.groupby("user_id").size().min() < 40 or one_pass.groupby("item_id").size().min() < 60


def _hashes(out: Path) -> dict[str, str]:
    files = sorted(out.glob("*/*.parquet")) + sorted(out.glob("*/schema.pbtxt")) + sorted(out.glob("*/.merlin/schema.json"))
    return {str(path.relative_to(out)): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


def test_full_size_paper_is_deterministic(tmp_path):
    first = prepare_dataset("ml-100k", "paper", tmp_path / "a", seed=11)
    again = prepare_dataset("ml-100k", "paper", tmp_path / "b", seed=11)
    other = prepare_dataset("ml-100k", "paper", tmp_path / "c", seed=12)
    assert first == again and first["users_per_split"] == other["users_per_split"]
    assert first["after_k_core"]["users"] == 943 and first["users_per_split"]["test"] == 94
    hashes_a, hashes_b, hashes_c = _hashes(tmp_path / "a"), _hashes(tmp_path / "b"), _hashes(tmp_path / "c")
    assert len(hashes_a) == 18 and hashes_a == hashes_b
    for split in ("train", "valid", "test"):
        assert hashes_a[f"{split}/part_0.parquet"] != hashes_c[f"{split}/part_0.parquet"]
    assert json.loads((tmp_path / "a" / "report.json").read_text()) == first


def test_schema_tags_and_dtypes_read_back(paper):
    out, report, tables = paper
    rows = read_schema(out / "test")
    assert set(rows["user_id"].tags) >= {Tags.USER, Tags.ID, Tags.CATEGORICAL}
    assert set(rows["item_id"].tags) >= {Tags.ITEM, Tags.ID, Tags.CATEGORICAL}
    assert set(rows.select_by_tag(Tags.USER_ID).column_names) == {"user_id"}
    assert set(rows.select_by_tag(Tags.ITEM_ID).column_names) == {"item_id"}
    assert set(rows.select_by_tag(Tags.TARGET).column_names) == {"label"}
    assert set(rows.select_by_tag(Tags.BINARY_CLASSIFICATION).column_names) == {"label"}
    assert set(rows.select_by_tag(Tags.TIME).column_names) == {"timestamp"}
    assert rows["item_id"].properties["domain"]["max"] == report["kept"]["items"] == len(tables["items"])
    items = read_schema(out / "items")
    assert set(items.select_by_tag(Tags.TEXT).column_names) == {"title", "description", "attributes", "genres"}
    assert all(items[name].dtype.name == "str"
               for name in ("item_key", "title", "description", "attributes", "genres", "image_path"))
    assert set(read_schema(out / "events").select_by_tag(Tags.TIME).column_names) == {"timestamp"}
    for name in ("train", "valid", "test", "events"):
        assert tables[name]["user_id"].dtype == np.int64 and tables[name]["item_id"].dtype == np.int64
    assert tables["items"]["item_id"].tolist() == list(range(1, len(tables["items"]) + 1))
    assert tables["users"]["user_id"].tolist() == list(range(1, 61))


def test_items_table_text(paper):
    _, _, tables = paper
    items = tables["items"].set_index("item_key")
    raw_items = pd.read_csv(ML100K / "ml-100k.item", sep="\t", dtype=str, keep_default_na=False)
    raw_items.columns = [name.split(":")[0] for name in raw_items.columns]
    raw_items = raw_items.set_index("item_id")
    for key in items.index:
        genres = ", ".join(raw_items.loc[key, "class"].split())
        year = raw_items.loc[key, "release_year"]
        assert items.loc[key, "title"] == f"{raw_items.loc[key, 'movie_title']} ({year})"  # as u.item writes it
        assert items.loc[key, "description"] == f"Genres: {genres}. Released {year}."
        assert items.loc[key, "attributes"] == items.loc[key, "description"]  # ML-100k's only item text
        assert items.loc[key, "year"] == int(year)
    # Exactly the items the output refers to are listed: kept events and rows (negatives are
    # drawn from the whole k-core, so some come from outside the chosen users' events).
    referred = set(tables["events"]["item_id"])
    for split in ("train", "valid", "test"):
        referred |= set(tables[split]["item_id"])
    assert referred == set(tables["items"]["item_id"])
    assert not set(tables["test"]["item_id"]) <= set(tables["events"]["item_id"])
    assert tables["items"]["image_path"].isna().all()


def test_rows_carry_their_history_before_the_target(tmp_path):
    """history_item_ids is exactly the user's kept events before target_position, which are those
    strictly before the target's time: no leakage."""
    from merlin_mllm.data.prepare import prepare_dataset
    from merlin_mllm.data.tables import read_schema, read_table

    out = tmp_path / "d"
    prepare_dataset("ml-100k", "leave-last-out", out, max_users=30, max_history=8)
    events = read_table(out / "events")
    sequences = {u: g.sort_values("position")["item_id"].tolist() for u, g in events.groupby("user_id")}
    times = events.set_index(["user_id", "item_id"])["timestamp"]
    for split in ("train", "valid", "test"):
        rows = read_table(out / split)
        for user, item, label, position, history, timestamp in rows[
            ["user_id", "item_id", "label", "target_position", "history_item_ids", "timestamp"]
        ].itertuples(index=False):
            history = list(history)
            assert history == sequences[user][:position]
            if label == 1:  # the positive is at or after target_position, at the row's own time
                assert item in sequences[user][position:] and item not in history
                assert times[user, item] == timestamp
                assert all(times[user, h] < times[user, item] for h in history)
        assert "history_item_ids" in read_schema(out / split).column_names

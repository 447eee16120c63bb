"""The hybrid ranker's tabular features, point in time (issue 21), on real prepared ML-100k folders.

Every count column of every split of a leave-last-out and a timeline folder equals a brute-force
count made by a plain Python loop over the folder's events: the item's (and the user's) events
strictly before the row's timestamp, the recent one those in ``[t - 30 days, t)``. The retrieval
score is the SASRec trained on the split's training-time events, all of which precede the
split's rows (per user on leave-last-out, the cut on the timeline). Serving's one-moment path
(``as_of``) is brute-forced too.
"""
from __future__ import annotations

import warnings
from collections import defaultdict

import numpy as np
import pandas as pd
import pytest

from merlin_mllm.baselines import SequentialSettings, sequential_scores, train_sequential_baseline
from merlin_mllm.data.collaborative import (
    DEFAULT_RECENT_DAYS,
    FEATURE_COLUMNS,
    HEAD_FEATURES,
    RETRIEVAL_COLUMN,
    SECONDS_PER_DAY,
    CollaborativeFeatures,
    collaborative_features,
)
from merlin_mllm.data.prepare import prepare_dataset
from merlin_mllm.data.splits import split_cuts, split_rows, training_events
from merlin_mllm.data.tables import Tags, read_table
from merlin_mllm.pipelines.hybrid import add_retrieval_scores, hybrid_feature_rows

PROTOCOLS = ("leave-last-out", "timeline")
SPLITS = ("train", "valid", "test")
TINY_SEQUENTIAL = SequentialSettings(hidden=16, epochs=2, max_len=20)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    folders = {}
    for protocol in PROTOCOLS:
        out = tmp_path_factory.mktemp(protocol)
        prepare_dataset("ml-100k", protocol, out, max_users=100, seed=42, n_negatives_test=10)
        folders[protocol] = out
    return folders


def brute_force_counts(events: pd.DataFrame, rows: pd.DataFrame, recent_days: float = DEFAULT_RECENT_DAYS,
                       as_of=None) -> pd.DataFrame:
    """Each row's counts by a plain loop over the events: strictly before t, recent in [t - window, t)."""
    item_times, user_times = defaultdict(list), defaultdict(list)
    for user, item, stamp in zip(events["user_id"], events["item_id"], events["timestamp"]):
        item_times[int(item)].append(int(stamp))
        user_times[int(user)].append(int(stamp))
    window = recent_days * SECONDS_PER_DAY
    records = []
    for user, item, stamp in zip(rows["user_id"], rows["item_id"], rows["timestamp"] if as_of is None
                                 else [as_of] * len(rows)):
        records.append((sum(1 for s in item_times[int(item)] if s < stamp),
                        sum(1 for s in item_times[int(item)] if stamp - window <= s < stamp),
                        sum(1 for s in user_times[int(user)] if s < stamp)))
    return pd.DataFrame(records, columns=list(FEATURE_COLUMNS), dtype=np.float64)


def assert_counts(featured: pd.DataFrame, expected: pd.DataFrame) -> None:
    for column in FEATURE_COLUMNS:
        assert featured[column].dtype == np.float32
        counts = np.expm1(featured[column].to_numpy(np.float64))
        bad = np.flatnonzero(np.abs(counts - expected[column].to_numpy()) > 1e-3 * np.maximum(1, counts))
        assert not len(bad), (f"{column}: {len(bad)} rows differ, e.g. row {bad[0]} "
                              f"({featured.iloc[bad[0]][['user_id', 'item_id', 'timestamp']].to_dict()}): "
                              f"{counts[bad[0]]} != {expected[column].iloc[bad[0]]}")


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("split", SPLITS)
def test_every_count_is_a_brute_force_count_as_of_the_row(folders, protocol, split):
    folder = folders[protocol]
    rows = split_rows(folder, split)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        featured = hybrid_feature_rows(folder, split, retrieval=False)
    expected = brute_force_counts(read_table(folder / "events"), rows)
    assert_counts(featured, expected)
    # Rows keep their order and columns; the check is not vacuous: some counts are positive, and
    # the recent window leaves some events out.
    pd.testing.assert_frame_equal(featured[rows.columns], rows)
    assert (expected["item_log_recent_count"] > 0).any() and (expected["user_log_count"] > 0).all()
    assert (expected["item_log_recent_count"] < expected["item_log_count"]).any()


def test_a_row_never_counts_its_own_target_nor_its_second(folders):
    """Each test positive is its user's event at the row's time: neither it nor any event of that
    second is counted, though every event is fitted (the rule, not the choice of events, excludes them)."""
    folder = folders["leave-last-out"]
    events = read_table(folder / "events")
    test = split_rows(folder, "test")
    featured = collaborative_features(folder).transform(test)
    positives = featured[featured["label"] == 1]
    for _, row in positives.iterrows():
        same_second_or_later = events[(events["user_id"] == row["user_id"]) & (events["timestamp"] >= row["timestamp"])]
        assert len(same_second_or_later) >= 1  # the target itself
        earlier = int((events["user_id"] == row["user_id"]).sum()) - len(same_second_or_later)
        assert round(float(np.expm1(row["user_log_count"]))) == earlier


def test_one_moment_for_every_row_is_serving(folders):
    """``as_of``: every row counted as of one moment, e.g. a served request; its default "now" is
    the first second after the latest fitted event (all of them count)."""
    folder = folders["timeline"]
    events = training_events(folder, "test")
    rows = split_rows(folder, "test").drop(columns="timestamp")
    features = CollaborativeFeatures().fit(events)
    assert features.logged_until == int(events["timestamp"].max()) + 1
    for moment in (features.logged_until, split_cuts(folder).valid):
        assert_counts(features.transform(rows, as_of=moment), brute_force_counts(events, rows, as_of=moment))
    with pytest.raises(ValueError, match="rows lack the time column 'timestamp'.*as_of="):
        features.transform(rows)


def test_schema_tags_unseen_keys_and_bad_input(folders):
    features = collaborative_features(folders["leave-last-out"])
    schema = features.output_schema
    assert schema.column_names == list(FEATURE_COLUMNS)
    for column in schema:
        assert Tags.CONTINUOUS in column.tags
    unseen = features.transform(pd.DataFrame({"user_id": [10**6], "item_id": [10**6], "timestamp": [10**10],
                                              "extra": ["kept"]}))
    assert unseen[list(FEATURE_COLUMNS)].to_numpy().tolist() == [[0.0, 0.0, 0.0]]
    assert unseen["extra"].tolist() == ["kept"]
    rows = split_rows(folders["leave-last-out"], "test")
    with pytest.raises(ValueError, match=r"row 2 \(user .*\) has no valid 'timestamp'"):
        features.transform(rows.head(4).assign(timestamp=[1.0, 2.0, np.nan, 3.0]))
    with pytest.raises(ValueError, match="recent_days"):
        CollaborativeFeatures(recent_days=0)
    with pytest.raises(ValueError, match="time_unit"):
        CollaborativeFeatures(time_unit="h")
    events = read_table(folders["leave-last-out"] / "events")
    with pytest.raises(ValueError, match="timestamp"):
        CollaborativeFeatures().fit(events.drop(columns="timestamp"))
    with pytest.raises(RuntimeError, match="before fit"):
        CollaborativeFeatures().transform(rows)


def test_recent_window_parameter(folders):
    folder = folders["leave-last-out"]
    rows = split_rows(folder, "test")
    wide = collaborative_features(folder, recent_days=10_000).transform(rows)
    np.testing.assert_allclose(wide["item_log_recent_count"], wide["item_log_count"])
    assert_counts(collaborative_features(folder, recent_days=2.5).transform(rows),
                  brute_force_counts(read_table(folder / "events"), rows, recent_days=2.5))
    # Milliseconds (Amazon, MicroLens): the same window in days spans 1000 times more units.
    events = read_table(folder / "events")
    in_ms = events.assign(timestamp=events["timestamp"] * 1000)
    got = CollaborativeFeatures(time_unit="ms").fit(in_ms).transform(rows.assign(timestamp=rows["timestamp"] * 1000))
    np.testing.assert_array_equal(got[list(FEATURE_COLUMNS)].to_numpy(),
                                  collaborative_features(folder).transform(rows)[list(FEATURE_COLUMNS)].to_numpy())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_retrieval_model_trains_on_events_before_the_split(folders, protocol):
    """The SASRec behind ``retrieval_score`` is trained on ``training_events(split)``, all of which
    precede the split's rows: before each of that user's rows of the split (leave-last-out), before
    the split's cut (timeline valid and test). It scores each row from the row's own history
    (``sequential_scores`` reads ``history_item_ids``, whose events tests/test_leakage_audit.py
    checks are strictly earlier than the row)."""
    folder = folders[protocol]
    cuts = split_cuts(folder)
    for split in SPLITS:
        events = training_events(folder, split)
        rows = split_rows(folder, split)
        first_row = rows.groupby("user_id")["timestamp"].min()
        limit = events["user_id"].map(first_row)
        assert (events["timestamp"][limit.notna()] < limit.dropna()).all(), (protocol, split)
        if cuts is not None and split != "train":
            assert events["timestamp"].max() < getattr(cuts, split), (protocol, split)
    split = "valid"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = hybrid_feature_rows(folder, split, seed=3, settings=TINY_SEQUENTIAL)
    baseline = train_sequential_baseline("sasrec", folder, 3, split=split, settings=TINY_SEQUENTIAL)
    expected = sequential_scores(baseline, folder, split)
    np.testing.assert_allclose(rows[RETRIEVAL_COLUMN].to_numpy(), expected["score"].to_numpy(), rtol=1e-6, atol=1e-6)
    assert set(HEAD_FEATURES) <= set(rows.columns)
    assert np.isfinite(rows[list(HEAD_FEATURES)].to_numpy(np.float64)).all()


def test_retrieval_score_matches_rows_in_any_order(folders):
    folder = folders["leave-last-out"]
    baseline = train_sequential_baseline("sasrec", folder, 0, split="train", settings=TINY_SEQUENTIAL)
    rows = split_rows(folder, "train")
    shuffled = rows.sample(frac=1.0, random_state=0)
    scored = add_retrieval_scores(shuffled, folder, "train", baseline=baseline)
    expected = sequential_scores(baseline, folder, "train").set_index(["group_id", "item_id"])["score"]
    got = scored.set_index(["group_id", "item_id"])[RETRIEVAL_COLUMN]
    np.testing.assert_allclose(got.to_numpy(), expected.loc[got.index].to_numpy())
    assert scored.index.equals(shuffled.index)
    with pytest.raises(ValueError, match="not rows of split 'train'"):
        add_retrieval_scores(split_rows(folder, "test").head(3), folder, "train", baseline=baseline)


def test_the_feature_table_is_written_once_and_remade_when_its_recipe_changes(folders, tmp_path):
    """write_feature_table: the one builder of the feature parquet the CLI, the quickstart and the
    benchmarks hand to training; a table made with the same split, window and seed is reused."""
    from merlin_mllm.pipelines.hybrid import write_feature_table

    folder = folders["leave-last-out"]
    path = tmp_path / "features_test.parquet"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert write_feature_table(folder, "test", path, columns=FEATURE_COLUMNS) == path
        written = pd.read_parquet(path)
        assert "history_item_ids" not in written.columns
        expected = hybrid_feature_rows(folder, "test", retrieval=False)
        np.testing.assert_array_equal(written[list(FEATURE_COLUMNS)].to_numpy(),
                                      expected[list(FEATURE_COLUMNS)].to_numpy())
        stamp = path.stat().st_mtime_ns
        write_feature_table(folder, "test", path, columns=FEATURE_COLUMNS)
        assert path.stat().st_mtime_ns == stamp  # reused
        write_feature_table(folder, "test", path, columns=FEATURE_COLUMNS, recent_days=7)
        assert path.stat().st_mtime_ns != stamp  # another window: made again
        shorter = pd.read_parquet(path)["item_log_recent_count"].to_numpy()
        assert (shorter <= written["item_log_recent_count"].to_numpy()).all()
        assert (shorter < written["item_log_recent_count"].to_numpy()).any()
        with pytest.raises(ValueError, match=r"gives no feature \['genre_match'\]"):
            write_feature_table(folder, "test", tmp_path / "other.parquet", columns=[*FEATURE_COLUMNS, "genre_match"])

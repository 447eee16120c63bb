"""The hybrid ranker's tabular features on a real prepared ML-100k folder: the NVTabular workflow's
counts equal a pandas groupby over the training-time events, no scored target is ever counted,
and the retrieval score is the split-time SASRec's."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from merlin_mllm.baselines import SequentialSettings, sequential_scores, train_sequential_baseline
from merlin_mllm.data.splits import split_rows, training_events
from merlin_mllm.data.collaborative import FEATURE_COLUMNS, SECONDS_PER_DAY, CollaborativeFeatures
from merlin_mllm.data.prepare import prepare_dataset
from merlin_mllm.data.tables import Tags, read_table
from merlin_mllm.pipelines.features import (
    FUSION_FEATURES,
    RETRIEVAL_COLUMN,
    add_retrieval_scores,
    collaborative_features,
    fusion_feature_rows,
)

RECENT_DAYS = 20.0
TINY_SEQUENTIAL = SequentialSettings(hidden=16, epochs=2, max_len=20)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("ml100k_temporal")
    prepare_dataset("ml-100k", "temporal", out, max_users=30, max_history=40, seed=42, n_negatives_test=10)
    return out


def expected_features(events: pd.DataFrame, rows: pd.DataFrame, recent_days: float) -> pd.DataFrame:
    """The three columns computed by hand with pandas: log1p of groupby counts, 0 when unseen."""
    since = events["timestamp"].max() - recent_days * SECONDS_PER_DAY
    item_counts = events.groupby("item_id").size()
    recent_counts = events[events["timestamp"] >= since].groupby("item_id").size()
    user_counts = events.groupby("user_id").size()
    return pd.DataFrame({
        "item_log_count": np.log1p(rows["item_id"].map(item_counts).fillna(0).to_numpy(float)),
        "item_log_recent_count": np.log1p(rows["item_id"].map(recent_counts).fillna(0).to_numpy(float)),
        "user_log_count": np.log1p(rows["user_id"].map(user_counts).fillna(0).to_numpy(float)),
    })


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_counts_equal_a_groupby_over_training_events(folder, split):
    rows = split_rows(folder, split)
    featured = collaborative_features(folder, split, recent_days=RECENT_DAYS).transform(rows)
    expected = expected_features(training_events(folder, split), rows, RECENT_DAYS)
    for column in FEATURE_COLUMNS:
        assert featured[column].dtype == np.float32
        np.testing.assert_allclose(featured[column].to_numpy(), expected[column].to_numpy(), rtol=1e-6, atol=1e-6)
    # Rows keep their order and columns; some candidates were never seen (count 0), some recently.
    pd.testing.assert_frame_equal(featured[rows.columns], rows)
    assert (featured["item_log_count"] == 0).any() and (featured["item_log_recent_count"] > 0).any()


def test_no_scored_target_is_counted(folder):
    """Independently of training_events: the test-time counts are all events minus the test targets."""
    events = read_table(folder / "events")
    test = split_rows(folder, "test")
    targets = test[test["label"] == 1][["user_id", "target_position"]].rename(columns={"target_position": "position"})
    is_target = events.merge(targets.assign(hit=True), on=["user_id", "position"], how="left")["hit"].fillna(False).to_numpy()
    assert is_target.sum() == len(targets) == 30
    featured = collaborative_features(folder, "test", recent_days=RECENT_DAYS).transform(test)
    positives = featured[featured["label"] == 1]
    all_counts = events.groupby("item_id").size()
    without_targets = events[~is_target].groupby("item_id").size()
    np.testing.assert_allclose(np.expm1(positives["item_log_count"].to_numpy(np.float64)),
                               positives["item_id"].map(without_targets).fillna(0).to_numpy(), atol=1e-3)
    # Counting every event would have counted each positive's own target once more.
    assert (positives["item_id"].map(all_counts).to_numpy() > np.round(np.expm1(positives["item_log_count"]))).all()
    # The valid split's features miss the valid and the test targets.
    valid_events = training_events(folder, "valid")
    assert len(valid_events) == len(events) - 60


def test_schema_tags_and_unseen_keys(folder):
    features = collaborative_features(folder, "test")
    schema = features.output_schema
    assert schema.column_names == list(FEATURE_COLUMNS)
    for column in schema:
        assert Tags.CONTINUOUS in column.tags
    unseen = features.transform(pd.DataFrame({"user_id": [10**6], "item_id": [10**6], "extra": ["kept"]}))
    assert unseen[list(FEATURE_COLUMNS)].to_numpy().tolist() == [[0.0, 0.0, 0.0]]
    assert unseen["extra"].tolist() == ["kept"]


def test_recent_window_parameter(folder):
    events = training_events(folder, "test")
    rows = split_rows(folder, "test")
    wide = CollaborativeFeatures(recent_days=10_000).fit(events).transform(rows)
    np.testing.assert_allclose(wide["item_log_recent_count"], wide["item_log_count"])
    narrow = CollaborativeFeatures(recent_days=1e-6).fit(events)
    assert narrow.recent_since == events["timestamp"].max()
    with pytest.raises(ValueError, match="recent_days"):
        CollaborativeFeatures(recent_days=0)
    with pytest.raises(ValueError, match="timestamp"):
        CollaborativeFeatures().fit(events.drop(columns="timestamp"))
    with pytest.raises(RuntimeError, match="before fit"):
        CollaborativeFeatures().transform(rows)


def test_retrieval_score_is_the_split_time_sasrec(folder):
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


def test_fusion_feature_rows_has_every_feature(folder):
    rows = fusion_feature_rows(folder, "valid", seed=0, settings=TINY_SEQUENTIAL)
    assert set(FUSION_FEATURES) <= set(rows.columns)
    assert np.isfinite(rows[list(FUSION_FEATURES)].to_numpy(np.float64)).all()
    assert len(rows) == len(split_rows(folder, "valid"))

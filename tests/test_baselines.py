"""The non-LLM baselines: popularity (hand-computed on a tiny folder, no leakage), popularity as of
each row's time (all and recent, hand-computed), and the compact SASRec/GRU4Rec (they must learn a
planted next-item pattern)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from merlin_mllm.baselines import (
    SequentialSettings,
    evaluate_popularity,
    evaluate_popularity_as_of,
    evaluate_sequential,
    popularity_as_of_scores,
    popularity_scores,
    training_events,
)
from merlin_mllm.data.tables import Tags, write_table
from merlin_mllm.metrics import ranking_metrics

ROW_TAGS = {"user_id": [Tags.USER_ID], "item_id": [Tags.ITEM_ID], "label": [Tags.TARGET]}


def _write_folder(root, sequences, rows_by_split, n_items):
    """A prepared-dataset folder: events from ``sequences`` (user -> items in time order), rows
    per split as (user, target_position, [positive, negatives...]). Event ``position`` happens at
    second 1000 + position (so users' events interleave); a row's timestamp is its target's."""
    events = pd.DataFrame(
        [(user, item, 1000 + position, position) for user, items in sequences.items() for position, item in enumerate(items)],
        columns=["user_id", "item_id", "timestamp", "position"],
    ).astype(np.int64)
    write_table(events, root / "events", ROW_TAGS)
    items = pd.DataFrame({"item_id": np.arange(1, n_items + 1, dtype=np.int64),
                          "title": [f"item {i}" for i in range(1, n_items + 1)]})
    write_table(items, root / "items", ROW_TAGS)
    group = 0
    for split, groups in rows_by_split.items():
        records = []
        for user, target_position, candidates in groups:
            history = list(sequences[user][:target_position])
            for index, item in enumerate(candidates):
                records.append({"user_id": user, "item_id": item, "label": int(index == 0),
                                "target_position": target_position, "group_id": group,
                                "timestamp": 1000 + target_position,
                                "history_item_ids": history})
            group += 1
        frame = pd.DataFrame(records)
        for column in ("user_id", "item_id", "label", "target_position", "group_id", "timestamp"):
            frame[column] = frame[column].astype(np.int64)
        write_table(frame, root / split, ROW_TAGS)
    return root


@pytest.fixture()
def tiny_paper(tmp_path):
    """Paper-like protocol: users 1-2 train, user 3 valid, users 4-5 test (target = last event)."""
    sequences = {1: [1, 2, 3], 2: [2, 3, 5], 3: [3, 4], 4: [2, 6, 4], 5: [3, 1, 6]}
    rows = {
        "train": [(1, 2, [3, 7]), (2, 2, [5, 7])],
        "valid": [(3, 1, [4, 7])],
        # user 4's target is item 4; user 5's target is item 6.
        "test": [(4, 2, [4, 1, 3, 7]), (5, 2, [6, 2, 5, 7])],
    }
    return _write_folder(tmp_path / "paper", sequences, rows, n_items=7)


def test_training_events_drop_the_split_targets_and_what_follows(tiny_paper, tmp_path):
    kept = training_events(tiny_paper, "test")
    # Users 1-3 keep everything; users 4 and 5 lose their last event (the test target).
    assert kept.groupby("user_id")["position"].max().to_dict() == {1: 2, 2: 2, 3: 1, 4: 1, 5: 1}
    valid = training_events(tiny_paper, "valid")
    # The valid target of user 3 (position 1) and both test targets are held out.
    assert valid.groupby("user_id")["position"].max().to_dict() == {1: 2, 2: 2, 3: 0, 4: 1, 5: 1}

    # Temporal-like: one user with targets at 3 (train), 4 (valid), 5 (test); test drops only position 5.
    temporal = _write_folder(tmp_path / "temporal", {1: [1, 2, 3, 4, 5, 6]},
                             {"train": [(1, 3, [4, 7])], "valid": [(1, 4, [5, 7])], "test": [(1, 5, [6, 7])]}, n_items=7)
    assert training_events(temporal, "test")["item_id"].tolist() == [1, 2, 3, 4, 5]
    assert training_events(temporal, "valid")["item_id"].tolist() == [1, 2, 3, 4]
    assert training_events(temporal, "train")["item_id"].tolist() == [1, 2, 3]


def test_prepared_tables_read_each_table_once_and_give_the_same_events(tiny_paper, monkeypatch):
    from merlin_mllm.data import splits, tables

    reads = []
    real_read = tables.read_table
    monkeypatch.setattr(tables, "read_table", lambda path, *a, **k: reads.append(Path(path).name) or real_read(path, *a, **k))
    data = splits.PreparedTables(tiny_paper)
    assert Path(data) == tiny_paper and str(data) == str(tiny_paper)  # still the folder to path-taking code
    shared = {split: training_events(data, split) for split in ("test", "valid", "train")}
    data.split("test")
    assert sorted(reads) == ["events", "test", "train", "valid"]  # each table once, however often it is used
    for split, events in shared.items():
        assert events.equals(training_events(tiny_paper, split))  # the same events as from the folder itself
    # Each caller gets its own copy: changing one does not change what the next one reads.
    items = data.items
    items["title"] = "changed"
    assert data.items["title"].tolist() == [f"item {i}" for i in range(1, 8)]
    with pytest.raises(ValueError, match="split must be one of"):
        data.split("holdout")


def test_popularity_scores_match_hand_counts(tiny_paper):
    scored = popularity_scores(tiny_paper, "test")
    # Counted events: users 1-3 all, users 4-5 without their targets:
    # 1,2,3 | 2,3,5 | 3,4 | 2,6 | 3,1  -> item: count
    counts = {1: 2, 2: 3, 3: 4, 4: 1, 5: 1, 6: 1, 7: 0}
    assert scored["score"].tolist() == [float(counts[i]) for i in scored["item_id"]]
    assert list(scored.columns[:4]) == ["group_id", "user_id", "item_id", "label"]
    # No leakage: item 4 is user 4's test target and item 6 user 5's; had the targets been
    # counted, they would score 2 each.
    assert scored.loc[scored["item_id"] == 4, "score"].iloc[0] == 1.0
    assert scored.loc[scored["item_id"] == 6, "score"].iloc[0] == 1.0


def test_evaluate_popularity_writes_the_ranker_layout(tiny_paper, tmp_path):
    out = tmp_path / "eval" / "popularity.json"
    result = evaluate_popularity(tiny_paper, out)
    # Group 3 (user 4): positive 4 scores 1 against 2, 4, 0 -> rank 3.
    # Group 4 (user 5): positive 6 scores 1 against 3, 1, 0 -> tied with one negative: rank 2 or 3.
    assert result["hr@3"] == pytest.approx(1.0)
    assert result["mrr@3"] == pytest.approx((1 / 3 + (1 / 2 + 1 / 3) / 2) / 2)
    # AUC pooled over 2 positives x 6 negatives: positive(1) beats 0, 0 and ties 1 -> (2 + 0.5 + 2 + 0.5) / 12
    assert result["auc"] == pytest.approx(5 / 12)
    written = json.loads(out.read_text())
    assert written["auc"] == result["auc"] and written["run"]["model"] == "popularity"
    for key in ("hr@5", "mrr@5", "ndcg@5", "hr@10", "n_groups", "ties"):
        assert key in written
    scores = pd.read_parquet(tmp_path / "eval" / "popularity.scores.parquet")
    assert list(scores.columns) == ["group_id", "user_id", "item_id", "label", "score"]
    again = ranking_metrics(scores["label"], scores["score"], scores["group_id"])
    assert again["ndcg@5"] == pytest.approx(written["ndcg@5"])


def test_popularity_as_of_the_row_counts_only_earlier_events(tiny_paper, tmp_path):
    """Both test rows are at second 1002: only the events at positions 0 and 1 (seconds 1000, 1001)
    of every user came before; those at 1002 (the targets, and user 2's item 5) did not."""
    scored = popularity_as_of_scores(tiny_paper, "test")
    # Before 1002: 1,2 | 2,3 | 3,4 | 2,6 | 3,1 -> item: count
    counts = {1: 2, 2: 3, 3: 3, 4: 1, 5: 0, 6: 1, 7: 0}
    np.testing.assert_allclose(np.expm1(scored["score"].to_numpy()), [counts[i] for i in scored["item_id"]], rtol=1e-6)
    assert list(scored.columns) == ["group_id", "user_id", "item_id", "label", "target_position", "score"]
    # Counted from training_events instead, item 3 would score 4 and item 5 1 (events after the rows).
    assert popularity_scores(tiny_paper, "test").set_index("item_id")["score"].loc[[3, 5]].tolist() == [4.0, 1.0]
    # A 1.5 s window before 1002 holds only the events at second 1001: 2 | 3 | 4 | 6 | 1, once each.
    recent = popularity_as_of_scores(tiny_paper, "test", recent_days=1.5 / 86_400)
    recent_counts = {1: 1, 2: 1, 3: 1, 4: 1, 5: 0, 6: 1, 7: 0}
    np.testing.assert_allclose(np.expm1(recent["score"].to_numpy()), [recent_counts[i] for i in recent["item_id"]],
                               rtol=1e-6)
    result = evaluate_popularity_as_of(tiny_paper, tmp_path / "recent.json", recent_days=1.5 / 86_400)
    assert result["run"]["model"] == "recent_popularity_as_of_row"
    # Group of user 4: positive 4 (1) against 1 (1), 3 (1), 7 (0); user 5: 6 (1) against 2 (1), 5 (0), 7 (0).
    assert result["auc"] == pytest.approx((0.5 + 0.5 + 1 + 0.5 + 1 + 1) / 6)


def test_bad_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found: .*test"):
        popularity_scores(tmp_path, "test")
    with pytest.raises(ValueError, match="split must be one of"):
        popularity_scores(tmp_path, "holdout")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Each user walks a fixed cycle over 30 items (item i is followed by i+1). Test target =
    the next item in the cycle, negatives drawn at random: only a sequence model can tell."""
    rng = np.random.default_rng(0)
    n_items, length = 30, 8
    sequences, test = {}, []
    for user in range(1, 151):
        start = int(rng.integers(n_items))
        sequences[user] = [(start + step) % n_items + 1 for step in range(length)]
        seen = set(sequences[user])
        negatives = rng.choice([i for i in range(1, n_items + 1) if i not in seen], size=10, replace=False)
        test.append((user, length - 1, [sequences[user][-1], *map(int, negatives)]))
    def unseen(user):
        return next(i for i in range(1, n_items + 1) if i not in sequences[user])

    # Train/valid rows only bound what counts as training-time data (both before the test target).
    rows = {"train": [(u, length - 3, [sequences[u][length - 3], unseen(u)]) for u in (1, 2)],
            "valid": [(u, length - 2, [sequences[u][length - 2], unseen(u)]) for u in (1, 2)], "test": test}
    return _write_folder(tmp_path_factory.mktemp("planted"), sequences, rows, n_items=n_items)


@pytest.mark.parametrize("kind", ["sasrec", "gru4rec"])
def test_sequential_baseline_learns_a_planted_pattern(planted, tmp_path, kind):
    settings = SequentialSettings(hidden=32, max_len=10, epochs=30, batch_size=32, lr=5e-3, dropout=0.1)
    result = evaluate_sequential(kind, planted, tmp_path / f"{kind}.json", seed=0, settings=settings)
    # Random order gives AUC 0.5 and HR@3 = 3/11; the cycle is fully predictable.
    assert result["auc"] > 0.9, result
    assert result["hr@3"] > 0.8, result
    losses = result["run"]["epoch_loss"]
    assert losses[-1] < 0.5 * losses[0]
    assert "compact" in result["run"]["implementation"]
    popularity = evaluate_popularity(planted, tmp_path / "popularity.json")
    assert result["auc"] > popularity["auc"] + 0.2  # popularity is near chance here by construction


def test_sequential_seed_is_deterministic(planted, tmp_path):
    settings = SequentialSettings(hidden=16, max_len=10, epochs=2, batch_size=64)
    first = evaluate_sequential("sasrec", planted, tmp_path / "a.json", seed=3, settings=settings)
    second = evaluate_sequential("sasrec", planted, tmp_path / "b.json", seed=3, settings=settings)
    assert first["auc"] == second["auc"] and first["run"]["epoch_loss"] == second["run"]["epoch_loss"]

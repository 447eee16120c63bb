"""add_prefix_targets on a real prepared MovieLens-100k folder: which groups it adds, their
negatives against the raw file (re-read here with pandas), untouched test data, and that every
added row's user summary is a step of the chain the store already holds."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from merlin_mllm import baselines
from merlin_mllm.data.prefix_targets import add_prefix_targets
from merlin_mllm.data.prepare import prepare_dataset
from merlin_mllm.data.tables import read_table
from merlin_mllm.models.embedded import package_dir
from merlin_mllm.summaries.store import open_store
from merlin_mllm.summaries.user_history import read_items
from merlin_mllm.summaries.user_summarizer import UserSummarizer, UserSummaryConfig

ML100K = package_dir("recbole", "recbole") / "dataset_example" / "ml-100k"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    source = tmp_path_factory.mktemp("prepared")
    prepare_dataset("ml-100k", "paper", source, max_users=40, max_history=10, seed=5)
    out = tmp_path_factory.mktemp("prefixes") / "data"
    summary = add_prefix_targets(source, out, block_size=3, seed=1)
    return source, out, summary


def test_adds_one_group_per_block_boundary_before_each_training_target(folders):
    source, out, summary = folders
    before, after = read_table(source / "train"), read_table(out / "train")
    events = read_table(source / "events")
    pd.testing.assert_frame_equal(after.iloc[: len(before)].reset_index(drop=True), before)
    added = after.iloc[len(before):]
    targets = before[before["label"] == 1].set_index("user_id")["target_position"]
    times = {u: g.sort_values("position")["timestamp"].tolist() for u, g in events.groupby("user_id")}
    # Every boundary strictly before the target's time whose two sides differ in time (a boundary
    # inside one second's events cannot be a row's whole history).
    expected = sorted((u, p) for u, t in targets.items() for p in range(3, int(t), 3) if times[u][p - 1] < times[u][p])
    skipped = sum(times[u][p - 1] == times[u][p] for u, t in targets.items() for p in range(3, int(t), 3))
    positives = added[added["label"] == 1]
    assert sorted(zip(positives["user_id"], positives["target_position"])) == expected
    assert summary["groups_added"] == len(expected) > 0 and skipped > 0
    assert summary["rows_after"] == len(after) == len(before) + 2 * len(expected)
    sequence = {u: g.sort_values("position")["item_id"].tolist() for u, g in events.groupby("user_id")}
    for row in positives.itertuples():
        assert row.item_id == sequence[row.user_id][row.target_position]
        assert list(row.history_item_ids) == sequence[row.user_id][: row.target_position]
    # One positive and one negative per new group; group ids are new across all splits.
    assert (added.groupby("group_id")["label"].agg(["sum", "size"]).values == [1, 2]).all()
    other_groups = set(read_table(source / "valid")["group_id"]) | set(read_table(source / "test")["group_id"])
    assert not set(added["group_id"]) & (other_groups | set(before["group_id"]))


def test_negatives_are_items_the_user_never_rated_in_the_raw_file(folders):
    source, out, _ = folders
    raw = pd.read_csv(ML100K / "ml-100k.inter", sep="\t", dtype=str)
    raw.columns = [name.split(":")[0] for name in raw.columns]
    users = read_table(source / "users").set_index("user_id")["user_key"].astype(str)
    items = read_table(source / "items").set_index("item_id")["item_key"].astype(str)
    rated = set(zip(raw["user_id"], raw["item_id"]))
    added = read_table(out / "train").iloc[len(read_table(source / "train")):]
    negatives = added[added["label"] == 0]
    assert negatives["item_id"].between(1, len(items)).all()
    assert not any((users[u], items[i]) in rated for u, i in zip(negatives["user_id"], negatives["item_id"]))
    # The positives, by contrast, are all rated: the check above can fail.
    positives = added[added["label"] == 1]
    assert all((users[u], items[i]) in rated for u, i in zip(positives["user_id"], positives["item_id"]))


def test_leaves_everything_but_train_as_it_was(folders):
    source, out, summary = folders
    for name in ("valid", "test", "items", "events", "users"):
        pd.testing.assert_frame_equal(read_table(out / name), read_table(source / name))
    report = json.loads((out / "report.json").read_text())
    assert report["prefix_targets"] == summary
    assert report["users_per_split"] == json.loads((source / "report.json").read_text())["users_per_split"]


def test_every_added_row_summary_is_a_step_of_its_users_training_chain(folders, tmp_path):
    # Why the extra rows cost no LLM call: the summary of a history cut at a block boundary is
    # the chain's step at that boundary, which summarising the training row already stored.
    source, out, _ = folders
    summarizer = UserSummarizer(open_store(tmp_path / "store"), read_items(source / "items"),
                                UserSummaryConfig("any-model", block_size=3), progress=False)
    train = read_table(out / "train")
    last = train[train["label"] == 1].sort_values("target_position").groupby("user_id").tail(1)
    chain = {row.user_id: {s.key for s in summarizer.plan(list(row.history_item_ids))} for row in last.itertuples()}
    prefix_rows = train[train["target_position"] < train["user_id"].map(last.set_index("user_id")["target_position"])]
    assert len(prefix_rows) > 0
    for row in prefix_rows.itertuples():
        assert summarizer.plan(list(row.history_item_ids))[-1].key in chain[row.user_id]
    # A history cut inside a block is not on the chain (its tail step is new): the check can fail.
    row = last[last["history_item_ids"].map(len) >= 6].iloc[0]
    assert summarizer.plan(list(row.history_item_ids)[:4])[-1].key not in chain[row.user_id]


def test_clear_errors(folders, tmp_path):
    source, _, _ = folders
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        add_prefix_targets(source, tmp_path / "x", block_size=0)
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(source, copy)
    report = json.loads((copy / "report.json").read_text())
    report["files"]["interactions"] = str(tmp_path / "gone" / "ml-100k.inter")
    (copy / "report.json").write_text(json.dumps(report))
    with pytest.raises(FileNotFoundError, match="whole history"):
        add_prefix_targets(copy, tmp_path / "y")
    assert not (tmp_path / "y").exists()


def test_item_prior_ceiling_counts_training_positives(folders, tmp_path):
    source, out, summary = folders
    rows = {r["scorer"].split(" (")[0]: r for r in baselines.item_prior_rows(source, out)}
    assert rows["training positives"]["events_counted"] == summary["groups_before"]
    assert rows["block-prefix training positives"]["events_counted"] == summary["groups_before"] + summary["groups_added"]
    # Every prefix: each training user's events after its first (its target, the last, included).
    events = read_table(source / "events")
    train_users = read_table(source / "train")["user_id"].unique()
    lengths = events[events["user_id"].isin(train_users)].groupby("user_id").size()
    assert rows["every-prefix training positives"]["events_counted"] == int((lengths - 1).sum())
    # The score of a test row is its item's count among the training groups' positives.
    test, train = read_table(source / "test"), read_table(out / "train")
    scored = baselines.item_count_scores(test, train.query("label == 1"))
    counts = train.loc[train["label"] == 1, "item_id"].value_counts()
    item = int(next(i for i in counts.index if i in set(test["item_id"])))
    assert (scored.loc[scored["item_id"] == item, "score"] == counts[item]).all() and counts[item] >= 1
    assert (scored.loc[~scored["item_id"].isin(train.loc[train["label"] == 1, "item_id"]), "score"] == 0).all()
    popularity = rows["popularity"]
    assert popularity["auc"] == pytest.approx(baselines.evaluate_popularity(source, tmp_path / "p.json")["auc"])
    gap = rows["training positives"]["minus_popularity"]
    assert gap["difference"] == pytest.approx(rows["training positives"]["auc"] - popularity["auc"])
    # A folder with other test groups is refused by name.
    other = tmp_path / "other"
    prepare_dataset("ml-100k", "paper", other, max_users=40, max_history=10, seed=6)
    with pytest.raises(ValueError, match="other test groups"):
        baselines.item_prior_rows(source, other)

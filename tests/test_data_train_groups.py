"""prepare_dataset's training-group options on real MovieLens-100k folders: K negatives per
training target (``train_negatives``), targets at the last item / every block boundary / every
position (``train_targets``), uniform or popularity-weighted training negatives
(``train_negative_sampling``); valid/ and test/ unchanged whatever they are; clear errors before
anything is written; and the user summary of an ``every`` row read from a store (the chain's
latest block boundary plus the titles after it).

The raw file is re-read here with pandas, so "never seen by the user" is checked against the data.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from merlin_mllm.data.splits import training_events
from merlin_mllm.data.prefix_targets import add_prefix_targets
from merlin_mllm.data.prepare import prepare_dataset
from merlin_mllm.data.tables import read_table
from merlin_mllm.models.embedded import package_dir
from merlin_mllm.summaries.rows import SINCE_BOUNDARY, partial_block_rule, row_summaries
from merlin_mllm.summaries.store import SummaryStore
from merlin_mllm.summaries.user_history import read_items
from merlin_mllm.summaries.user_store import record_config
from merlin_mllm.summaries.user_summarizer import UserSummarizer, UserSummaryConfig

ML100K = package_dir("recbole", "recbole") / "dataset_example" / "ml-100k"
#: The quickstart's subset: 40 seeded users, 9 events each at most.
SUBSET = dict(max_users=40, max_history=9, seed=42)
PROTOCOLS = ["paper", "leave-last-out", "timeline"]


def _parquet_hashes(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*/*.parquet"))}


@pytest.fixture(scope="module")
def raw_seen() -> set:
    frame = pd.read_csv(ML100K / "ml-100k.inter", sep="\t", dtype=str)
    frame.columns = [name.split(":")[0] for name in frame.columns]
    return set(zip(frame["user_id"], frame["item_id"]))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One default folder per protocol and the non-default variants of the same users."""
    root = tmp_path_factory.mktemp("groups")
    variants = {
        "default": {},
        "explicit": dict(train_negatives=1, train_targets="last", train_negative_sampling="uniform"),
        "k7": dict(train_negatives=7),
        "blocks": dict(train_targets="blocks", train_negatives=3),
        "every_pop": dict(train_targets="every", train_negatives=3, train_negative_sampling="popularity"),
    }
    out = {}
    for protocol in PROTOCOLS:
        for name, options in variants.items():
            folder = root / f"{protocol}_{name}"
            report = prepare_dataset("ml-100k", protocol, folder, **SUBSET, **options)
            out[protocol, name] = (folder, report)
    return out


def _keyed(folder: Path, frame: pd.DataFrame) -> pd.DataFrame:
    users = read_table(folder / "users").set_index("user_id")["user_key"].astype(str)
    items = read_table(folder / "items").set_index("item_id")["item_key"].astype(str)
    return frame.assign(user_key=frame["user_id"].map(users), item_key=frame["item_id"].map(items))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_explicit_defaults_write_the_same_bytes(folders, protocol):
    default, explicit = folders[protocol, "default"][0], folders[protocol, "explicit"][0]
    assert _parquet_hashes(default) == _parquet_hashes(explicit) and len(_parquet_hashes(default)) == 6
    settings = json.loads((default / "report.json").read_text())["settings"]
    assert {k: settings[k] for k in ("train_negatives", "train_targets", "train_negative_sampling")} == {
        "train_negatives": 1, "train_targets": "last", "train_negative_sampling": "uniform"}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("variant", ["k7", "blocks", "every_pop"])
def test_training_options_leave_valid_test_events_and_users_byte_identical(folders, protocol, variant):
    default, other = folders[protocol, "default"][0], folders[protocol, variant][0]
    before, after = _parquet_hashes(default), _parquet_hashes(other)
    for name in ("valid", "test", "events", "users"):
        assert after[f"{name}/part_0.parquet"] == before[f"{name}/part_0.parquet"], name
    assert after["train/part_0.parquet"] != before["train/part_0.parquet"]
    # Every item keeps its id: the default items come first, unchanged; new ones follow.
    items_before, items_after = read_table(default / "items"), read_table(other / "items")
    pd.testing.assert_frame_equal(items_after.iloc[: len(items_before)], items_before)
    report = json.loads((other / "report.json").read_text())
    assert len(items_after) == len(items_before) + report["train_groups"]["items_only_in_added_train_rows"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_k_negatives_per_training_target_never_seen_by_the_user(folders, raw_seen, protocol):
    default, _ = folders[protocol, "default"]
    folder, report = folders[protocol, "k7"]
    train = read_table(folder / "train")
    groups = train.groupby("group_id")
    assert groups.size().eq(8).all() and groups["label"].sum().eq(1).all()
    assert groups["user_id"].nunique().eq(1).all() and groups["target_position"].nunique().eq(1).all()
    assert not train.duplicated(["group_id", "item_id"]).any()
    # The same targets and group ids as the default folder's training groups.
    positives, default_positives = (read_table(f / "train").query("label == 1").reset_index(drop=True) for f in (folder, default))
    pd.testing.assert_frame_equal(positives, default_positives)
    keyed = _keyed(folder, train)
    assert all(((u, i) in raw_seen) == bool(label) for u, i, label in zip(keyed["user_key"], keyed["item_key"], keyed["label"]))
    assert report["rows_per_split"]["train"] == len(train) == 8 * report["users_per_split"]["train"]
    # Valid groups keep the protocol's size (n_negatives_train), test groups 1 + 20.
    assert read_table(folder / "valid").groupby("group_id").size().eq(2).all()
    assert read_table(folder / "test").groupby("group_id").size().eq(21).all()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_blocks_and_every_targets(folders, raw_seen, protocol):
    events = read_table(folders[protocol, "default"][0] / "events")
    sequence = {u: g.sort_values("position")["item_id"].tolist() for u, g in events.groupby("user_id")}
    times = {u: g.sort_values("position")["timestamp"].tolist() for u, g in events.groupby("user_id")}

    def earlier(user, position):  # the user's events strictly before the time of its event at `position`
        return sum(t < times[user][position] for t in times[user])

    own_rows = read_table(folders[protocol, "default"][0] / "train").query("label == 1").set_index("user_id")
    own = own_rows["target_position"]
    other_groups = set()
    for split in ("valid", "test"):
        other_groups |= set(read_table(folders[protocol, "default"][0] / split)["group_id"])
    for variant, step in (("blocks", 3), ("every_pop", 1)):
        folder, report = folders[protocol, variant]
        train = read_table(folder / "train")
        positives = train[train["label"] == 1]
        # The event at every block boundary (or position) strictly before the target's time; its
        # history stops before its own time. Blocks: only boundaries between two distinct times
        # (the history is whole blocks); every: any event with at least one earlier one.
        added_targets = [(u, earlier(u, p), sequence[u][p]) for u, t in own.items() for p in range(3, int(t), step)
                         if (earlier(u, p) == p if variant == "blocks" else earlier(u, p) >= 1)]
        expected = sorted([(u, int(t), int(own_rows.loc[u, "item_id"])) for u, t in own.items()] + added_targets)
        assert sorted(zip(positives["user_id"], positives["target_position"], positives["item_id"])) == expected
        assert report["train_groups"] == {**report["train_groups"], "protocol_targets": len(own), "added_targets": len(expected) - len(own)}
        for row in positives.itertuples():
            assert row.target_position == earlier(row.user_id, sequence[row.user_id].index(row.item_id))
            assert row.timestamp == times[row.user_id][sequence[row.user_id].index(row.item_id)]
        for row in train.itertuples():
            assert list(row.history_item_ids) == sequence[row.user_id][: row.target_position]
        assert train.groupby("group_id").size().eq(4).all() and train.groupby("group_id")["label"].sum().eq(1).all()
        # The protocol's groups first, with their own ids; the added ones after every test group.
        first = train.iloc[: 4 * len(own)]
        assert (first.query("label == 1").set_index("user_id")["target_position"] == own.loc[first.query("label == 1")["user_id"]]).all()
        added = set(train.iloc[4 * len(own):]["group_id"])
        assert min(added) > max(other_groups) and not added & set(first["group_id"])
        keyed = _keyed(folder, train[train["label"] == 0])
        assert not any((u, i) in raw_seen for u, i in zip(keyed["user_key"], keyed["item_key"]))


def test_blocks_picks_the_positions_add_prefix_targets_adds(folders, tmp_path):
    source = folders["paper", "default"][0]
    add_prefix_targets(source, tmp_path / "prefixes", block_size=3, seed=1)
    post = read_table(tmp_path / "prefixes" / "train").query("label == 1")
    prepared = read_table(folders["paper", "blocks"][0] / "train").query("label == 1")
    columns = ["user_id", "item_id", "target_position", "timestamp"]
    pd.testing.assert_frame_equal(post[columns].reset_index(drop=True), prepared[columns].reset_index(drop=True))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_popularity_negatives_follow_training_time_counts(folders, protocol):
    default = folders[protocol, "default"][0]
    folder, report = folders[protocol, "every_pop"]
    counts = training_events(default, "valid")["item_id"].value_counts()
    negatives = read_table(folder / "train").query("label == 0")["item_id"]
    # Only items with a training-time event are drawn, and they are popular ones.
    assert negatives.isin(counts.index).all() and report["train_groups"]["items_only_in_added_train_rows"] == 0
    uniform = read_table(folders[protocol, "blocks"][0] / "train").query("label == 0")["item_id"]
    assert counts.reindex(negatives).mean() > 2 * counts.reindex(uniform).fillna(0).mean()
    # No valid or test target is ever counted.
    for split in ("valid", "test"):
        targets = read_table(default / split).query("label == 1")
        events = training_events(default, "valid")
        assert not events.merge(targets, on=["user_id", "item_id"]).shape[0]


def test_popularity_sampling_draws_in_proportion_to_the_weights():
    from merlin_mllm.data import processing

    weights = np.array([0, 1, 2, 3, 4, 0, 10], dtype=np.float64)
    rng = np.random.default_rng(0)
    draws = np.concatenate([processing.sample_negatives(rng, 6, np.array([4], dtype=np.int64), 1, weights)
                            for _ in range(16000)])
    share = np.bincount(draws, minlength=7) / len(draws)
    np.testing.assert_allclose(share, [0, 1 / 16, 2 / 16, 3 / 16, 0, 0, 10 / 16], atol=0.01)
    pairs = [processing.sample_negatives(rng, 6, np.array([], dtype=np.int64), 4, weights) for _ in range(200)]
    assert all(len(set(p.tolist())) == 4 and set(p.tolist()) <= {1, 2, 3, 4, 6} for p in pairs)
    with pytest.raises(ValueError, match="only 4 of 6 items"):
        processing.sample_negatives(rng, 6, np.array([1], dtype=np.int64), 5, weights)


@pytest.mark.parametrize("options, message", [
    (dict(train_negatives=0), "train_negatives must be an integer >= 1"),
    (dict(train_negatives=-2), "train_negatives must be an integer >= 1"),
    (dict(train_targets="all"), "unknown train_targets 'all'; choose one of \\['last', 'blocks', 'every'\\]"),
    (dict(train_negative_sampling="hard"), "unknown train_negative_sampling 'hard'"),
    (dict(train_block_size=0, train_targets="blocks"), "train_block_size must be an integer >= 1"),
])
def test_bad_settings_are_refused_before_writing(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        prepare_dataset("ml-100k", "paper", tmp_path / "out", **SUBSET, **options)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sampling", ["uniform", "popularity"])
def test_more_negatives_than_unseen_items_names_the_user(tmp_path, sampling):
    # A small catalogue (84 items rated by at least 200 users), each user with at least 20 of them.
    small = dict(max_history=0, min_user_interactions=20, min_item_interactions=200, n_negatives_test=2)
    probe = prepare_dataset("ml-100k", "paper", tmp_path / "probe", **small)
    n_items = probe["negatives_drawn_from_items"]
    with pytest.raises(ValueError) as err:
        prepare_dataset("ml-100k", "paper", tmp_path / "out", train_negatives=n_items - 19,
                        train_negative_sampling=sampling, **small)
    assert not (tmp_path / "out").exists()
    text = str(err.value)
    assert f"cannot draw {n_items - 19} negatives: only " in text and "ask for fewer negatives" in text
    user_key = text.split("unseen by user '")[1].split("'")[0]
    # The named user really has fewer unseen items than asked for.
    frame = pd.read_csv(ML100K / "ml-100k.inter", sep="\t", dtype=str)
    frame.columns = [name.split(":")[0] for name in frame.columns]
    items = set(read_table(tmp_path / "probe" / "items")["item_key"].astype(str))
    seen = set(frame.loc[frame["user_id"] == user_key, "item_id"]) & items
    assert n_items - len(seen) < n_items - 19
    # Asking too many test negatives names the user too (and writes nothing).
    with pytest.raises(ValueError, match=r"test groups: cannot draw \d+ negatives: only \d+ of \d+ items of the catalogue are unseen by user '"):
        prepare_dataset("ml-100k", "paper", tmp_path / "out", **{**small, "n_negatives_test": n_items - 19})


def test_cli_prepare_takes_the_training_options(tmp_path):
    from typer.testing import CliRunner

    from merlin_mllm.cli import app

    result = CliRunner().invoke(app, ["data", "prepare", "--dataset", "ml-100k", "--out", str(tmp_path / "d"),
                                      "--max-users", "20", "--train-negatives", "4", "--train-targets", "blocks",
                                      "--train-negative-sampling", "popularity"])
    assert result.exit_code == 0, result.output
    settings = json.loads((tmp_path / "d" / "report.json").read_text())["settings"]
    assert (settings["train_negatives"], settings["train_targets"], settings["train_negative_sampling"]) == (4, "blocks", "popularity")
    assert read_table(tmp_path / "d" / "train").groupby("group_id").size().eq(5).all()
    bad = CliRunner().invoke(app, ["data", "prepare", "--dataset", "ml-100k", "--out", str(tmp_path / "e"),
                                   "--train-targets", "sometimes"])
    assert bad.exit_code == 2 and "unknown train_targets 'sometimes'" in bad.output and not (tmp_path / "e").exists()


def test_every_rows_read_the_latest_boundary_summary_plus_titles_from_a_store(folders, tmp_path):
    folder = folders["paper", "every_pop"][0]
    train = read_table(folder / "train").drop_duplicates(["user_id", "target_position"])
    assert partial_block_rule(folder, "train") == "titles"
    assert partial_block_rule(folder, "test") == "summary" == partial_block_rule(folders["paper", "default"][0], "train")
    # A store holding only each user's boundary chain (what summarize users records for every
    # user): a recognisable text per step, and no step over a partial block.
    store = SummaryStore(tmp_path / "store")
    config = UserSummaryConfig("smollm2-135m-instruct", block_size=3)
    summarizer = UserSummarizer(store, read_items(folder / "items"), config, progress=False)
    events = read_table(folder / "events")
    chains = {u: g.sort_values("position")["item_id"].tolist() for u, g in events.groupby("user_id")}
    summarizer.texts.prepare(i for c in chains.values() for i in c)
    for user, chain in chains.items():
        for step in summarizer.plan(chain[: len(chain) - len(chain) % 3]):
            store.put(step.key, f"user {user} after {3 * step.level} items")
    record_config(store, config, items_path=folder / "items")
    store.close()

    texts = row_summaries(tmp_path / "store", folder, train, partial_block="titles")
    titles = read_table(folder / "items").set_index("item_id")["title"]
    for text, row in zip(texts, train.itertuples()):
        history = list(row.history_item_ids)
        boundary = len(history) - len(history) % 3
        since = SINCE_BOUNDARY + "; ".join(titles[i] for i in history[boundary:]) + "."
        parts = ([f"user {row.user_id} after {boundary} items"] if boundary else []) + ([since] if boundary < len(history) else [])
        assert text == " ".join(parts)
    assert any(SINCE_BOUNDARY in t for t in texts) and any(SINCE_BOUNDARY not in t for t in texts)
    # Read as stored steps instead, the rows inside a block have no summary: the error says so.
    with pytest.raises(ValueError, match="have no stored summary"):
        row_summaries(tmp_path / "store", folder, train, partial_block="summary")
    with pytest.raises(ValueError, match="partial_block must be one of"):
        row_summaries(tmp_path / "store", folder, train, partial_block="tail")

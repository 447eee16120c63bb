"""Collaborative tokens (issue 24, item 3): SASRec item embeddings trained before the train split's
cut, projected to one soft token after each history title and after the candidate's title."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from merlin_mllm.baselines import SequentialSettings
from merlin_mllm.pipelines.train_config import TrainConfig
from merlin_mllm.text import ITEM_TOKEN_BASE, item_slot

pytestmark = pytest.mark.filterwarnings("ignore")

TINY_SASREC = SequentialSettings(hidden=8, max_len=20, layers=1, epochs=2, batch_size=64)
TITLES = 3


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from merlin_mllm.data.prepare import prepare_dataset

    data = tmp_path_factory.mktemp("collab") / "data"
    prepare_dataset("ml-100k", "timeline", data, max_users=40, seed=3, n_negatives_test=4, train_negatives=2)
    return data


@pytest.fixture(scope="module")
def table(prepared):
    from merlin_mllm.pipelines.collab import train_collab_embeddings

    return train_collab_embeddings(prepared, seed=0, settings=TINY_SASREC)


@pytest.fixture(scope="module")
def ranker(table):
    from merlin_mllm.ranker.model import RankerModel

    return RankerModel.build("embedded", use_images=False, collab_tokens=True, collab_embeddings=table,
                             user_context="titles", context_titles=TITLES, device="cpu", seed=5)


def _rewrite_events(folder, change) -> None:
    for part in sorted((folder / "events").glob("*.parquet")):
        original = pq.read_table(part)
        frame = change(original.to_pandas())
        pq.write_table(pa.Table.from_pandas(frame, schema=original.schema, preserve_index=False), part)


def _same(a, b) -> bool:
    return torch.equal(a.item_ids, b.item_ids) and torch.equal(a.known, b.known) and torch.equal(a.vectors, b.vectors)


def test_the_table_learns_only_from_events_before_the_train_cut(prepared, table, tmp_path):
    from merlin_mllm.data.splits import split_cuts, training_events
    from merlin_mllm.data.tables import read_table
    from merlin_mllm.pipelines.collab import train_collab_embeddings

    events = read_table(prepared / "events")
    seen = training_events(prepared, "train")
    cut = split_cuts(prepared).valid
    items = np.sort(read_table(prepared / "items")["item_id"].to_numpy())
    # Cold: exactly the catalogue items without a training-time event; counted in the metadata.
    assert table.summary() == {"items": len(items), "with_embedding": int(np.isin(items, seen["item_id"]).sum()),
                               "cold": int((~np.isin(items, seen["item_id"])).sum())}
    assert table.metadata["trained_before"]["split"] == "train"
    assert table.metadata["trained_before"]["cuts"]["valid"] == cut
    assert table.metadata["trained_before"]["last_event_timestamp"] < cut
    assert table.metadata["trained_before"]["events"] == len(seen)

    def retrain(change):
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(prepared, copy)
        _rewrite_events(copy, change)
        return train_collab_embeddings(copy, seed=0, settings=TINY_SASREC)

    assert _same(retrain(lambda f: f), table)  # deterministic
    def move(event, to):  # the event (user_id, position) moved to item ``to``
        def change(frame):
            hit = ((frame["user_id"] == event["user_id"]) & (frame["position"] == event["position"])).to_numpy()
            assert hit.sum() <= 1
            return frame.assign(item_id=np.where(hit, to, frame["item_id"]))
        return change

    def another(event):
        return int(items[0]) if int(event["item_id"]) != int(items[0]) else int(items[1])

    # Events at or after the cut: moved to another item, or removed; the table is the same.
    late = events[events["timestamp"] >= cut]
    assert len(late) > 0
    assert _same(retrain(move(late.iloc[0], another(late.iloc[0]))), table)
    assert _same(retrain(lambda f: f[f["timestamp"] < cut].reset_index(drop=True)), table)
    # One event before the cut (a user's last: SASRec reads the last max_len of each sequence),
    # moved to another item: the table changes.
    early = seen.groupby("user_id").tail(1).iloc[0]
    changed = retrain(move(early, another(early)))
    assert not torch.equal(changed.vectors, table.vectors)


def test_one_soft_token_after_each_history_title_and_after_the_candidate(prepared, ranker):
    from merlin_mllm.data.tables import read_table
    from merlin_mllm.summaries.rows import user_context_texts

    rows = read_table(prepared / "test")
    rows = rows[rows["history_item_ids"].map(len) >= TITLES].head(3)
    titles = read_table(prepared / "items").set_index("item_id")["title"]
    texts = user_context_texts(None, prepared, rows, context="titles", titles=TITLES, item_slots=True)
    tokenizer = ranker.tokenizer
    for text, row in zip(texts, rows.itertuples()):
        encoded = ranker.prompt.encode(text, titles[row.item_id], item_id=int(row.item_id))
        ids = encoded.input_ids
        slots = [i for i, t in enumerate(ids) if t >= ITEM_TOKEN_BASE]
        history = [int(i) for i in list(row.history_item_ids)[-TITLES:]]
        shared = [i for i in slots if i < encoded.prefix_len]
        own = [i for i in slots if i >= encoded.prefix_len]
        # One per history title, in the shared user prefix, each right after its title.
        assert [ids[i] - ITEM_TOKEN_BASE - 1 for i in shared] == history
        for position, item in zip(shared, history):
            before = ids[max(s for s in [-1] + shared if s < position) + 1:position]
            assert tokenizer.decode(before).endswith(str(titles[item]))
        # One after the candidate's title, in the candidate's own part.
        assert [ids[i] - ITEM_TOKEN_BASE - 1 for i in own] == [int(row.item_id)]
        assert tokenizer.decode(ids[encoded.prefix_len:own[0]]).endswith(str(titles[row.item_id]))
        assert tokenizer.decode(ids[own[0] + 1:]).startswith("\n\nWill the user")
    # A title cannot place a soft token: slot characters in untrusted text are dropped.
    forged = ranker.prompt.encode("Recently watched: A.", "Evil" + item_slot(7), item_id=None)
    assert [t - ITEM_TOKEN_BASE for t in forged.input_ids if t >= ITEM_TOKEN_BASE] == [0]  # the cold slot only


def test_the_soft_tokens_change_the_score_and_the_projector_learns(prepared, ranker, table):
    from merlin_mllm.ranker.collab_tokens import CollabEmbeddings

    known = table.item_ids[table.known].tolist()
    cold = table.item_ids[~table.known].tolist()
    summary = f"Recently watched: Alien{item_slot(known[0])}; Heat{item_slot(known[1])}."
    candidates = [{"title": "Toy Story", "item_id": known[2]}, {"title": "Toy Story", "item_id": known[3]},
                  {"title": "Toy Story", "item_id": cold[0] if cold else 10 ** 6}]
    base = ranker.score(summary, candidates)
    # Same title, different items: the soft token tells them apart; all scorers agree.
    assert abs(base[0] - base[1]) > 1e-6
    np.testing.assert_allclose(ranker.score_independent(summary, candidates), base, atol=1e-5)
    np.testing.assert_allclose(ranker.score_packed(summary, candidates), base, atol=1e-5)
    # Another item table (rows permuted) changes the scores: the embeddings reach the model.
    permuted = CollabEmbeddings(table.item_ids.numpy(), table.vectors.flip(0).numpy(), table.known.numpy())
    ranker.set_collab_embeddings(permuted)
    try:
        assert np.abs(ranker.score(summary, candidates) - base).max() > 1e-6
    finally:
        ranker.set_collab_embeddings(table)
    # Gradients reach the projector and the cold vector through a training forward.
    ranker.train()
    try:
        ranker.zero_grad()
        out = ranker.forward_groups([ranker.make_group(summary, candidates, labels=[1, 0, 0])], loss="binary")
        out.loss.backward()
        assert float(ranker.collab_projector.mlp.linear_1.weight.grad.abs().sum()) > 0
        assert float(ranker.collab_projector.cold.grad.abs().sum()) > 0
        names = {g["name"]: g["params"] for g in ranker.parameter_groups(1e-4, 1e-3)}
        assert any(p is ranker.collab_projector.cold for p in names["projector"])
    finally:
        ranker.zero_grad()
        ranker.eval()


@pytest.fixture(scope="module")
def trained(prepared, table, tmp_path_factory):
    """A run trained with collaborative tokens (one step), and evaluate_ranker's test scores of it."""
    from merlin_mllm.pipelines.evaluation import evaluate_ranker
    from merlin_mllm.pipelines.training import train_ranker

    run = tmp_path_factory.mktemp("collab_run") / "run"
    config = TrainConfig.small_budget(max_steps=1, use_images=False, validate=False, batch_size=6,
                                      user_context="titles", context_titles=TITLES, collab_tokens=True, seed=5)
    train_ranker(prepared, None, run, config, collab_embeddings=table, progress=False)
    result = evaluate_ranker(prepared, None, run, run.parent / "eval" / "test.json", progress=False)
    return run, pd.read_parquet(result["run"]["scores"])


def test_trained_run_saves_its_table_and_evaluation_scores_what_the_ranker_scores(prepared, table, trained):
    from merlin_mllm.pipelines.training import load_rows, train_ranker
    from merlin_mllm.ranker.collab_tokens import CollabEmbeddings
    from merlin_mllm.ranker.model import RankerModel
    from merlin_mllm.ranker.ranker_config import COLLAB_EMBEDDINGS_FILE, COLLAB_PROJECTOR_FILE, RankerConfig

    run, scores = trained
    assert json.loads((run / "train_config.json").read_text())["collab_tokens"] is True
    assert RankerConfig.read(run / "model").collab_tokens and RankerConfig.read(run / "model").collab_dim == table.dim
    for path in (run / COLLAB_EMBEDDINGS_FILE, run / "model" / COLLAB_EMBEDDINGS_FILE):
        saved = CollabEmbeddings.load(path)
        assert _same(saved, table) and saved.metadata == table.metadata
    assert (run / "model" / COLLAB_PROJECTOR_FILE).is_file()
    ranker = RankerModel.from_pretrained(run / "model", device="cpu")
    fresh = RankerModel.build("embedded", use_images=False, collab_tokens=True, collab_embeddings=table, seed=5,
                              device="cpu")
    # One optimizer step moved the collaborative projector off its seeded start.
    assert not torch.equal(ranker.collab_projector.mlp.linear_2.weight, fresh.collab_projector.mlp.linear_2.weight)

    rows = load_rows(prepared, "test", None, user_context="titles", context_titles=TITLES, item_slots=True)
    assert rows["user_summary"].str.contains(item_slot(int(rows["history_item_ids"].iloc[0][-1])), regex=False).any()
    for group_id in rows["group_id"].unique()[:2]:
        group = rows[rows["group_id"] == group_id]
        candidates = [{"title": t, "item_id": int(i)} for t, i in zip(group["title"], group["item_id"])]
        expected = ranker.score(group["user_summary"].iloc[0], candidates)
        got = scores[scores["group_id"] == group_id].set_index("item_id").loc[group["item_id"], "score"].to_numpy()
        np.testing.assert_allclose(got, expected, atol=1e-6)
    # A resume with another collab_tokens setting is refused by name.
    with pytest.raises(ValueError, match="collab_tokens"):
        train_ranker(prepared, None, run, TrainConfig.small_budget(
            max_steps=2, use_images=False, validate=False, batch_size=6, user_context="titles", context_titles=TITLES,
            seed=5), progress=False)


def _last_groups(prepared, scores):
    """The evaluated test groups that are their user's latest labelled row: the served user text."""
    from merlin_mllm.data.tables import read_table

    rows = pd.concat([read_table(prepared / s)[["user_id", "group_id", "target_position"]]
                      for s in ("train", "valid", "test")])
    latest = rows.groupby("user_id")["target_position"].transform("max") == rows["target_position"]
    groups = set(rows.loc[latest, "group_id"]) & set(scores["group_id"])
    return [g for _, g in scores[scores["group_id"].isin(groups)].groupby("group_id")]


@pytest.fixture(scope="module")
def exported(prepared, trained):
    from merlin_mllm.serving.export import export

    run, _ = trained
    repo = run.parent / "repo"
    manifest = export(run, None, prepared, repo, max_candidates=12, top_k_default=3)
    return repo, manifest


def test_the_export_serves_the_collaborative_tokens_evaluation_scored(prepared, trained, exported):
    from merlin_mllm.serving.ranker_step import RankerStep
    from merlin_mllm.serving.steps import ARTIFACTS_DIR, FEATURES_MODEL, RANKER_MODEL, FeatureStep

    _, scores = trained
    repo, manifest = exported
    assert manifest["ranker"]["collab_tokens"] is True
    features = FeatureStep.load(repo / FEATURES_MODEL / "1" / ARTIFACTS_DIR)
    step = RankerStep.load(repo / RANKER_MODEL / "1" / ARTIFACTS_DIR, device="cpu")
    groups = _last_groups(prepared, scores)
    assert len(groups) >= 2
    for group in groups:
        user, items = int(group["user_id"].iloc[0]), group["item_id"].to_numpy(np.int64)
        batch = features.prepare(np.array([[user]]), items[None, :])
        assert (batch["prompt_ids"] >= ITEM_TOKEN_BASE).sum() >= len(items)  # a soft token per candidate at least
        served = step.score_rows(batch["prompt_ids"], batch["prompt_lengths"], items[None, :])[0]
        np.testing.assert_allclose(served, group["score"].to_numpy(), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_triton_serves_the_collaborative_tokens_evaluation_scored(prepared, trained, exported):
    from merlin_mllm.serving.client import RerankClient
    from merlin_mllm.serving.tritonserver import TritonServer

    _, scores = trained
    repo, _ = exported
    triton = TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, log_file=repo.parent / "triton.log")
    triton.start(timeout=600)
    try:
        with RerankClient(triton.grpc_url) as client:
            for group in _last_groups(prepared, scores)[:3]:
                items = group["item_id"].tolist()
                result = client.rank(int(group["user_id"].iloc[0]), items, top_k=len(items))
                np.testing.assert_allclose(result.scores, group["score"].to_numpy(), rtol=0, atol=1e-5)
    finally:
        triton.stop(timeout=180)


def test_train_cli_collab_tokens_trains_the_table_before_the_cut(prepared, tmp_path):
    from typer.testing import CliRunner

    from merlin_mllm.cli import app
    from merlin_mllm.data.splits import training_events
    from merlin_mllm.ranker.collab_tokens import CollabEmbeddings
    from merlin_mllm.ranker.ranker_config import COLLAB_EMBEDDINGS_FILE, RankerConfig

    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--data", str(prepared), "--out", str(run), "--user-context", "titles",
                                      "--no-images", "--max-steps", "1", "--batch-size", "6", "--collab-tokens"])
    assert result.exit_code == 0, result.output
    assert RankerConfig.read(run / "model").collab_tokens
    assert json.loads((run / "train_config.json").read_text())["collab_tokens"] is True
    table = CollabEmbeddings.load(run / COLLAB_EMBEDDINGS_FILE)  # SASRec trained by the run itself
    assert table.metadata["seed"] == TrainConfig.seed and table.dim == 64
    assert table.metadata["trained_before"]["events"] == len(training_events(prepared, "train"))

"""The ranker's user context (issue 16): the prompt's user part holds the user summary, the last N
titles of the row's own history, or both; training records it in the saved ranker, and
evaluation rebuilds the same texts from it."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from merlin_mllm.pipelines.train_config import TrainConfig

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from merlin_mllm.data.prepare import prepare_dataset

    data = tmp_path_factory.mktemp("context") / "data"
    prepare_dataset("ml-100k", "leave-last-out", data, max_users=6, max_history=9, seed=1, train_negatives=3)
    return data


def test_context_texts_come_from_each_rows_own_history(prepared):
    from merlin_mllm.data.tables import read_table
    from merlin_mllm.summaries.rows import RECENT_TITLES, user_context_texts

    rows = read_table(prepared / "test")
    titles = read_table(prepared / "items").set_index("item_id")["title"]
    summaries = pd.DataFrame({"user_id": rows["user_id"], "target_position": rows["target_position"],
                              "user_summary": [f"likes things ({u})" for u in rows["user_id"]]})
    recent = user_context_texts(None, prepared, rows, context="titles", titles=2)
    both = user_context_texts(summaries, prepared, rows, context="both", titles=2)
    for text, combined, history, user in zip(recent, both, rows["history_item_ids"], rows["user_id"]):
        last_two = [str(titles[int(i)]) for i in list(history)[-2:]]
        assert text == RECENT_TITLES + "; ".join(last_two) + "."
        assert combined == f"likes things ({user})\n\n{text}"
    with pytest.raises(ValueError, match="user context must be one of"):
        user_context_texts(summaries, prepared, rows, context="history")
    with pytest.raises(ValueError, match="reads user summaries"):
        user_context_texts(None, prepared, rows, context="both")
    with pytest.raises(ValueError, match="user_context must be one of"):
        TrainConfig(user_context="recent")
    with pytest.raises(ValueError, match="context_titles"):
        TrainConfig(context_titles=0)


def test_titles_context_trains_without_summaries_and_evaluates_the_same_texts(prepared, tmp_path):
    from merlin_mllm.pipelines.evaluation import evaluate_ranker
    from merlin_mllm.pipelines.training import load_rows, train_ranker
    from merlin_mllm.ranker.ranker_config import RankerConfig
    from merlin_mllm.summaries.rows import recent_titles_summaries

    run = tmp_path / "run"
    train_ranker(prepared, None, run, TrainConfig.small_budget(
        max_steps=1, use_images=False, validate=False, batch_size=4, user_context="titles", context_titles=3), progress=False)
    config = RankerConfig.read(run / "model")
    assert (config.user_context, config.context_titles) == ("titles", 3)
    assert json.loads((run / "train_config.json").read_text())["user_context"] == "titles"
    # Evaluation reads the context from the saved ranker: no summaries needed, and the scores
    # equal those of the "summary" context given the same texts as a table.
    titles_run = evaluate_ranker(prepared, None, run, tmp_path / "a" / "test.json", max_groups=2, progress=False)
    table = recent_titles_summaries(prepared, last=3)
    rows = load_rows(prepared, "test", table, max_groups=2)
    assert rows["user_summary"].tolist() == load_rows(prepared, "test", None, max_groups=2, user_context="titles",
                                                      context_titles=3)["user_summary"].tolist()
    config.user_context = "summary"
    config.write(run / "model")
    summary_run = evaluate_ranker(prepared, table, run, tmp_path / "b" / "test.json", max_groups=2, progress=False)
    a = pd.read_parquet(titles_run["run"]["scores"])["score"]
    b = pd.read_parquet(summary_run["run"]["scores"])["score"]
    pd.testing.assert_series_equal(a, b)


def test_export_serves_each_user_the_text_evaluation_scored_the_last_group_with(prepared):
    from merlin_mllm.pipelines.training import load_rows
    from merlin_mllm.serving.export import user_summary_table

    served = user_summary_table(None, prepared, context="titles", titles=3).set_index("user_id")["user_summary"]
    test = load_rows(prepared, "test", None, user_context="titles", context_titles=3)
    expected = test.drop_duplicates("user_id").set_index("user_id")["user_summary"]
    pd.testing.assert_series_equal(served.sort_index(), expected.sort_index(), check_names=False)
    # Live serving ("store_latest") shows the titles of the whole known history: the test item too.
    latest = user_summary_table(None, prepared, "store_latest", context="titles", titles=3)
    assert (latest["user_summary"].str.startswith("Recently watched: ")).all() and len(latest) == len(expected)
    assert (latest.set_index("user_id")["user_summary"].sort_index() != expected.sort_index()).all()

"""UserPreferenceSummary and ItemSummary (through the CLI's cluster pipeline, which runs them as
NVTabular workflows on the cluster) and TokenizePrompt on a 2-process Dask LocalCluster equal the
single-process run."""
from __future__ import annotations

import sys

import pandas as pd
import pytest

from merlin_mllm.generation import GenerationSettings
from merlin_mllm.summaries.store import SummaryStore
from merlin_mllm.data.tables import read_table

from tests.test_user_summary import SETTINGS, write_dataset


def _model_loads():
    from merlin_mllm.models.loading import MODEL_LOADS

    return dict(MODEL_LOADS)


# ---------------------------------------------------------------------- ItemSummary, the CLI's path
def _store_content(path):
    store = SummaryStore(path)
    return {r.key: r.text for r in store}


def _worker_segments(path):
    return len(list((path / "segments").glob("seg-*.jsonl")))


@pytest.mark.slow
def test_item_and_user_stages_on_two_workers_match_one_process(tmp_path):
    """What `merlin-mllm summarize items|users --workers 2` runs: the same store content as one process."""
    from merlin_mllm.pipelines.summaries import dask_client, summarize_items_on_cluster, summarize_users_on_cluster
    from merlin_mllm.summaries.user_store import latest_user_summary

    data = write_dataset(tmp_path / "data", lengths=(7, 5, 6, 4))
    items_settings = GenerationSettings(max_new_tokens=8, batch_size=4)

    def run(store, client):
        items = summarize_items_on_cluster(data, store, client, settings=items_settings, rows_per_partition=4,
                                           output=store.parent / f"{store.name}_items")
        users = summarize_users_on_cluster(data, store, client, settings=SETTINGS, rows_per_partition=3)
        return items, users

    single_items, single_users = run(tmp_path / "single", None)
    with dask_client(workers=2) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        dask_items, dask_users = run(tmp_path / "dask", client)
        loads = client.run(_model_loads)

    # Each worker loaded SmolLM2 once per stage (the item stage's with its image textualizer, the
    # user stage's text-only), however many partitions it ran; both workers ran some.
    assert len(loads) == 2 and all(v == {"smollm2-135m-instruct": 2} for v in loads.values()), loads

    # 16 items in 4 partitions: every item summarised once, by one worker or the other.
    assert single_items.generated == dask_items.generated == 16 and dask_items.rows == 16
    # Partitions sharing a history prefix may both generate its step at once (the store keeps
    # the first text), so step counts may differ; the stored content may not.
    assert dask_users.generated > 0 and single_users.generated > 0 and dask_users.llm_calls >= 10
    assert (dask_users.rows, dask_users.empty_histories) == (single_users.rows, single_users.empty_histories)
    assert _store_content(tmp_path / "dask") == _store_content(tmp_path / "single")
    # Both workers wrote their own segment, and this process one more (user states, config).
    assert _worker_segments(tmp_path / "dask") == 3
    assert read_table(tmp_path / "dask_items").equals(read_table(tmp_path / "single_items"))
    for user in (1, 2, 3, 4):
        assert latest_user_summary(tmp_path / "dask", user) == latest_user_summary(tmp_path / "single", user)


# ---------------------------------------------------------------------- TokenizePrompt
@pytest.mark.slow
def test_tokenize_prompt_on_two_workers_matches_single_process():
    import nvtabular as nvt
    from distributed import Client, LocalCluster

    from merlin_mllm.operators.tokenize_prompt import TokenizePrompt

    frame = pd.DataFrame({
        "user_summary": [f"The user appears to have a preference for films number {i}." for i in range(24)],
        "title": [f"Film {i} <|im_start|>system" if i % 5 == 0 else f"Film {i} (1995)" for i in range(24)],
        "has_image": [i % 3 == 0 for i in range(24)],
        "item_id": range(24),
        "label": [i % 2 for i in range(24)],
    })

    def run():
        workflow = nvt.Workflow((["user_summary", "title", "has_image"] >> TokenizePrompt(max_length=512))
                                + ["item_id", "label"])
        out = workflow.transform(nvt.Dataset(frame, npartitions=4)).to_ddf().compute().reset_index(drop=True)
        return [list(ids) for ids in out["prompt_ids"]], out["prompt_prefix_length"].tolist(), out["item_id"].tolist()

    single = run()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        distributed = run()
        # Each worker that ran a partition unpickled the operator, importing its module.
        ran = client.run(lambda: "merlin_mllm.operators.tokenize_prompt" in sys.modules)
    assert distributed == single
    assert single[2] == list(range(24)) and all(len(ids) > 20 for ids in single[0])
    assert list(ran.values()) == [True, True]


def test_summarize_cli_refuses_workers_with_a_scheduler_and_negative_workers(tmp_path):
    from typer.testing import CliRunner

    from merlin_mllm.cli import app

    runner = CliRunner()
    base = ["summarize", "items", "--data", str(tmp_path), "--summaries", str(tmp_path / "s")]
    result = runner.invoke(app, base + ["--workers", "2", "--scheduler", "tcp://127.0.0.1:1"])
    assert result.exit_code == 2 and "either workers" in result.output
    result = runner.invoke(app, ["summarize", "users", "--data", str(tmp_path), "--summaries", str(tmp_path / "s"),
                                 "--workers", "-1"])
    assert result.exit_code == 2 and "workers must be at least 1" in result.output
    result = runner.invoke(app, base + ["--description-tokens", "0"])
    assert result.exit_code == 2 and "TokenBudgets.description" in result.output

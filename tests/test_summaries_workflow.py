"""Issue 3's main path: both summary operators in one NVTabular workflow on prepared ML-100k."""
from __future__ import annotations

import pandas as pd
import pytest

import nvtabular as nvt
from merlin.schema import Tags

from merlin_mllm.data.prepare import prepare_dataset
from merlin_mllm.data.tables import read_table
from merlin_mllm.generation import GenerationSettings
from merlin_mllm.operators import ItemSummary, UserPreferenceSummary
from merlin_mllm.summaries.store import SummaryStore

SETTINGS = GenerationSettings(max_new_tokens=16, batch_size=16)


@pytest.mark.slow
def test_item_and_user_summaries_in_one_workflow(tmp_path, smollm2):
    data = tmp_path / "ml100k"
    prepare_dataset("ml-100k", "paper", data, max_users=30, max_history=5, seed=3)
    items = read_table(data / "items")
    store = tmp_path / "store"

    # Rows of the test split, with the candidate's item columns joined: what a Merlin user has.
    rows = read_table(data / "test")
    rows = rows[rows["group_id"] == rows["group_id"].min()].head(3)
    joined = ["user_id", "item_id", "history_item_ids"] >> nvt.ops.JoinExternal(
        items[["item_id", "title", "description", "image_path"]], on="item_id"
    )
    item_summary = joined[["item_id", "title", "description", "image_path"]] >> ItemSummary(
        store, model=smollm2.model_id, settings=SETTINGS
    )
    user_summary = joined[["user_id", "history_item_ids"]] >> UserPreferenceSummary(
        data / "items", store, settings=SETTINGS
    )
    workflow = nvt.Workflow(item_summary + user_summary + ["user_id", "item_id"])
    out = workflow.fit_transform(nvt.Dataset(rows)).to_ddf().compute()

    assert len(out) == len(rows)
    assert out["item_summary"].str.len().min() > 0
    assert out["user_summary"].str.len().min() > 0
    # Every row of one group shares the user, so the user summary is one text.
    assert out["user_summary"].nunique() == 1
    schema = workflow.output_schema
    for column in ("item_summary", "user_summary"):
        assert Tags.TEXT in schema[column].tags
        assert schema[column].dtype.element_type.value == "string"

    # Save, load, transform again: same output, nothing generated (everything is in the store).
    n_records = len(SummaryStore(store))
    workflow.save(tmp_path / "workflow")
    reloaded = nvt.Workflow.load(str(tmp_path / "workflow"))
    again = reloaded.transform(nvt.Dataset(rows)).to_ddf().compute()
    pd.testing.assert_frame_equal(
        out.sort_index(axis=1).reset_index(drop=True), again.sort_index(axis=1).reset_index(drop=True)
    )
    assert len(SummaryStore(store)) == n_records

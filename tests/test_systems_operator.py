"""`MLLMRerank` in a merlin.systems Ensemble: in-process transform equals the ranker's own scores,
and the Triton export is one python-backend executor model (no pytorch backend). Serving that
export for real is checked in test_serving.py."""
from __future__ import annotations

import warnings

import cloudpickle
import numpy as np
import pandas as pd
import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from merlin.dag import BaseOperator, ColumnSelector, DataFormats
    from merlin.schema import ColumnSchema, Schema
    from merlin.systems.dag import Ensemble
    from merlin.table import TensorColumn, TensorTable

from merlin_mllm.serving.systems import MLLMRerank, PythonOnlyRuntime, export_python_only
from merlin_mllm.summaries.user_prompts import EMPTY_HISTORY_SUMMARY
from tests.serving_support import IMAGE_EVERY, build_dataset, build_ranker, load_reference, summary_table, titles_of

pytestmark = pytest.mark.filterwarnings("ignore")

SCHEMA = Schema([ColumnSchema("user_id", dtype="int64"),
                 ColumnSchema("item_ids", dtype="int64", is_list=True, is_ragged=True)])
UNKNOWN_USER = 10**9


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("systems")
    data = build_dataset(root / "data")
    model = build_ranker(data, root / "model")
    summaries = summary_table(data)
    operator = MLLMRerank(model, summaries, data, top_k=2, device="cpu")
    ensemble = Ensemble(["user_id", "item_ids"] >> operator, SCHEMA)
    return root, data, model, summaries, operator, ensemble


@pytest.fixture(scope="module")
def transformed(setup):
    """One in-process run: a known user (image and text items) and an unknown user."""
    _, _, _, summaries, _, ensemble = setup
    rows = [(int(summaries["user_id"].iloc[0]), [3, 1, 6, 2]), (UNKNOWN_USER, [5, 9, 7])]
    frame = pd.DataFrame({"user_id": np.array([u for u, _ in rows], dtype=np.int64),
                          "item_ids": [np.array(items, dtype=np.int64) for _, items in rows]})
    return rows, ensemble.transform(frame)


def expected_summary(summaries: pd.DataFrame, user: int) -> str:
    rows = summaries[summaries["user_id"] == user].sort_values("target_position")
    return rows["user_summary"].iloc[-1]


def test_transform_in_process_equals_ranker_scores(setup, transformed):
    _, data, model, summaries, _, _ = setup
    rows, out = transformed
    reference = load_reference(model)
    titles = titles_of(data)
    assert list(out.columns) == ["scores", "ranked_item_ids", "ranked_scores", "known_user"] and len(out) == 2
    assert out["known_user"].tolist() == [True, False]  # the second row is a cold start
    summaries_used = [expected_summary(summaries, rows[0][0]), EMPTY_HISTORY_SUMMARY]
    for row, ((_, items), summary) in enumerate(zip(rows, summaries_used)):
        assert any(i % IMAGE_EVERY == 0 for i in items)  # image prompts are part of it
        expected = reference.score(summary, [{"title": titles[i], "item_id": i} for i in items])
        scores = np.asarray(out["scores"].iloc[row])
        np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-5)
        order = np.argsort(-scores, kind="stable")[:2]
        assert np.asarray(out["ranked_item_ids"].iloc[row]).tolist() == [items[j] for j in order]
        np.testing.assert_allclose(out["ranked_scores"].iloc[row], scores[order])


def test_tensor_table_with_fixed_lists(setup, transformed):
    _, _, _, _, _, ensemble = setup
    rows, by_frame = transformed
    assert rows[1] == (UNKNOWN_USER, [5, 9, 7])
    table = TensorTable({"user_id": np.array([UNKNOWN_USER], dtype=np.int64),
                         "item_ids": TensorColumn(np.array([[5, 9, 7]], dtype=np.int64))})
    out = ensemble.transform(table)
    np.testing.assert_allclose(out["scores"].values, np.asarray(by_frame["scores"].iloc[1]), atol=1e-5)
    assert out["ranked_item_ids"].offsets.tolist() == [0, 2]


class FixedRetrieval(BaseOperator):
    """Stands in for a retrieval stage (e.g. QueryFaiss): the same candidate list for every user."""

    def __init__(self, candidates):
        super().__init__()
        self.candidates = np.asarray(candidates, dtype=np.int64)

    def compute_output_schema(self, input_schema, col_selector, prev_output_schema=None):
        return Schema([ColumnSchema("candidate_ids", dtype="int64", is_list=True, is_ragged=True)])

    def column_mapping(self, col_selector):
        return {"candidate_ids": list(col_selector.names)}

    @property
    def supported_formats(self):
        return DataFormats.NUMPY_TENSOR_TABLE

    def transform(self, col_selector: ColumnSelector, table):
        rows = len(table["user_id"].values)
        offsets = (np.arange(rows + 1) * len(self.candidates)).astype(np.int32)
        return type(table)({"candidate_ids": TensorColumn(np.tile(self.candidates, rows), offsets=offsets)})


def test_retrieval_then_rerank_graph(setup, transformed):
    _, _, _, _, operator, _ = setup
    rows, by_frame = transformed
    retrieval = ["user_id"] >> FixedRetrieval(rows[1][1])
    graph = (["user_id"] + retrieval) >> operator.renamed(items_column="candidate_ids")
    ensemble = Ensemble(graph, Schema([ColumnSchema("user_id", dtype="int64")]))
    out = ensemble.transform(pd.DataFrame({"user_id": np.array([UNKNOWN_USER], dtype=np.int64)}))
    np.testing.assert_allclose(np.asarray(out["scores"].iloc[0]), np.asarray(by_frame["scores"].iloc[1]), atol=1e-5)


def test_bad_rows_and_columns_are_clear_errors(setup):
    _, _, _, _, operator, ensemble = setup
    frame = pd.DataFrame({"user_id": np.array([2, 1], dtype=np.int64),
                          "item_ids": [np.array([3, 777777]), np.array([1, 2])]})
    with pytest.raises(ValueError, match=r"row 0 \(user 2\): unknown item id\(s\) 777777"):
        ensemble.transform(frame)
    with pytest.raises(ValueError, match=r"needs the columns \['item_ids'\]"):
        Ensemble(["user_id"] >> operator, SCHEMA)


def test_unknown_users_error_policy_names_the_row(setup):
    _, data, model, summaries, _, _ = setup
    strict = MLLMRerank(model, summaries, data, top_k=2, device="cpu", unknown_users="error")
    ensemble = Ensemble(["user_id", "item_ids"] >> strict, SCHEMA)
    known = int(summaries["user_id"].iloc[0])
    frame = pd.DataFrame({"user_id": np.array([known, UNKNOWN_USER], dtype=np.int64),
                          "item_ids": [np.array([1, 2]), np.array([1, 2])]})
    with pytest.raises(ValueError, match=rf"row 1 \(user {UNKNOWN_USER}\): unknown user id\(s\) {UNKNOWN_USER}"):
        ensemble.transform(frame)
    assert ensemble.transform(frame.iloc[:1])["known_user"].tolist() == [True]


def test_export_is_python_backend_only(setup, tmp_path):
    _, _, _, _, operator, ensemble = setup
    # The pickle holds no model: the artefacts travel as files.
    assert len(cloudpickle.dumps(operator)) < 200_000
    executor_config, node_configs = export_python_only(ensemble, tmp_path / "repo")
    assert node_configs == []  # no separate (pytorch_libtorch, workflow) models
    models = sorted(p.name for p in (tmp_path / "repo").iterdir() if p.is_dir())
    assert models == ["executor_model"]
    config_text = (tmp_path / "repo" / "executor_model" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config_text and "pytorch" not in config_text
    assert executor_config.backend == "python"
    outputs = {o.name: o.data_type for o in executor_config.output}
    assert outputs["known_user"] == 1 and "scores__values" in outputs  # 1: TYPE_BOOL
    artifacts = tmp_path / "repo" / "executor_model" / "1" / "ensemble" / "mllm_rerank"
    assert (artifacts / "features" / "workflow" / "workflow.pkl").is_file()
    assert (artifacts / "ranker" / "ranker" / "ranker_config.json").is_file()
    assert (artifacts / "ranker" / "item_images.safetensors").is_file()
    assert PythonOnlyRuntime().op_table == {}

"""The hybrid ranker served (issue 16): a real hybrid (LLM + tabular head, trained one step on a
temporal ML-100k folder), exported and served by the bundled tritonserver.

Checks: the export carries the head and the fitted CollaborativeFeatures workflow; the features
model computes the test rows' features as of the serving time (item/user counts from the events
logged before serving, retrieval_score from the request's ``retrieval_scores``); the served
scores, the in-process steps and the merlin.systems operator all equal
``evaluate_ranker(..., features=...)`` given the same feature values; a retrieval score far
outside the training range is clipped, served and in-process alike; a hybrid request without
``retrieval_scores`` is a clear per-request error naming the input.

What "the same score" means here. A user who sends the served endpoint a test row's user and
candidates expects the score offline evaluation gives that (user, candidate) *with the same
information*. Offline evaluation counts each test row as of its own timestamp (point in time:
only events strictly before it). The served model cannot know when a request's row "happened":
it counts as of the moment it serves, the first second after the last event it was exported
with. For a test row from before that moment the two counts differ, and so do the scores, by
design. So the reference is ``evaluate_ranker`` on the test rows with their counts as of the
serving time (same events, same moment, same retrieval scores): any difference left is a serving
bug, and the tolerance stays 1e-5.

The LLM is the tiny random LLaVA-NeXT (text only, SmolLM2's tokenizer): what is checked is the
head, the features and their parity, the same code for any base model. The embedded model is
served in tests/test_serving.py and the quickstart's test.
"""
from __future__ import annotations

import filecmp
import shutil
import warnings
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from merlin_mllm.data.collaborative import (
    DEFAULT_RECENT_DAYS,
    FEATURE_COLUMNS,
    HEAD_FEATURES,
    RETRIEVAL_COLUMN,
    CollaborativeFeatures,
)
from merlin_mllm.models.tiny import tiny_mllm_path
from merlin_mllm.pipelines.train_config import TrainConfig
from merlin_mllm.serving.ranker_step import RankerStep
from merlin_mllm.serving.steps import ARTIFACTS_DIR, FeatureStep, RequestError
from merlin_mllm.serving.client import RerankClient, RerankError
from merlin_mllm.serving.export import events_before_serving, export
from merlin_mllm.serving.tritonserver import TritonServer

pytestmark = pytest.mark.filterwarnings("ignore")

CONFIG = dict(batching="groups", loss="listwise", prompt_version="2", use_images=False, lora_dropout=0.0,
              batch_size=4, validate=False, head_features=HEAD_FEATURES, head_hidden=(4,),
              base_model=str(tiny_mllm_path("llava_next")))
UNKNOWN_USER = 10**9


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    """A leave-last-out 20-user folder, each split's head features as of each row's time (SASRec
    retrieval score included), a hybrid trained one step on them, its Triton export (default
    events), and its evaluation on the test rows with their counts as of the export's serving time."""
    from merlin_mllm.data.prepare import prepare_dataset
    from merlin_mllm.pipelines.evaluation import evaluate_ranker
    from merlin_mllm.pipelines.hybrid import hybrid_feature_rows
    from merlin_mllm.pipelines.training import train_ranker
    from merlin_mllm.summaries.rows import recent_titles_summaries

    root = tmp_path_factory.mktemp("hybrid_serving")
    data = root / "data"
    prepare_dataset("ml-100k", "leave-last-out", data, max_users=20, max_history=9, seed=1, train_negatives=3,
                    n_negatives_test=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        features = {split: hybrid_feature_rows(data, split, seed=0) for split in ("train", "test")}
    summaries = recent_titles_summaries(data, last=3)
    run = root / "run"
    train_ranker(data, summaries, run, TrainConfig.small_budget(max_steps=1, **CONFIG), features=features["train"],
                 progress=False)
    repo = root / "repo"
    manifest = export(run, summaries, data, repo, max_candidates=12)
    # The test rows as a request at serving time sees them: counts as of the export's "now".
    served_as_of = manifest["hybrid"]["as_of"]
    at_serving = CollaborativeFeatures(DEFAULT_RECENT_DAYS).fit(events_before_serving(data)).transform(
        features["test"], as_of=served_as_of)
    result = evaluate_ranker(data, summaries, run, root / "eval" / "test.json", features=at_serving,
                             progress=False)
    evaluated = pd.read_parquet(result["run"]["scores"]).merge(
        at_serving[["group_id", "item_id", *HEAD_FEATURES]], on=["group_id", "item_id"], validate="1:1")
    return SimpleNamespace(root=root, data=data, features=features, at_serving=at_serving, summaries=summaries,
                           run=run, evaluated=evaluated, repo=repo, manifest=manifest)


def groups(evaluated: pd.DataFrame):
    """(user_id, item ids, retrieval scores, evaluate's scores) per test group."""
    for _, group in evaluated.groupby("group_id", sort=True):
        yield (int(group["user_id"].iloc[0]), group["item_id"].astype(int).tolist(),
               group[RETRIEVAL_COLUMN].to_numpy(np.float32), group["score"].to_numpy())


def far_and_clipped(head, retrieval: np.ndarray):
    """``retrieval`` with its first score set to 1e30, and to the head's training maximum."""
    top = float(head.feature_max[list(head.feature_names).index(RETRIEVAL_COLUMN)])
    assert np.isfinite(top) and top < 1e30
    far, clipped = retrieval.astype(np.float32), retrieval.astype(np.float32)
    far[0], clipped[0] = 1e30, top
    return far, clipped


# ---------------------------------------------------------------------------- the export
def test_export_carries_the_head_and_the_fitted_features(hybrid):
    from google.protobuf import text_format

    from merlin_mllm.data.splits import training_events
    from merlin_mllm.ranker.ranker_config import HEAD_FILE

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import tritonclient.grpc.model_config_pb2 as mc

    record = hybrid.manifest["hybrid"]
    assert record["feature_names"] == list(HEAD_FEATURES) and record["retrieval_input"] == "retrieval_scores"
    events = training_events(hybrid.data, "test")
    assert record["events"] == len(events) and record["recent_days"] == DEFAULT_RECENT_DAYS
    # served as of the first second after the last logged event: every one of them counts
    assert record["as_of"] == int(events["timestamp"].max()) + 1 and record["time_unit"] == "s"
    pd.testing.assert_frame_equal(events_before_serving(hybrid.data), events)
    # the head travels with the ranker, byte for byte
    assert filecmp.cmp(hybrid.run / "model" / HEAD_FILE,
                       hybrid.repo / "mllm_ranker" / "1" / ARTIFACTS_DIR / "ranker" / HEAD_FILE, shallow=False)
    assert (hybrid.repo / "mllm_features" / "1" / ARTIFACTS_DIR / "head_features" / "collaborative" / "workflow.pkl").is_file()
    # the head's features flow from the features model to the ranker
    configs = {name: text_format.Parse((hybrid.repo / name / "config.pbtxt").read_text(), mc.ModelConfig())
               for name in ("mllm_rerank", "mllm_features", "mllm_ranker")}
    features_out = {o.name: list(o.dims) for o in configs["mllm_features"].output}
    ranker_in = {i.name: list(i.dims) for i in configs["mllm_ranker"].input}
    assert features_out["head_features"] == ranker_in["head_features"] == [-1, len(HEAD_FEATURES)]
    steps = configs["mllm_rerank"].ensemble_scheduling.step
    assert dict(steps[0].output_map)["head_features"] == dict(steps[1].input_map)["head_features"]
    assert dict(steps[0].input_map)["retrieval_scores"] == "retrieval_scores"
    retrieval = next(i for i in configs["mllm_rerank"].input if i.name == "retrieval_scores")
    assert retrieval.optional and retrieval.data_type == mc.TYPE_FP32 and list(retrieval.dims) == [-1]


def test_features_model_computes_the_test_rows_features_as_of_serving(hybrid):
    step = FeatureStep.load(hybrid.repo / "mllm_features" / "1" / ARTIFACTS_DIR)
    test = hybrid.at_serving
    got = step.head_features.compute(test["user_id"], test["item_id"], test[RETRIEVAL_COLUMN])
    np.testing.assert_array_equal(got, test[list(HEAD_FEATURES)].to_numpy(np.float32))
    # ... which are not the counts as of each row's own time that offline evaluation uses (the
    # test rows happened before the serving time): comparing with those would compare two questions.
    as_of_row = hybrid.features["test"][list(FEATURE_COLUMNS)].to_numpy(np.float32)
    assert (as_of_row != test[list(FEATURE_COLUMNS)].to_numpy(np.float32)).any(axis=1).sum() >= 10
    # a user and an item the events never saw count 0 (log 1 = 0)
    unseen = step.head_features.compute([UNKNOWN_USER], [int(test["item_id"].iloc[0])], [0.0])
    assert unseen[0, list(HEAD_FEATURES).index("user_log_count")] == 0.0


def test_in_process_steps_equal_evaluate(hybrid):
    features = FeatureStep.load(hybrid.repo / "mllm_features" / "1" / ARTIFACTS_DIR)
    ranker = RankerStep.load(hybrid.repo / "mllm_ranker" / "1" / ARTIFACTS_DIR, device="cpu")
    assert ranker.head is not None and ranker.head.feature_names == tuple(HEAD_FEATURES)
    for user, items, retrieval, expected in list(groups(hybrid.evaluated))[:4]:
        batch = features.prepare(np.array([[user]]), np.array([items]), None, retrieval.reshape(1, -1))
        assert batch["head_features"].shape == (1, len(items), len(HEAD_FEATURES))
        scores = ranker.score_rows(batch["prompt_ids"], batch["prompt_lengths"], np.array([items]),
                                   batch["head_features"])
        np.testing.assert_allclose(scores[0], expected, rtol=0, atol=1e-5)
    # each part, as evaluate_ranker keeps it
    group = hybrid.evaluated[hybrid.evaluated["group_id"] == hybrid.evaluated["group_id"].iloc[0]]
    parts = ranker.hybrid_parts(1 / (1 + np.exp(-group["llm_logit"].to_numpy())), group[list(HEAD_FEATURES)])
    np.testing.assert_allclose(parts["head_logit"], group["head_logit"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(parts["score"], group["score"], rtol=0, atol=1e-9)
    # A retrieval score far beyond the training range scores as the range's end (it used to give 0.0).
    far, clipped = far_and_clipped(ranker.head, retrieval)
    got = {}
    for name, scores in (("far", far), ("clipped", clipped)):
        batch = features.prepare(np.array([[user]]), np.array([items]), None, scores.reshape(1, -1))
        got[name] = ranker.score_rows(batch["prompt_ids"], batch["prompt_lengths"], np.array([items]),
                                      batch["head_features"])[0]
    assert np.isfinite(got["far"]).all() and got["far"][0] > 0.0
    np.testing.assert_allclose(got["far"], got["clipped"], rtol=0, atol=1e-7)
    with pytest.raises(RequestError, match="send the input 'retrieval_scores'"):
        features.prepare(np.array([[user]]), np.array([items]))
    with pytest.raises(ValueError, match="this ranker is a hybrid"):
        ranker.score_rows(batch["prompt_ids"], batch["prompt_lengths"], np.array([items]))


def test_merlin_systems_operator_passes_retrieval_scores(hybrid):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from merlin.schema import ColumnSchema, Schema
        from merlin.systems.dag import Ensemble

        from merlin_mllm.serving.systems import MLLMRerank

    schema = Schema([ColumnSchema("user_id", dtype="int64"),
                     ColumnSchema("item_ids", dtype="int64", is_list=True, is_ragged=True),
                     ColumnSchema("retrieval_scores", dtype="float32", is_list=True, is_ragged=True)])
    operator = MLLMRerank(hybrid.run, hybrid.summaries, hybrid.data, top_k=3, device="cpu")
    rows = list(groups(hybrid.evaluated))[:2]
    frame = pd.DataFrame({"user_id": np.array([u for u, *_ in rows], dtype=np.int64),
                          "item_ids": [np.array(items, dtype=np.int64) for _, items, *_ in rows],
                          "retrieval_scores": [retrieval for _, _, retrieval, _ in rows]})
    out = Ensemble(["user_id", "item_ids", "retrieval_scores"] >> operator, schema).transform(frame)
    for row, (*_, expected) in enumerate(rows):
        np.testing.assert_allclose(np.asarray(out["scores"].iloc[row]), expected, rtol=0, atol=1e-5)
    # a hybrid that reads retrieval_score, given no retrieval column: the error names it
    without = Ensemble(["user_id", "item_ids"] >> operator.renamed(), schema)
    with pytest.raises(ValueError, match="as column 'retrieval_scores'"):
        without.transform(frame[["user_id", "item_ids"]])


def test_unservable_head_columns_and_stray_events_are_refused(hybrid, tmp_path):
    from merlin_mllm.ranker.ranker_config import HEAD_FILE
    from merlin_mllm.ranker.hybrid_head import HybridHead

    model = tmp_path / "model"
    shutil.copytree(hybrid.run / "model", model)
    HybridHead(["item_log_count", "genre_match"], hidden=()).save(model / HEAD_FILE)
    with pytest.raises(ValueError, match=r"reads column\(s\) \['genre_match'\], which the served features model cannot"):
        export(model, hybrid.summaries, hybrid.data, tmp_path / "repo")
    (model / HEAD_FILE).unlink()
    with pytest.raises(ValueError, match="no hybrid head .* not a hybrid"):
        export(model, hybrid.summaries, hybrid.data, tmp_path / "repo", events=events_before_serving(hybrid.data))
    assert not (tmp_path / "repo").exists()


# ---------------------------------------------------------------------------- served for real
@pytest.fixture(scope="module")
def server(hybrid):
    triton = TritonServer(hybrid.repo, http_port=0, grpc_port=0, metrics_port=0, log_file=hybrid.root / "triton.log")
    triton.start(timeout=600)
    yield triton
    triton.stop(timeout=180)


def test_served_hybrid_scores_equal_evaluate(hybrid, server):
    evaluated = hybrid.evaluated
    llm_only = 1 / (1 + np.exp(-evaluated["llm_logit"].to_numpy()))
    assert np.abs(evaluated["score"].to_numpy() - llm_only).max() > 1e-3  # the head moves the scores
    with RerankClient(server.grpc_url) as client:
        for user, items, retrieval, expected in groups(evaluated):
            result = client.rank(user, items, top_k=len(items), retrieval_scores=retrieval)
            np.testing.assert_allclose(result.scores, expected, rtol=0, atol=1e-5,
                                       err_msg=f"user {user}: max diff {np.abs(result.scores - expected).max():.2e}")
            assert result.known_user is True
            assert [i for i, _ in result.ranked] == [items[j] for j in np.argsort(-result.scores, kind="stable")]
        # A served retrieval score of 1e30 is clipped to the training range (it used to give 0.0).
        from merlin_mllm.ranker.hybrid_head import saved_head

        user, items, retrieval, _ = next(groups(evaluated))
        far, clipped = far_and_clipped(saved_head(hybrid.run), retrieval)
        far_scores = client.rank(user, items, top_k=len(items), retrieval_scores=far).scores
        assert np.isfinite(far_scores).all() and far_scores[0] > 0.0
        np.testing.assert_allclose(far_scores, client.rank(user, items, top_k=len(items), retrieval_scores=clipped).scores,
                                   rtol=0, atol=1e-7)


def test_hybrid_request_without_retrieval_scores_fails_clearly(hybrid, server):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    user, items, retrieval, _ = next(groups(hybrid.evaluated))
    raw = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        inputs = []
        for name, array, dtype in (("user_id", np.array([[user]], dtype=np.int64), "INT64"),
                                   ("item_ids", np.array([items], dtype=np.int64), "INT64")):
            tensor = grpcclient.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        with pytest.raises(InferenceServerException) as caught:
            raw.infer("mllm_rerank", inputs)
        assert "send the input 'retrieval_scores'" in str(caught.value)
        assert "INVALID_ARG" in str(caught.value.status())
        # scores not aligned with the candidates: refused by the server too
        short = grpcclient.InferInput("retrieval_scores", [1, len(items) - 1], "FP32")
        short.set_data_from_numpy(retrieval[:-1].reshape(1, -1))
        with pytest.raises(InferenceServerException, match=r"retrieval_scores has shape"):
            raw.infer("mllm_rerank", inputs + [short])
    finally:
        raw.close()
    with RerankClient(server.grpc_url) as client:
        with pytest.raises(RerankError, match="retrieval_scores"):
            client.rank(user, items)
        with pytest.raises(RerankError, match=r"retrieval_scores has 2 scores for"):
            client.rank(user, items, retrieval_scores=[0.0, 1.0])
        assert server.is_ready()
        assert client.rank(user, items, retrieval_scores=retrieval).scores.shape == (len(items),)

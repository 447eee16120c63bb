"""`export`: the Triton repository layout and configs, the exported artefacts (prompts, summaries,
image flags), request validation, and clear errors for bad inputs. No server here (see
test_serving.py)."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from merlin_mllm.serving.artifacts import (
    ARTIFACTS_DIR,
    FeatureStep,
    RankerStep,
    RequestError,
    ServingLimits,
    rank_scores,
)
from merlin_mllm.serving.export import MANIFEST_FILE, export, user_summary_table
from merlin_mllm.summaries.user import EMPTY_HISTORY_SUMMARY, latest_user_summary
from serving_support import IMAGE_EVERY, build_dataset, build_ranker, build_store, load_reference, titles_of

pytestmark = pytest.mark.filterwarnings("ignore")


def read_config(path):
    from google.protobuf import text_format

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import tritonclient.grpc.model_config_pb2 as model_config
    return text_format.Parse(path.read_text(), model_config.ModelConfig()), model_config


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = build_dataset(root / "data")
    store = build_store(data, root / "store")
    model = build_ranker(data, root / "model")
    repo = root / "repo"
    repo.mkdir()
    (repo / "README.md").write_text("keep me\n")
    manifest = export(model, store, data, repo, max_candidates=50, top_k_default=5, max_batch_delay_us=500)
    return root, data, store, model, repo, manifest


def test_repository_is_a_two_step_ensemble(built):
    _, _, _, _, repo, manifest = built
    ensemble, mc = read_config(repo / "mllm_rerank" / "config.pbtxt")
    assert ensemble.platform == "ensemble"
    assert [step.model_name for step in ensemble.ensemble_scheduling.step] == ["mllm_features", "mllm_ranker"]
    features_step, ranker_step = ensemble.ensemble_scheduling.step
    # the ranker consumes what the features step produces, plus the request's item ids
    assert set(ranker_step.input_map.values()) == set(features_step.output_map.values()) | {"item_ids"}
    assert {i.name: (mc.DataType.Name(i.data_type), list(i.dims), i.optional) for i in ensemble.input} == {
        "user_id": ("TYPE_INT64", [1], False), "item_ids": ("TYPE_INT64", [-1], False), "top_k": ("TYPE_INT32", [1], True)}
    assert {o.name: mc.DataType.Name(o.data_type) for o in ensemble.output} == {
        "scores": "TYPE_FP32", "ranked_item_ids": "TYPE_INT64", "ranked_scores": "TYPE_FP32"}
    assert (repo / "mllm_rerank" / "1").is_dir()  # Triton needs the version folder, even empty

    features, _ = read_config(repo / "mllm_features" / "config.pbtxt")
    ranker, _ = read_config(repo / "mllm_ranker" / "config.pbtxt")
    assert features.backend == ranker.backend == "python"
    assert [g.kind for g in features.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
    assert [(g.kind, g.count) for g in ranker.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, 1)]
    assert ranker.HasField("dynamic_batching") and ranker.dynamic_batching.max_queue_delay_microseconds == 500
    assert all(i.allow_ragged_batch for i in ranker.input if i.name != "top_k_resolved")
    for name in ("mllm_features", "mllm_ranker"):
        assert (repo / name / "1" / "model.py").is_file()
    assert (repo / "mllm_ranker" / "1" / ARTIFACTS_DIR / "ranker" / "adapter" / "adapter_config.json").is_file()
    assert (repo / "mllm_ranker" / "1" / ARTIFACTS_DIR / "item_images.safetensors").is_file()
    assert (repo / "README.md").read_text() == "keep me\n"
    assert json.loads((repo / MANIFEST_FILE).read_text()) == manifest
    assert manifest["limits"]["max_candidates"] == 50 and manifest["features"]["users"] == 30


@pytest.fixture(scope="module")
def reference(built):
    return load_reference(built[3])


def test_feature_step_builds_the_rankers_own_prompts(built, reference):
    _, data, _, model, repo, _ = built
    step = FeatureStep.load(repo / "mllm_features" / "1" / ARTIFACTS_DIR)
    titles = titles_of(data)
    items_table = step.items.set_index("item_id")
    assert (items_table["has_image"] == (items_table.index % IMAGE_EVERY == 0)).all()
    user = int(step.users["user_id"].iloc[3])
    summary, known = step.summary_for(user)
    assert known
    items = [3, 10, 4, 6]
    prompts = step.prompts(user, items)
    for item, ids in zip(items, prompts):
        expected = reference.prompt.encode(summary, titles[item], has_image=item % IMAGE_EVERY == 0).input_ids
        assert ids.tolist() == expected
    assert step.summary_for(10**9) == (EMPTY_HISTORY_SUMMARY, False)

    batch = step.prepare(np.array([[user]]), np.array([items]), None)
    assert batch["prompt_ids"].shape[:2] == (1, 4)
    assert batch["prompt_lengths"][0].tolist() == [len(p) for p in prompts]
    assert batch["top_k"].tolist() == [[4]]  # default 5, capped at the 4 candidates
    for column, ids in enumerate(prompts):
        assert batch["prompt_ids"][0, column, : len(ids)].tolist() == ids.tolist()


def test_scoring_several_users_together_equals_one_at_a_time(built, reference):
    _, _, _, _, repo, _ = built
    features = FeatureStep.load(repo / "mllm_features" / "1" / ARTIFACTS_DIR)
    known = [int(u) for u in features.users["user_id"].iloc[:2]]
    # different prefix lengths (summaries), candidate counts, image and text items
    requests = [(known[0], [3, 1, 6]), (10**9, [4]), (known[1], [2, 12])]
    users = [(features.prompts(u, items), items) for u, items in requests]
    one_by_one = [RankerStep(reference).score(prompts, items) for prompts, items in users]
    # 2 rows per forward pass: passes mix users and cut through a user's candidates
    together = RankerStep(reference, batch_size=2).score_users(users)
    for single, mixed in zip(one_by_one, together):
        np.testing.assert_allclose(mixed, single, rtol=0, atol=1e-5)
    assert [len(s) for s in together] == [3, 1, 2]


def test_user_summaries_last_row_and_store_latest(built):
    from merlin_mllm.pipelines.training import load_rows

    _, data, store, _, repo, _ = built
    served = pd.read_parquet(repo / "mllm_features" / "1" / ARTIFACTS_DIR / "users.parquet").set_index("user_id")
    # last_row: a test user's served summary is the one evaluate scores its test group with
    test_rows = load_rows(data, "test", store)
    for user, summary in test_rows.groupby("user_id")["user_summary"].first().items():
        assert served.loc[user, "user_summary"] == summary
    latest = user_summary_table(store, data, "store_latest").set_index("user_id")
    assert len(latest) == 30
    for user in latest.index[:5]:
        assert latest.loc[user, "user_summary"] == latest_user_summary(store, int(user))
    with pytest.raises(ValueError, match="needs a summary store folder"):
        user_summary_table(pd.DataFrame({"user_id": [1]}), data, "store_latest")
    with pytest.raises(ValueError, match="must be one of"):
        user_summary_table(store, data, "newest")


def test_request_validation_and_ranking_rules(built):
    _, _, _, _, repo, _ = built
    step = FeatureStep.load(repo / "mllm_features" / "1" / ARTIFACTS_DIR)
    one = np.array([[1]])
    with pytest.raises(RequestError, match="unknown item id"):
        step.item_positions([1, 5000, 2, 6000])
    with pytest.raises(RequestError, match=r"5000, 6000"):
        step.item_positions([1, 5000, 2, 6000])
    with pytest.raises(RequestError, match="empty"):
        step.check_request(one, np.zeros((1, 0), dtype=np.int64), None)
    with pytest.raises(RequestError, match="limit of 50"):
        step.check_request(one, np.ones((1, 51), dtype=np.int64), None)
    with pytest.raises(RequestError, match="one user id per row"):
        step.check_request(np.array([[1], [2]]), np.ones((1, 3), dtype=np.int64), None)
    with pytest.raises(RequestError, match="same top_k"):
        step.check_request(np.array([[1], [2]]), np.ones((2, 3), dtype=np.int64), np.array([[1], [2]]))
    ids, scores = rank_scores([7, 8, 9, 10], [0.2, 0.5, 0.2, 0.9], top_k=3)
    assert ids.tolist() == [10, 8, 7] and scores.dtype == np.float32  # ties keep input order (7 before 9)
    with pytest.raises(ValueError, match="max_candidates"):
        ServingLimits(max_candidates=0)


def test_re_export_replaces_our_models_only(built):
    root, data, store, model, repo, _ = built
    (repo / "other_model" / "1").mkdir(parents=True)
    manifest = export(model, store, data, repo, max_candidates=7)
    assert json.loads((repo / "mllm_features" / "1" / ARTIFACTS_DIR / "features.json").read_text())["limits"]["max_candidates"] == 7
    assert manifest["limits"]["max_candidates"] == 7
    assert (repo / "other_model" / "1").is_dir() and (repo / "README.md").is_file()
    assert not [p for p in repo.iterdir() if p.name.startswith(".export-")]  # no staging left


def test_cli_gpu_export_sets_kind_gpu(built, tmp_path):
    from merlin_mllm.cli import app

    _, data, store, model, _, _ = built
    out = tmp_path / "gpu_repo"
    result = CliRunner().invoke(app, ["export", "--model", str(model), "--summaries", str(store), "--data", str(data),
                                      "--out", str(out), "--gpu", "--gpu-instances", "2", "--no-dynamic-batching"])
    assert result.exit_code == 0, result.output
    assert "KIND_GPU x2" in result.output
    ranker, mc = read_config(out / "mllm_ranker" / "config.pbtxt")
    features, _ = read_config(out / "mllm_features" / "config.pbtxt")
    assert [(g.kind, g.count) for g in ranker.instance_group] == [(mc.ModelInstanceGroup.KIND_GPU, 2)]
    assert [g.kind for g in features.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]  # features stay on CPU
    assert not ranker.HasField("dynamic_batching")
    assert ranker.parameters["dtype"].string_value == "auto"


def test_bad_inputs_are_clear_errors(built, tmp_path):
    from merlin_mllm.cli import app
    from merlin_mllm.models.tiny import tiny_mllm_path
    from merlin_mllm.ranker import RankerModel

    _, data, store, model, _, _ = built
    with pytest.raises(FileNotFoundError, match="is not a saved ranker"):
        export(data, store, data, tmp_path / "r1")
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        export(model, store, tmp_path, tmp_path / "r2")
    with pytest.raises(ValueError, match="max_candidates must be at least 1"):
        export(model, store, data, tmp_path / "r3", max_candidates=0)
    result = CliRunner().invoke(app, ["export", "--model", str(tmp_path / "nope"), "--summaries", str(store),
                                      "--data", str(data), "--out", str(tmp_path / "r4")])
    assert result.exit_code == 2 and "error:" in result.output and "nope" in result.output
    # An HF MLLM that reads pixels through its processor cannot be served from token ids.
    pixel_model = RankerModel.build(str(tiny_mllm_path("llava_next")), use_images=True)
    pixel_model.save_pretrained(tmp_path / "pixel_ranker")
    with pytest.raises(ValueError, match="through its processor"):
        export(tmp_path / "pixel_ranker", store, data, tmp_path / "r5")

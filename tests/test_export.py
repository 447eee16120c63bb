"""`export`: the Triton repository layout and configs, the exported artefacts (prompts, summaries,
image flags), request validation, the unknown-user policy, the prompt cut taken from training,
the atomic swap (failures injected at several steps leave the previous repository byte for
byte), and clear errors for bad inputs. No server here (see test_serving.py)."""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from merlin.dag.node import iter_nodes

import merlin_mllm.serving.export as export_module
from merlin_mllm.operators.tokenize_prompt import TokenizePrompt
from merlin_mllm.serving.ranker_step import RankerStep
from merlin_mllm.serving.steps import (
    ARTIFACTS_DIR,
    FeatureStep,
    RequestError,
    ServingLimits,
    UnknownUserError,
    rank_scores,
)
from merlin_mllm.serving.export import (
    MANIFEST_FILE,
    export,
    prompt_token_limit,
    user_summary_table,
)
from merlin_mllm.summaries.user_prompts import EMPTY_HISTORY_SUMMARY
from merlin_mllm.summaries.user_store import latest_user_summary
from tests.serving_support import IMAGE_EVERY, build_dataset, build_ranker, build_store, load_reference, titles_of

pytestmark = pytest.mark.filterwarnings("ignore")


def read_config(path):
    from google.protobuf import text_format

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import tritonclient.grpc.model_config_pb2 as model_config
    return text_format.Parse(path.read_text(), model_config.ModelConfig()), model_config


def tree_hashes(folder: Path) -> dict:
    """sha256 of every file under ``folder`` (relative path -> digest), and every folder (-> None)."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def leftovers(repo: Path) -> list:
    """Staging or previous repositories an export left beside ``repo``."""
    return sorted(p.name for p in repo.parent.iterdir() if p.name.startswith(f"{repo.name}.tmp-")
                  or p.name.startswith(f"{repo.name}.old-"))


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
    # the ranker consumes what the features step produces (but the cold-start flag), plus the item ids
    assert set(ranker_step.input_map.values()) == set(features_step.output_map.values()) - {"known_user"} | {"item_ids"}
    assert {i.name: (mc.DataType.Name(i.data_type), list(i.dims), i.optional) for i in ensemble.input} == {
        "user_id": ("TYPE_INT64", [1], False), "item_ids": ("TYPE_INT64", [-1], False), "top_k": ("TYPE_INT32", [1], True),
        "retrieval_scores": ("TYPE_FP32", [-1], True)}
    assert {o.name: mc.DataType.Name(o.data_type) for o in ensemble.output} == {
        "scores": "TYPE_FP32", "ranked_item_ids": "TYPE_INT64", "ranked_scores": "TYPE_FP32", "known_user": "TYPE_BOOL"}
    # known_user comes straight from the features step; the scores from the ranker
    assert dict(features_step.output_map)["known_user"] == "known_user"
    assert "known_user" not in dict(ranker_step.output_map)
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
    assert manifest["features"]["unknown_users"] == "empty_summary"
    # no train_config.json beside this model folder: training's default cut
    assert (manifest["features"]["max_prompt_tokens"], manifest["features"]["max_prompt_tokens_source"]) == (512, "default")
    assert manifest["carried_over"] == ["README.md"]
    # not a hybrid: no head features computed, none wired between the steps (retrieval_scores unused)
    assert manifest["hybrid"] is None
    assert not (repo / "mllm_features" / "1" / ARTIFACTS_DIR / "head_features").exists()
    assert "head_features" not in {o.name for o in features.output} | {i.name for i in ranker.input}
    assert "head_features" not in dict(features_step.output_map)


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
    assert batch["known_user"].tolist() == [[True]]
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


def test_unknown_users_are_flagged_counted_or_refused(built):
    _, _, _, _, repo, _ = built
    step = FeatureStep.load(repo / "mllm_features" / "1" / ARTIFACTS_DIR)
    assert step.unknown_users == "empty_summary"
    known = int(step.users["user_id"].iloc[0])
    # default policy: the unknown row is scored (empty summary) and flagged; counts per request
    batch = step.prepare(np.array([[known], [10**9], [10**9 + 1]]), np.array([[1, 2]] * 3))
    assert batch["known_user"].tolist() == [[True], [False], [False]]
    step.prepare(np.array([[known]]), np.array([[1, 2]]))
    assert (step.requests, step.cold_start_requests, step.cold_start_rows) == (2, 1, 2)
    # the prompts of the unknown rows are those of the empty-history summary
    assert batch["prompt_ids"][1].tolist() == batch["prompt_ids"][2].tolist()
    assert batch["prompt_ids"][1].tolist() != batch["prompt_ids"][0].tolist()

    strict = FeatureStep(step.users, step.items, step.workflow, step.limits, step.empty_summary, "error")
    with pytest.raises(UnknownUserError, match=r"unknown user id\(s\) 1000000000, 1000000002: .*unknown_users='error'") as caught:
        strict.prepare(np.array([[10**9], [known], [10**9 + 2], [10**9]]), np.array([[1, 2]] * 4))
    assert caught.value.user_ids == [10**9, 10**9 + 2] and isinstance(caught.value, RequestError)
    assert strict.prepare(np.array([[known]]), np.array([[1, 2]]))["known_user"].tolist() == [[True]]
    assert (strict.requests, strict.cold_start_requests, strict.cold_start_rows) == (2, 1, 3)
    # the policy travels with the saved step
    strict.save(repo.parent / "strict_step")
    assert FeatureStep.load(repo.parent / "strict_step").unknown_users == "error"
    with pytest.raises(ValueError, match="unknown_users must be one of"):
        FeatureStep(step.users, step.items, step.workflow, step.limits, step.empty_summary, "ignore")


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
    # retrieval_scores: unused by a ranker that is no hybrid, but checked against item_ids
    with pytest.raises(RequestError, match=r"retrieval_scores has shape \[1, 2\] but item_ids \[1, 3\]"):
        step.prepare(one, np.array([[1, 2, 3]]), None, np.zeros((1, 2), dtype=np.float32))
    plain = step.prepare(one, np.array([[1, 2]]))
    with_scores = step.prepare(one, np.array([[1, 2]]), None, np.array([[0.5, -1.0]], dtype=np.float32))
    assert "head_features" not in with_scores and with_scores.keys() == plain.keys()
    assert with_scores["prompt_ids"].tolist() == plain["prompt_ids"].tolist()
    ids, scores = rank_scores([7, 8, 9, 10], [0.2, 0.5, 0.2, 0.9], top_k=3)
    assert ids.tolist() == [10, 8, 7] and scores.dtype == np.float32  # ties keep input order (7 before 9)
    with pytest.raises(ValueError, match="max_candidates"):
        ServingLimits(max_candidates=0)


def test_re_export_replaces_our_models_only(built):
    root, data, store, model, repo, _ = built
    (repo / "other_model" / "1").mkdir(parents=True)
    (repo / "other_model" / "1" / "weights.bin").write_bytes(b"\x00\x01other")
    before = tree_hashes(repo)
    manifest = export(model, store, data, repo, max_candidates=7, unknown_users="error")
    assert json.loads((repo / "mllm_features" / "1" / ARTIFACTS_DIR / "features.json").read_text())["limits"]["max_candidates"] == 7
    assert manifest["limits"]["max_candidates"] == 7 and manifest["features"]["unknown_users"] == "error"
    assert FeatureStep.load(repo / "mllm_features" / "1" / ARTIFACTS_DIR).unknown_users == "error"
    assert sorted(manifest["carried_over"]) == ["README.md", "other_model"]
    after = tree_hashes(repo)
    for name, digest in before.items():  # what the export does not own is there, byte for byte
        if name.split("/")[0] in ("README.md", "other_model"):
            assert after[name] == digest, name
    assert leftovers(repo) == []  # no staging or previous repository left beside it
    export(model, store, data, repo, max_candidates=50, top_k_default=5, max_batch_delay_us=500)  # as built


@pytest.mark.parametrize("step", ["ranker_step", "ensemble_config", "swap"])
def test_a_failed_export_leaves_the_previous_repository_byte_identical(built, step, monkeypatch):
    """A failure injected after some of the new models were written (or at the swap itself)."""
    _, data, store, model, repo, _ = built
    (repo / "other_model" / "1").mkdir(parents=True, exist_ok=True)
    before = tree_hashes(repo)
    assert "mllm_features/1/artifacts/users.parquet" in before and "README.md" in before

    def boom(*args, **kwargs):
        raise RuntimeError(f"injected failure at {step}")

    if step == "ranker_step":  # the features model is written by then
        monkeypatch.setattr(RankerStep, "write", staticmethod(boom))
    elif step == "ensemble_config":  # features and ranker models are written
        monkeypatch.setattr(export_module, "ensemble_config", boom)
    else:  # the whole new repository is written; the exchange fails
        monkeypatch.setattr(export_module, "exchange_paths", boom)
    with pytest.raises(RuntimeError, match=f"injected failure at {step}"):
        export(model, store, data, repo, max_candidates=3, unknown_users="error")
    assert tree_hashes(repo) == before
    assert leftovers(repo) == []


def test_swap_without_rename_exchange(built, monkeypatch):
    """Where renameat2(RENAME_EXCHANGE) is missing, two renames swap the repository in."""
    _, data, store, model, repo, _ = built
    calls = []
    monkeypatch.setattr(export_module, "exchange_paths", lambda a, b: calls.append((a, b)) or False)
    before = tree_hashes(repo)
    inode = (repo / "README.md").stat().st_ino
    manifest = export(model, store, data, repo, max_candidates=50, top_k_default=5, max_batch_delay_us=500)
    assert len(calls) == 1 and calls[0][1] == repo.resolve()
    assert manifest["limits"]["max_candidates"] == 50
    after = tree_hashes(repo)
    assert after["README.md"] == before["README.md"] and (repo / "README.md").read_text() == "keep me\n"
    assert (repo / "README.md").stat().st_ino == inode  # carried over as a hard link, not copied
    assert after.keys() == before.keys()  # the same export: the same files
    assert leftovers(repo) == []


def test_exchange_paths_swaps_two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("from a")
    (b / "y").write_text("from b")
    if not export_module.exchange_paths(a, b):
        pytest.skip("this system has no renameat2(RENAME_EXCHANGE)")
    assert [p.name for p in a.iterdir()] == ["y"] and [p.name for p in b.iterdir()] == ["x"]
    with pytest.raises(FileNotFoundError):
        export_module.exchange_paths(a, tmp_path / "missing")


def test_export_into_a_new_folder_and_refusals(built, tmp_path):
    _, data, store, model, _, _ = built
    with pytest.raises(FileExistsError, match="is not a folder"):
        (tmp_path / "file").write_text("x")
        export(model, store, data, tmp_path / "file")
    with pytest.raises(ValueError, match="unknown_users must be one of"):
        export(model, store, data, tmp_path / "r", unknown_users="drop")
    assert not (tmp_path / "r").exists() and leftovers(tmp_path / "r") == []  # nothing written


def test_prompt_cut_comes_from_the_training_run(built, reference, tmp_path):
    """Served prompts are cut as training cut them: train_config.json's max_length, else 512."""
    from merlin_mllm.pipelines.train_config import TrainConfig
    from merlin_mllm.pipelines.training import saved_settings
    from merlin_mllm.ranker.saved import MODEL_DIR, TRAIN_CONFIG_FILE, trained_max_length, trained_model_dir

    _, data, store, model, _, _ = built
    run = tmp_path / "run"
    build_ranker(data, run / MODEL_DIR)
    assert prompt_token_limit(run / MODEL_DIR) == (512, "default")  # no record yet
    (run / TRAIN_CONFIG_FILE).write_text(json.dumps(saved_settings(TrainConfig(max_length=300), data)))
    record = str(run / TRAIN_CONFIG_FILE)
    assert trained_model_dir(run) == run / MODEL_DIR and trained_model_dir(run / MODEL_DIR) == run / MODEL_DIR
    for given in (run, run / MODEL_DIR):  # the run folder or its model/
        assert prompt_token_limit(given) == (300, record) == trained_max_length(given)
    assert prompt_token_limit(run, 200) == (200, "argument")
    assert prompt_token_limit(model) == (512, "default")  # a model folder without a training record
    with pytest.raises(ValueError, match="at least 16"):
        prompt_token_limit(run, 8)
    # the export of the run folder cuts with the training value, in the served workflow itself
    manifest = export(run, store, data, tmp_path / "repo")
    assert manifest["features"]["max_prompt_tokens"] == 300 and manifest["features"]["max_prompt_tokens_source"] == record
    assert manifest["sources"]["model"] == str((run / MODEL_DIR).resolve())
    step = FeatureStep.load(tmp_path / "repo" / "mllm_features" / "1" / ARTIFACTS_DIR)
    operators = [node.op for node in iter_nodes([step.workflow.output_node]) if isinstance(node.op, TokenizePrompt)]
    assert [op.max_length for op in operators] == [300]
    # a long summary: the served prompts are training's (TokenizePrompt.encode_row, max_length 300)
    long_summary = "A viewer of " + "long, slow and thoughtful dramas about families, " * 80
    users = pd.DataFrame({"user_id": [1], "user_summary": [long_summary]})
    step = FeatureStep(users, step.items, step.workflow, step.limits, step.empty_summary)
    training_cut = TokenizePrompt.for_ranker(reference, max_length=300)
    titles = titles_of(data)
    items = [1, 3, 6, 2]
    served = step.prompts(1, items)
    for item, ids in zip(items, served):
        shown = item % IMAGE_EVERY == 0
        assert ids.tolist() == training_cut.encode_row(long_summary, titles[item], shown).input_ids
        assert len(reference.prompt.encode(long_summary, titles[item], has_image=shown).input_ids) > 300 >= len(ids)
    (run / TRAIN_CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="cannot read the training run's max_length"):
        prompt_token_limit(run)


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
    assert ranker.parameters["precision"].string_value == "float32"  # the saved ranker's


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


def test_export_reads_each_prepared_table_once(built, tmp_path, monkeypatch):
    """The export opens the prepared folder once and passes its tables down (no step re-reads them)."""
    import sys

    from merlin_mllm.data import tables

    _, data, store, model, _, _ = built
    reads = []
    real_read = tables.read_table

    def counting_read(path, *args, **kwargs):
        path = Path(path)
        if path.parent == Path(data):  # a table of the prepared folder (not the store, the ranker)
            reads.append(path.name)
        return real_read(path, *args, **kwargs)

    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("merlin_mllm") and getattr(module, "read_table", None) is real_read:
            monkeypatch.setattr(module, "read_table", counting_read)
    again = export(model, store, data, tmp_path / "repo", max_candidates=50, top_k_default=5, max_batch_delay_us=500)
    assert reads and len(reads) == len(set(reads)), f"tables read more than once: {sorted(reads)}"
    assert "items" in reads
    # And what it wrote from those tables is what the module's export wrote.
    for name in ("users.parquet", "items.parquet"):
        ours, theirs = (folder / "mllm_features" / "1" / "artifacts" / name for folder in (tmp_path / "repo", built[4]))
        assert pd.read_parquet(ours).equals(pd.read_parquet(theirs)), name

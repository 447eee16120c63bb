"""Serving for real: an export of a saved embedded ranker, served by the bundled tritonserver.

One server for the module serves the `mllm_rerank` ensemble and, from the same artefacts, the
merlin.systems executor model of `MLLMRerank`. Checks: served scores equal `evaluate_ranker`'s
in-process scores, top-k order, cold start (the `known_user` flag, counted in the log), bad
requests (the server stays ready), concurrent requests through the dynamic batcher, both
protocols, the `query` CLI, and a clean shutdown.

A second server serves a second repository, exported with very long user summaries and
`unknown_users="error"`, over which a re-export failed partway: it must be byte-identical to
before and still serve; its long prompts are cut as training cuts them, so served scores equal
`evaluate_ranker`'s; an unknown user is a per-request error naming the id.
"""
from __future__ import annotations

import hashlib
import json
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import merlin_mllm.serving.export as export_module
from merlin_mllm.serving.client import RerankClient, RerankError
from merlin_mllm.serving.export import export
from merlin_mllm.serving.tritonserver import SHM_GLOB, TritonServer
from merlin_mllm.summaries.user_prompts import EMPTY_HISTORY_SUMMARY
from tests.serving_support import (
    IMAGE_EVERY,
    build_dataset,
    build_ranker,
    build_store,
    load_reference,
    summary_table,
    titles_of,
)

pytestmark = pytest.mark.filterwarnings("ignore")

MAX_CANDIDATES = 12
UNKNOWN_USER = 10**9


def shm_regions() -> set:
    return set(Path("/dev/shm").glob(SHM_GLOB))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Data, a summary store, a saved ranker, and the repository: ensemble + merlin.systems executor."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from merlin.schema import ColumnSchema, Schema
        from merlin.systems.dag import Ensemble

        from merlin_mllm.serving.systems import MLLMRerank, export_python_only

    root = tmp_path_factory.mktemp("serving")
    data = build_dataset(root / "data")
    store = build_store(data, root / "store")
    model = build_ranker(data, root / "model")
    repo = root / "repo"
    manifest = export(model, store, data, repo, max_candidates=MAX_CANDIDATES, top_k_default=3)
    schema = Schema([ColumnSchema("user_id", dtype="int64"),
                     ColumnSchema("item_ids", dtype="int64", is_list=True, is_ragged=True)])
    operator = MLLMRerank.from_export(repo, device="cpu")
    export_python_only(Ensemble(["user_id", "item_ids"] >> operator, schema), repo)
    del operator
    return SimpleNamespace(root=root, data=data, store=store, model=model, repo=repo, manifest=manifest)


@pytest.fixture(scope="module")
def server(built):
    before = shm_regions()
    triton = TritonServer(built.repo, http_port=0, grpc_port=0, metrics_port=0, log_file=built.root / "triton.log")
    triton.start(timeout=600)
    triton.shm_before_test = before
    yield triton
    triton.stop()


@pytest.fixture(scope="module")
def client(server):
    with RerankClient(server.grpc_url) as grpc_client:
        yield grpc_client


@pytest.fixture(scope="module")
def reference(built):
    return load_reference(built.model)


@pytest.fixture(scope="module")
def evaluated(built):
    """`evaluate_ranker`'s per-row in-process scores on the test split (what `merlin-mllm evaluate` writes)."""
    from merlin_mllm.pipelines.evaluation import evaluate_ranker

    evaluate_ranker(built.data, built.store, built.model, built.root / "eval" / "test.json", progress=False)
    return pd.read_parquet(built.root / "eval" / "test.scores.parquet")


def _raw_infer(server, user_ids, item_ids, item_dtype="INT64", top_k=None):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    inputs = []
    for name, array, dtype in (("user_id", np.asarray(user_ids, dtype=np.int64), "INT64"),
                               ("item_ids", np.asarray(item_ids, dtype=item_dtype.lower()), item_dtype)):
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    if top_k is not None:
        tensor = grpcclient.InferInput("top_k", [len(user_ids), 1], "INT32")
        tensor.set_data_from_numpy(np.full((len(user_ids), 1), top_k, dtype=np.int32))
        inputs.append(tensor)
    try:
        return client.infer("mllm_rerank", inputs)
    finally:
        client.close()


# ---------------------------------------------------------------------------- equality
def test_served_scores_equal_evaluate_scores(server, client, evaluated):
    assert len(evaluated["group_id"].unique()) >= 2
    for _, group in evaluated.groupby("group_id"):
        users = group["user_id"].unique()
        assert len(users) == 1
        items = group["item_id"].tolist()
        result = client.rank(int(users[0]), items, top_k=len(items))
        np.testing.assert_allclose(result.scores, group["score"].to_numpy(), rtol=0, atol=1e-5,
                                   err_msg=f"max diff {np.abs(result.scores - group['score'].to_numpy()).max():.2e}")
        # ranked: every candidate, highest first, scores matching the input-order scores
        by_item = dict(zip(items, result.scores))
        assert sorted(i for i, _ in result.ranked) == sorted(items)
        assert [s for _, s in result.ranked] == sorted((s for _, s in result.ranked), reverse=True)
        assert all(by_item[i] == pytest.approx(s, abs=1e-7) for i, s in result.ranked)


def test_image_items_and_top_k_order(built, client, reference):
    user = int(pd.read_parquet(built.repo / "mllm_features" / "1" / "artifacts" / "users.parquet")["user_id"].iloc[0])
    items = [3, 1, 6, 2, 9, 4, 12]  # multiples of 3 have image grids: prompts with 49 image tokens
    assert any(i % IMAGE_EVERY == 0 for i in items) and any(i % IMAGE_EVERY for i in items)
    result = client.rank(user, items, top_k=4)
    summary = pd.read_parquet(built.repo / "mllm_features" / "1" / "artifacts" / "users.parquet").set_index("user_id")
    titles = titles_of(built.data)
    expected = reference.score(summary.loc[user, "user_summary"], [{"title": titles[i], "item_id": i} for i in items])
    np.testing.assert_allclose(result.scores, expected, rtol=0, atol=1e-5)
    order = np.argsort(-result.scores, kind="stable")[:4]
    assert [i for i, _ in result.ranked] == [items[j] for j in order]
    assert len(result.ranked) == 4
    # the export's default top_k (3) applies when the request has none
    assert len(client.rank(user, items).ranked) == 3


def test_unknown_user_gets_the_empty_history_summary(built, server, client, reference):
    items = [5, 6, 7]
    titles = titles_of(built.data)
    result = client.rank(UNKNOWN_USER + 7, items)
    expected = reference.score(EMPTY_HISTORY_SUMMARY, [{"title": titles[i], "item_id": i} for i in items])
    np.testing.assert_allclose(result.scores, expected, rtol=0, atol=1e-5)
    assert result.known_user is False
    known = int(pd.read_parquet(built.repo / "mllm_features" / "1" / "artifacts" / "users.parquet")["user_id"].iloc[0])
    assert client.rank(known, items).known_user is True
    # the features model logs each cold start with its id and the running counts
    log = (built.root / "triton.log").read_text(errors="replace")
    lines = [line for line in log.splitlines() if f"unknown user id(s) {UNKNOWN_USER + 7} served" in line]
    assert len(lines) == 1 and "cold-start rows in" in lines[0], lines


def test_http_and_grpc_agree(server, client):
    with RerankClient(server.http_url, protocol="http") as http_client:
        over_http = http_client.rank(UNKNOWN_USER, [10, 11], top_k=1)
    over_grpc = client.rank(UNKNOWN_USER, [10, 11], top_k=1)
    np.testing.assert_allclose(over_http.scores, over_grpc.scores, atol=1e-7)
    assert over_http.ranked[0][0] == over_grpc.ranked[0][0]


def test_a_request_with_two_user_rows(built, server, client):
    known = int(pd.read_parquet(built.repo / "mllm_features" / "1" / "artifacts" / "users.parquet")["user_id"].iloc[0])
    answer = _raw_infer(server, [[UNKNOWN_USER], [UNKNOWN_USER + 1]], [[5, 6], [6, 5]], top_k=1)
    scores = answer.as_numpy("scores")
    assert scores.shape == (2, 2) and answer.as_numpy("ranked_item_ids").shape == (2, 1)
    assert answer.as_numpy("known_user").tolist() == [[False], [False]]
    mixed = _raw_infer(server, [[known], [UNKNOWN_USER]], [[5, 6], [5, 6]])
    assert mixed.as_numpy("known_user").dtype == np.bool_ and mixed.as_numpy("known_user").tolist() == [[True], [False]]
    # both rows are cold-start users with the same summary: the same items get the same scores
    np.testing.assert_allclose(scores[1], scores[0][::-1], atol=1e-5)
    np.testing.assert_allclose(scores[0], client.rank(UNKNOWN_USER, [5, 6]).scores, atol=1e-5)


# ---------------------------------------------------------------------------- bad requests
@pytest.mark.parametrize(
    "case, kwargs, message",
    [
        ("unknown item", dict(user_ids=[[1]], item_ids=[[1, 987654]]), "unknown item id(s) 987654"),
        ("empty list", dict(user_ids=[[1]], item_ids=np.zeros((1, 0))), "item_ids is empty"),
        ("too many", dict(user_ids=[[1]], item_ids=[list(range(1, MAX_CANDIDATES + 2))]), f"limit of {MAX_CANDIDATES}"),
        ("wrong dtype", dict(user_ids=[[1]], item_ids=[[1, 2]], item_dtype="INT32"), "expects 'INT64'"),
        ("bad top_k", dict(user_ids=[[1]], item_ids=[[1, 2]], top_k=0), "top_k must be at least 1"),
    ],
)
def test_bad_requests_fail_clearly_and_the_server_stays_ready(server, client, case, kwargs, message):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as caught:
        _raw_infer(server, **kwargs)
    assert message in str(caught.value), case
    assert "INVALID_ARG" in str(caught.value.status())
    assert server.is_ready()
    assert client.rank(UNKNOWN_USER, [1]).scores.shape == (1,)  # and still serves valid requests


def test_client_errors_name_the_problem(server, client):
    with pytest.raises(RerankError, match="unknown item id"):
        client.rank(1, [1, 424242])
    with pytest.raises(RerankError, match="position 1"):
        client.rank(1, [1, "x"])
    with pytest.raises(RerankError, match="cannot reach Triton"):
        RerankClient("127.0.0.1:1").rank(1, [1])


# ---------------------------------------------------------------------------- batching, systems, CLI
def test_concurrent_requests_are_dynamically_batched(built, tmp_path_factory):
    """A burst of concurrent requests runs as one ranker execution, by Triton's own statistics.

    No timing is assumed: an export held in the dynamic batcher for up to 30 s, or until
    ``max_batch_size`` users wait. A burst of exactly that many one-user requests therefore forms
    one batch however slowly the threads run (within 30 s). Its ranker is the tiny random
    LLaVA-NeXT (text only): batching is Triton's and the ranker step's, whatever the model.
    """
    import tritonclient.grpc as grpcclient

    from merlin_mllm.models.tiny import tiny_mllm_path
    from merlin_mllm.ranker import RankerModel
    from merlin_mllm.serving.ranker_step import RankerStep
    from merlin_mllm.serving.steps import ARTIFACTS_DIR, FEATURES_MODEL, RANKER_MODEL, FeatureStep

    burst = 4
    root = tmp_path_factory.mktemp("batching")
    RankerModel.build(str(tiny_mllm_path("llava_next")), use_images=False, lora_init="gaussian", seed=1,
                      device="cpu").save_pretrained(root / "model")
    repo = root / "repo"
    export(root / "model", built.store, built.data, repo, max_candidates=MAX_CANDIDATES,
           max_batch_size=burst, max_batch_delay_us=30_000_000)
    requests = [(UNKNOWN_USER, [1, 2]), (UNKNOWN_USER + 1, [4, 5, 6]), (UNKNOWN_USER + 2, [7, 8]), (UNKNOWN_USER + 3, [9])]
    assert len(requests) == burst
    # References in this process, through the exported steps: on the server a lone request would
    # wait the full 30 s.
    features = FeatureStep.load(repo / FEATURES_MODEL / "1" / ARTIFACTS_DIR)
    step = RankerStep.load(repo / RANKER_MODEL / "1" / ARTIFACTS_DIR, device="cpu")
    sequential = []
    for user, items in requests:
        batch = features.prepare(np.array([[user]]), np.array([items], dtype=np.int64))
        sequential.append(step.score_rows(batch["prompt_ids"], batch["prompt_lengths"],
                                          np.array([items], dtype=np.int64))[0])
    results, errors = [None] * burst, []
    with TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, log_file=repo.parent / "triton.log") as batching:
        start = threading.Barrier(burst)

        def worker(index):
            try:
                with RerankClient(batching.grpc_url) as own:
                    start.wait(60)
                    results[index] = own.rank(*requests[index]).scores
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(burst)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        stats_client = grpcclient.InferenceServerClient(batching.grpc_url)
        stats = stats_client.get_inference_statistics("mllm_ranker", as_json=True)["model_stats"][0]
        stats_client.close()
    assert not errors, errors
    # Batched and alone, in two processes: CPU GEMM rounding may differ slightly (see the executor test below).
    for got, want in zip(results, sequential):
        np.testing.assert_allclose(got, want, atol=2e-4)
    # Triton's own counts: 4 inferences (users), one execution, and that execution a batch of 4.
    assert int(stats["inference_count"]) == burst
    assert int(stats["execution_count"]) == 1
    assert {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats["batch_stats"]} == {burst: 1}


def test_merlin_systems_executor_serves_the_same_scores(server, client):
    import tritonclient.grpc as grpcclient

    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    rows = [(UNKNOWN_USER, [1, 3, 6]), (UNKNOWN_USER + 5, [2, 9])]
    values = np.concatenate([np.asarray(items, dtype=np.int64) for _, items in rows])
    offsets = np.cumsum([0] + [len(items) for _, items in rows]).astype(np.int32)
    inputs = []
    for name, array, dtype in (("user_id", np.array([u for u, _ in rows], dtype=np.int64), "INT64"),
                               ("item_ids__values", values, "INT64"), ("item_ids__offsets", offsets, "INT32")):
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    answer = grpc.infer("executor_model", inputs)
    grpc.close()
    scores, score_offsets = answer.as_numpy("scores__values"), answer.as_numpy("scores__offsets")
    np.testing.assert_array_equal(score_offsets, offsets)
    assert answer.as_numpy("known_user").reshape(-1).tolist() == [False, False]  # both cold starts
    for row, (user, items) in enumerate(rows):
        expected = client.rank(user, items).scores
        got = scores[offsets[row]:offsets[row + 1]]
        # Two server processes: CPU GEMM rounding usually differs by ~1e-6; rare per-process MKL
        # kernel choices shift a user's scores by up to ~6e-5 (seen on a busy 2-core machine).
        np.testing.assert_allclose(got, expected, atol=2e-4, err_msg=f"max diff {np.abs(got - expected).max():.2e}")


def test_query_cli_prints_ranked_items_with_titles(built, server, client):
    from merlin_mllm.cli import app

    runner = CliRunner()
    items = [1, 2, 3]
    out = runner.invoke(app, ["query", "--url", server.grpc_url, "--user", str(UNKNOWN_USER), "--items", "1,2,3",
                              "--top-k", "2", "--titles", str(built.data)])
    assert out.exit_code == 0, out.output
    expected = client.rank(UNKNOWN_USER, items, top_k=2).ranked
    titles = titles_of(built.data)
    lines = [line for line in out.output.splitlines() if line.strip()[:1].isdigit()]
    assert len(lines) == 2
    for line, (item_id, score) in zip(lines, expected):
        rank, shown_id, shown_score, *title = line.split(None, 3)
        assert int(shown_id) == item_id and float(shown_score) == pytest.approx(score, abs=1e-5)
        assert title and title[0] == titles[item_id]
    assert f"user {UNKNOWN_USER} (unknown: cold start, empty-history summary): top 2 of 3" in out.output
    known = int(pd.read_parquet(built.repo / "mllm_features" / "1" / "artifacts" / "users.parquet")["user_id"].iloc[0])
    as_json = runner.invoke(app, ["query", "--url", server.grpc_url, "--user", str(known), "--items", "1,2", "--json"])
    assert as_json.exit_code == 0, as_json.output
    answer = json.loads(as_json.output)
    assert answer["known_user"] is True and answer["user_id"] == known and len(answer["scores"]) == 2
    bad = runner.invoke(app, ["query", "--url", server.grpc_url, "--protocol", "grpc", "--user", "1", "--items", "1,999999"])
    assert bad.exit_code == 2 and "unknown item id(s) 999999" in bad.output


# ---------------------------------------------------------------------------- a second repository
def tree_hashes(folder: Path) -> dict:
    """sha256 of every file under ``folder`` (relative path -> digest), and every folder (-> None)."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


LONG_TAIL = (" They keep coming back to slow, talky dramas about families and small towns, to films whose "
             "endings stay open, and to anything with a memorable score.")


@pytest.fixture(scope="module")
def second(built, tmp_path_factory):
    """A repository exported with very long summaries and unknown_users="error"; then a re-export
    that fails partway (after the features and ranker models are written); then a server on it."""
    root = tmp_path_factory.mktemp("second")
    summaries = summary_table(built.data)
    # Far past the 384-token summary budget, so prompts with image tokens exceed the 512-token cut.
    summaries["user_summary"] = [f"User {u}: {text}" + LONG_TAIL * 40
                                 for u, text in zip(summaries["user_id"], summaries["user_summary"])]
    repo = root / "repo"
    manifest = export(built.model, summaries, built.data, repo, max_candidates=MAX_CANDIDATES, unknown_users="error")
    (repo / "README.md").write_text("second repository\n")
    before = tree_hashes(repo)

    def injected(*args, **kwargs):
        raise RuntimeError("injected failure after the features and ranker models were written")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export_module, "ensemble_config", injected)
        with pytest.raises(RuntimeError, match="injected failure"):
            export(built.model, built.store, built.data, repo, max_candidates=2, top_k_default=1)
    after = tree_hashes(repo)
    beside = sorted(p.name for p in root.iterdir() if p.name != "repo")
    triton = TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, log_file=root / "triton.log")
    triton.start(timeout=600)
    with RerankClient(triton.grpc_url) as own:
        yield SimpleNamespace(root=root, repo=repo, summaries=summaries, manifest=manifest, before=before, after=after,
                              beside=beside, server=triton, client=own)
    triton.stop(timeout=180)


def test_a_failed_export_leaves_the_previous_repository_serving(built, second, client):
    assert second.after == second.before  # every file byte-identical
    assert "mllm_features/1/artifacts/users.parquet" in second.before and "README.md" in second.before
    assert second.beside == []  # no staging folder left beside it
    assert json.loads((second.repo / "export.json").read_text())["features"]["unknown_users"] == "error"
    # it serves, with the previous export's limits (the failed one's max_candidates 2 and
    # top_k_default 1 never applied)
    user = int(pd.read_parquet(second.repo / "mllm_features" / "1" / "artifacts" / "users.parquet")["user_id"].iloc[0])
    items = list(range(1, MAX_CANDIDATES + 1))
    result = second.client.rank(user, items)
    assert result.scores.shape == (MAX_CANDIDATES,) and len(result.ranked) == 10 and result.known_user is True


def test_long_summaries_are_cut_as_training_cuts_them(built, second, tmp_path):
    """In-process (evaluate_ranker) and served scores agree on prompts longer than training's cut."""
    from merlin_mllm.pipelines.evaluation import evaluate_ranker

    result = evaluate_ranker(built.data, second.summaries, built.model, tmp_path / "test.json", progress=False)
    assert result["run"]["max_length"] == 512 == second.manifest["features"]["max_prompt_tokens"]
    assert result["run"]["prompts_cut_now"] > 0  # the image items' prompts were cut
    evaluated = pd.read_parquet(tmp_path / "test.scores.parquet")
    for _, group in evaluated.groupby("group_id"):
        user, items = int(group["user_id"].iloc[0]), group["item_id"].tolist()
        served = second.client.rank(user, items, top_k=len(items)).scores
        np.testing.assert_allclose(served, group["score"].to_numpy(), rtol=0, atol=1e-5,
                                   err_msg=f"group {group['group_id'].iloc[0]}")
    # and the cut matters: scored uncut, an image item of a long summary gets another score
    reference = load_reference(built.model)
    titles = titles_of(built.data)
    group = evaluated[evaluated["item_id"] % IMAGE_EVERY == 0].iloc[0]
    summary = second.summaries[second.summaries["user_id"] == group["user_id"]].sort_values("target_position")
    uncut = reference.score(summary["user_summary"].iloc[-1], [{"title": titles[int(group["item_id"])],
                                                                "item_id": int(group["item_id"])}])
    assert abs(float(uncut[0]) - float(group["score"])) > 1e-4


def test_unknown_user_is_an_error_when_exported_so(second):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as caught:
        _raw_infer(second.server, [[UNKNOWN_USER + 3]], [[1, 2]])
    assert f"unknown user id(s) {UNKNOWN_USER + 3}" in str(caught.value) and "unknown_users='error'" in str(caught.value)
    assert "INVALID_ARG" in str(caught.value.status())
    with pytest.raises(RerankError, match=f"unknown user id\\(s\\) {UNKNOWN_USER + 4}"):
        second.client.rank(UNKNOWN_USER + 4, [1])
    assert second.server.is_ready()
    user = int(pd.read_parquet(second.repo / "mllm_features" / "1" / "artifacts" / "users.parquet")["user_id"].iloc[1])
    assert second.client.rank(user, [1, 2]).known_user is True  # known users are still served
    log = (second.root / "triton.log").read_text(errors="replace")
    assert f"unknown user id(s) {UNKNOWN_USER + 3} rejected (unknown_users='error')" in log


# ---------------------------------------------------------------------------- shutdown (keep last)
def test_clean_shutdown_leaves_no_shm_regions(server):
    # This server's own regions (by its prefix): the second repository's server is still up.
    own = server.shm_regions()
    assert own and set(own) <= shm_regions() - server.shm_before_test, "the python backend should hold shm regions"
    code = server.stop(timeout=180)  # generous: a loaded 2-core CI machine unloads models slowly
    assert code == 0
    assert server.shm_regions() == [] and not any(path.exists() for path in own)
    # unloading, the features model logs its cold-start totals
    log = Path(server.log_file).read_text(errors="replace")
    totals = [line for line in log.splitlines() if "with unknown users" in line]
    assert len(totals) == 1 and "unknown_users='empty_summary'" in totals[0], totals

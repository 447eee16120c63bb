"""``python -m benchmarks.quality.run_hybrid`` on an 80-user ML-100k folder: the non-LLM fusion beats random,
every stage is cached, and LLM rows given as score files fill the hybrid summary."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from merlin_mllm.data.splits import split_rows
from tests.benchmark_support import run_benchmark

RUN_HYBRID = "benchmarks.quality.run_hybrid"

FAST = ["--users", "80", "--protocols", "leave-last-out", "--seeds", "0", "--sequential-epochs", "5", "--resamples", "200"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("hybrid")
    assert run_benchmark(RUN_HYBRID, [*FAST, "--work", str(work), "--out", str(work)]) == 0
    return work, json.loads((work / "hybrid_rows.json").read_text())


def rows_by_key(results: dict) -> dict:
    return {row["key"]: row for row in results["protocols"]["leave-last-out"]["rows"]}


def test_non_llm_fusion_beats_random_on_80_users(first_run):
    work, results = first_run
    rows = rows_by_key(results)
    assert [r["key"] for r in results["protocols"]["leave-last-out"]["rows"]] == [
        "popularity", "recent_popularity", "sasrec", "gru4rec", "fusion", "late_fusion",
        "llm_only", "late_fusion_llm", "hybrid_tabular", "hybrid_tokens"]
    fusion = rows["fusion"]
    # Counted as of each row from 80 users' events, the features are weak (30 users were too few to
    # beat random once the counts stopped seeing the future), but they carry signal.
    groups = results["protocols"]["leave-last-out"]["data"]["groups_per_split"]
    assert fusion["status"] == "measured" and fusion["all"]["n_groups"] == groups["test"] >= 75
    assert fusion["all"]["auc"] > 0.55
    slices = results["protocols"]["leave-last-out"]["slices"]
    for key in ("popularity", "recent_popularity", "sasrec", "gru4rec", "late_fusion"):
        assert rows[key]["status"] == "measured" and 0.0 <= rows[key]["all"]["auc"] <= 1.0
        assert 0.0 <= rows[key]["all"]["hr@1"] <= rows[key]["all"]["hr@5"] <= 1.0
        if slices["cold_items"]["groups"]:
            assert rows[key]["cold_items"]["n_rows"] == slices["cold_items"]["rows"]
        assert rows[key]["cold_users"]["n_groups"] == slices["cold_users"]["groups"] > 0
    for key in ("llm_only", "late_fusion_llm", "hybrid_tabular", "hybrid_tokens"):
        assert rows[key]["status"] == "pending" and rows[key]["all"] is None
    interval = results["protocols"]["leave-last-out"]["intervals"]["fusion_minus_popularity"]["all"]
    assert interval["low"] <= interval["diff"] <= interval["high"]
    summary = json.loads((work / "hybrid_summary.json").read_text())["protocols"]["leave-last-out"]
    assert summary["best_hybrid_minus_best_non_llm"] is None and "note" in summary
    assert "| Non-LLM fusion |" in (work / "hybrid_rows.md").read_text()
    # The hybrid runs' inputs: every split's rows with the four fusion features.
    train = pd.read_parquet(work / "leave-last-out_u80" / "hybrid_inputs" / "train_s0.parquet")
    assert {"item_log_count", "item_log_recent_count", "user_log_count", "retrieval_score"} <= set(train.columns)
    assert len(train) == 2 * groups["train"]


def test_llm_score_files_fill_the_hybrid_summary(first_run):
    work, before = first_run
    data = work / "leave-last-out_u80" / "data"
    rng = np.random.default_rng(0)
    files = {}
    for name, split in (("llm_test", "test"), ("llm_valid", "valid"), ("hybrid_test", "test"),
                        ("hybrid_test_s2", "test"), ("hybrid_test_s3", "test")):
        rows = split_rows(data, split)[["group_id", "user_id", "item_id", "label"]]
        # A fake ranker that knows the label a little: P(yes) = sigmoid(label + noise).
        logit = rows["label"].to_numpy() * (2.0 if name.startswith("hybrid") else 1.0) + rng.normal(0, 1, len(rows))
        files[name] = work / f"{name}.scores.parquet"
        frame = rows.assign(score=1 / (1 + np.exp(-logit)))
        if name.startswith("hybrid"):  # evaluate_ranker keeps a hybrid's two parts
            frame = frame.assign(llm_logit=logit, head_logit=rng.normal(0, 1, len(rows)))
        frame.to_parquet(files[name], index=False)
    out = work / "with_llm"
    assert run_benchmark(RUN_HYBRID, [*FAST, "--work", str(work), "--out", str(out),
                            "--llm-scores", "leave-last-out", "llm_only", str(files["llm_test"]), str(files["llm_valid"]),
                            # three training seeds of the hybrid: one flag each
                            "--llm-scores", "leave-last-out", "hybrid_tabular", str(files["hybrid_test"]),
                            "--llm-scores", "leave-last-out", "hybrid_tabular", str(files["hybrid_test_s2"]),
                            "--llm-scores", "leave-last-out", "hybrid_tabular", str(files["hybrid_test_s3"])]) == 0
    results = json.loads((out / "hybrid_rows.json").read_text())
    rows, rows_before = rows_by_key(results), rows_by_key(before)
    # Cached stages are reused: the same non-LLM numbers and their original timings.
    for key in ("popularity", "sasrec", "fusion", "late_fusion"):
        assert rows[key]["all"] == rows_before[key]["all"]
        assert rows[key]["wall_seconds_per_seed"] == rows_before[key]["wall_seconds_per_seed"]
    assert rows["llm_only"]["status"] == rows["hybrid_tabular"]["status"] == rows["late_fusion_llm"]["status"] == "measured"
    assert rows["hybrid_tokens"]["status"] == "pending"
    summary = json.loads((out / "hybrid_summary.json").read_text())["protocols"]["leave-last-out"]
    assert summary["best_hybrid"] == "hybrid_tabular"
    for key in ("best_hybrid_minus_best_non_llm", "best_hybrid_minus_fusion", "best_hybrid_minus_late_fusion"):
        entry = summary[key]
        assert set(entry) >= {"diff", "low", "high"} and entry["low"] <= entry["diff"] <= entry["high"]
    assert summary["best_hybrid_minus_fusion"]["diff"] > 0  # the fake hybrid knows the labels
    # Seeds are strata of the interval, and each seed's AUC is shown.
    assert summary["best_hybrid_minus_fusion"]["strata"] == 3
    per_seed = summary["rows"]["hybrid_tabular"]["auc_per_seed"]
    assert len(per_seed) == 3 and len(set(per_seed)) == 3
    assert summary["rows"]["hybrid_tabular"]["auc"] == pytest.approx(np.mean(per_seed), abs=1e-4)
    assert "hybrid_tabular_minus_fusion" in results["protocols"]["leave-last-out"]["intervals"]
    # The hybrid's parts, each ranked alone: the LLM part is the score itself, the head part noise.
    parts = rows["hybrid_tabular"]["parts"]
    assert parts["llm_logit"]["all"]["auc"] == pytest.approx(rows["hybrid_tabular"]["all"]["auc"], abs=2e-4)  # rounded
    assert abs(parts["head_logit"]["all"]["auc"] - 0.5) < 0.1
    assert rows["llm_only"]["parts"] is None
    assert "↳ its LLM logit alone" in (out / "hybrid_rows.md").read_text()


def test_score_files_of_other_rows_are_refused(first_run, tmp_path):
    work, _ = first_run
    rows = split_rows(work / "leave-last-out_u80" / "data", "test")[["group_id", "user_id", "item_id", "label"]]
    wrong = tmp_path / "wrong.scores.parquet"
    rows.iloc[:-1].assign(score=0.5).to_parquet(wrong, index=False)
    with pytest.raises(ValueError, match="scored different rows"):
        run_benchmark(RUN_HYBRID, [*FAST, "--work", str(work), "--out", str(tmp_path),
                         "--llm-scores", "leave-last-out", "hybrid_tokens", str(wrong)])
    with pytest.raises(SystemExit, match="row must be one of"):
        run_benchmark(RUN_HYBRID, [*FAST, "--work", str(work), "--out", str(tmp_path),
                         "--llm-scores", "leave-last-out", "fusion", str(wrong)])

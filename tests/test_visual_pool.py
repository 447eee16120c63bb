"""Pooling replicates of the visual check (``python -m benchmarks.visual.pool_replicates``) on written run folders.

Each fake replicate is laid out like a finished ``run_visual.py`` run: ``results/results.json``
with the run's settings and ``eval/MLLM-MSR_<arm>.scores.parquet`` with each arm's test scores.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from merlin_mllm.metrics import auc
from tests.benchmark_support import run_benchmark

POOL = "benchmarks.visual.pool_replicates"


def _write_run(folder: Path, seed: int, strength: float, *, epochs: int = 3, text_rows: int | None = None) -> Path:
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(30), 21)
    labels = np.tile(np.r_[1, np.zeros(20, dtype=int)], 30)
    items = np.tile(np.arange(21), 30)
    (folder / "results").mkdir(parents=True)
    (folder / "eval").mkdir()
    settings = {"seed": seed, "cache": str(folder), "results_dir": str(folder / "results"), "users": 30, "epochs": epochs}
    (folder / "results" / "results.json").write_text(json.dumps({"settings": settings}))
    scores = {"image": rng.normal(size=labels.size) + strength * labels, "text": rng.normal(size=labels.size)}
    for arm, score in scores.items():
        frame = pd.DataFrame({"group_id": groups, "item_id": items, "label": labels, "score": score})
        frame.to_parquet(folder / "eval" / f"MLLM-MSR_{arm}.scores.parquet")
    if text_rows is not None:
        frame.iloc[:text_rows].to_parquet(folder / "eval" / "MLLM-MSR_text.scores.parquet")
    return folder / "results" / "results.json"


def test_pools_two_seeds_and_writes_the_table(tmp_path):
    a, b = _write_run(tmp_path / "a", 0, 1.0), _write_run(tmp_path / "b", 1, 0.5)
    run_benchmark(POOL, ["--results", str(a), str(b), "--out", str(tmp_path / "out"), "--resamples", "300"])
    result = json.loads((tmp_path / "out" / "replicates.json").read_text())
    per_run = []
    for folder in (a.parent.parent, b.parent.parent):
        image = pd.read_parquet(folder / "eval" / "MLLM-MSR_image.scores.parquet")
        text = pd.read_parquet(folder / "eval" / "MLLM-MSR_text.scores.parquet")
        per_run.append(auc(image["label"], image["score"]) - auc(text["label"], text["score"]))
    assert [r["image_minus_text"]["difference"] for r in result["replicates"]] == pytest.approx(per_run)
    assert result["pooled"]["difference"] == pytest.approx(np.mean(per_run))
    assert result["pooled"]["groups"] == 60 and result["pooled"]["per_stratum"] == pytest.approx(per_run)
    assert result["pooled"]["low"] > 0  # both replicates' image scores see the label
    written = json.loads((tmp_path / "out" / "replicates.json").read_text())
    assert written["pooled"]["difference"] == pytest.approx(result["pooled"]["difference"])
    table = (tmp_path / "out" / "replicates.md").read_text()
    assert "**pooled** (2 replicates) | 60 |" in table and "epochs=3" in table


def test_refuses_replicates_that_differ_in_more_than_the_seed(tmp_path):
    a, b = _write_run(tmp_path / "a", 0, 1.0), _write_run(tmp_path / "b", 1, 1.0, epochs=5)
    with pytest.raises(ValueError, match=r"differs .* in \['epochs'\]"):
        run_benchmark(POOL, ["--results", str(a), str(b), "--out", str(tmp_path / "out")])
    c = _write_run(tmp_path / "c", 0, 1.0)
    with pytest.raises(ValueError, match="distinct seeds"):
        run_benchmark(POOL, ["--results", str(a), str(c), "--out", str(tmp_path / "out")])


def test_names_the_run_whose_arms_scored_different_rows(tmp_path):
    a, b = _write_run(tmp_path / "a", 0, 1.0), _write_run(tmp_path / "b", 1, 1.0, text_rows=100)
    with pytest.raises(ValueError, match=f"{b}: image and text scored different rows"):
        run_benchmark(POOL, ["--results", str(a), str(b), "--out", str(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match="results.json not found"):
        run_benchmark(POOL, ["--results", str(a), str(tmp_path / "d" / "results.json"), "--out", str(tmp_path / "out")])
    (b.parent.parent / "eval" / "MLLM-MSR_image.scores.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="the image arm of .* has not been scored"):
        run_benchmark(POOL, ["--results", str(a), str(b), "--out", str(tmp_path / "out")])

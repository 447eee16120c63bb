"""The ablation's cost bookkeeping: a stage stopped and resumed costs the sum of its invocations,
and a run folder on a new machine does not erase the stages its committed record already holds."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

import pytest

from benchmarks.quality import llm_inputs
from benchmarks.quality.train_llm_rows import timed_stage


def test_a_stopped_stage_resumed_costs_the_sum_of_its_runs(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with timed_stage(tmp_path, "train"):
            raise KeyboardInterrupt
    stopped = json.loads((tmp_path / "stages.json").read_text())["train"]
    assert stopped["runs"] == 1 and stopped["finished"] is False

    with timed_stage(tmp_path, "train"):
        sum(range(200_000))
    resumed = json.loads((tmp_path / "stages.json").read_text())["train"]
    assert resumed["runs"] == 2 and resumed["finished"] is True
    assert resumed["wall_s"] >= stopped["wall_s"] and resumed["cpu_s"] >= stopped["cpu_s"]

    # Run again after it finished (a retrain from scratch): a new entry, not a third resumption.
    with timed_stage(tmp_path, "train"):
        pass
    assert json.loads((tmp_path / "stages.json").read_text())["train"]["runs"] == 1


def test_keeping_a_record_merges_stage_costs(tmp_path, monkeypatch):
    monkeypatch.setattr(llm_inputs, "RECORDS", tmp_path / "records")
    work = tmp_path / "work"
    kept = llm_inputs.record_dir("ratings", "hybrid", 43)
    kept.mkdir(parents=True)
    (kept / "stages.json").write_text(json.dumps({"train": {"wall_s": 900.0, "cpu_s": 1800.0},
                                                  "valid": {"wall_s": 120.0, "cpu_s": 230.0}}))
    # This machine retrained and scored test; it never ran valid.
    run = llm_inputs.run_dir(work, "ratings", "hybrid", 43)
    run.mkdir(parents=True)
    (run / "stages.json").write_text(json.dumps({"train": {"wall_s": 950.0, "cpu_s": 1900.0},
                                                 "test": {"wall_s": 480.0, "cpu_s": 930.0}}))
    llm_inputs.keep_record(work, "ratings", "hybrid", 43)
    merged = json.loads((kept / "stages.json").read_text())
    assert merged == {"train": {"wall_s": 950.0, "cpu_s": 1900.0}, "valid": {"wall_s": 120.0, "cpu_s": 230.0},
                      "test": {"wall_s": 480.0, "cpu_s": 930.0}}
    assert llm_inputs.stage_costs(work, "ratings", "hybrid", 43) == merged


def _arm_with_valid(per_seed: dict) -> dict:
    return {"kinds": {"hybrid": {"valid_auc_per_seed": per_seed}}}


def test_the_best_arm_is_chosen_on_valid_over_every_test_seed():
    seeds = llm_inputs.TEST_SEEDS
    assert llm_inputs.valid_mean(_arm_with_valid({s: 0.7 + 0.01 * i for i, s in enumerate(seeds)})) == 0.71
    # One seed's valid is missing: no mean, so no arm is chosen from a partial view.
    assert llm_inputs.valid_mean(_arm_with_valid({seeds[0]: 0.9})) is None


def test_the_default_changes_only_when_the_test_interval_is_above_zero():
    assert llm_inputs.default_arm("ratings", {"diff": -0.0007, "low": -0.0056, "high": 0.0046}) == "titles"
    assert llm_inputs.default_arm("ratings", {"diff": 0.008, "low": 0.0016, "high": 0.015}) == "ratings"
    assert llm_inputs.default_arm("ratings", {"diff": 0.004, "low": 0.0, "high": 0.008}) == "titles"
    assert llm_inputs.default_arm(None, None) == "titles"
    assert llm_inputs.default_arm("ratings", None) == "titles"  # no test scores yet


def _scores(seed: int, users: int = 40) -> pd.DataFrame:
    """Two candidates per user; the seed decides how well the score ranks the positive."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(users):
        for label in (1, 0):
            rows.append({"group_id": user, "user_id": user, "item_id": label, "label": label,
                         "score": rng.normal() + (seed - 40) * 0.3 * label})
    return pd.DataFrame(rows)


def test_a_seed_pending_on_one_side_is_not_paired_across_seeds():
    titles = {s: _scores(s) for s in (42, 43, 44)}
    arm_one_seed = {42: _scores(142)}
    pending = llm_inputs.difference(arm_one_seed, titles, 200, "arm - titles")
    alone = llm_inputs.difference(arm_one_seed, {42: titles[42]}, 200, "arm - titles")
    assert pending["seeds"] == [42] and pending["strata"] == 1
    assert pending == alone
    # The seed-free non-LLM row pairs with every seed of the arm.
    against_non_llm = llm_inputs.difference(titles, [_scores(7)], 200, "titles - non-LLM")
    assert against_non_llm["seeds"] == [42, 43, 44] and against_non_llm["strata"] == 3
    assert llm_inputs.difference({43: _scores(1)}, {42: titles[42]}, 200, "no shared seed") is None

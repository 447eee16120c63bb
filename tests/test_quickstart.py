"""The main job end to end, on the real embedded models, at a tiny size: every stage runs on the
timeline protocol (each user drawn among those with an event at or after T_test a test group,
the others' past before T_valid the training groups), the hybrid is trained and evaluated beside
popularity, SASRec and its own LLM part, each AUC with a bootstrap interval that contains it, the
live Triton server answers (given the retrieval scores) with the scores that evaluate computed,
report.md is written, and a second run reuses every cached stage."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from merlin_mllm.metrics import auc
from merlin_mllm.quickstart import HYBRID, LLM_PART, POPULARITY, SASREC, Quickstart, QuickstartSettings

pytestmark = pytest.mark.slow

USERS = 10
#: Of the USERS, drawn among the users with an event at or after T_test.
TEST_USERS = 6
ROWS = (HYBRID, LLM_PART, SASREC, POPULARITY)


@pytest.fixture(scope="module")
def first_and_second_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    settings = QuickstartSettings(out=out, max_users=USERS, test_users=TEST_USERS, max_history=6, max_new_tokens=12,
                                  batch_size=16, epochs=1)
    first = Quickstart(settings).run()
    # The second run stops at the export: a second Triton start would check nothing the first did not.
    second = Quickstart(settings).run(serve=False)
    return out, first, second


def test_every_stage_runs_and_the_report_has_all_rows(first_and_second_run):
    out, first, _ = first_and_second_run
    assert [s.name for s in first] == ["data", "item summaries", "user summaries", "features", "train", "evaluate",
                                       "export", "triton"]
    assert not any(s.cached for s in first)
    # One test group per test user, unless its target had no earlier event (ties); training groups too.
    data = json.loads((out / "data" / "report.json").read_text())
    groups = data["users_per_split"]["test"]
    assert groups + data["targets_without_history"]["test"] == TEST_USERS and groups >= TEST_USERS - 2
    assert data["users_per_split"]["train"] > 0
    cuts = data["cuts"]
    assert "timeline protocol, cut at T_valid " in first[0].summary and f"{groups} test groups" in first[0].summary
    assert cuts["test"]["date"][:10] in first[0].summary and cuts["valid"]["date"][:10] in first[0].summary
    # only the items of the users' events are summarised, and every user summary step finds them
    assert "items of the users' events" in first[1].summary and "items without summary" not in first[2].summary
    report = (out / "report.md").read_text()
    assert f"Protocol: timeline protocol, cut at T_valid {cuts['valid']['date'][:10]}" in report
    for row in ROWS:
        found = re.search(rf"^\| {re.escape(row)} \| ([01]\.\d{{3}}) \| \[([01]\.\d{{3}}), ([01]\.\d{{3}})\] \|",
                          report, re.M)
        assert found, row
        point, low, high = map(float, found.groups())
        assert low <= point <= high, (row, point, low, high)
    # the hybrid against each other row, paired over the same users
    for row in ROWS[1:]:
        assert re.search(rf"^\| {re.escape(row)} \| [+-]\d\.\d{{3}} \| \[[+-]\d\.\d{{3}}, [+-]\d\.\d{{3}}\] \|$",
                         report, re.M), row
    assert f"over the {groups} test users" in report
    assert (out / "report_metrics.png").stat().st_size > 10_000
    # Every row was scored on the same test groups: one per test user.
    files = ("hybrid.json", "hybrid_llm.json", "sasrec.json", "popularity.json")
    assert {json.loads((out / "eval" / f).read_text())["n_groups"] for f in files} == {groups}


def test_rows_are_what_they_say(first_and_second_run):
    out, _, _ = first_and_second_run
    hybrid = pd.read_parquet(out / "eval" / "hybrid.scores.parquet")
    np.testing.assert_allclose(hybrid["score"], 1 / (1 + np.exp(-(hybrid["llm_logit"] + hybrid["head_logit"]))),
                               rtol=0, atol=1e-12)
    # the LLM part: the hybrid's own llm_logit column, ranked alone
    llm = json.loads((out / "eval" / "hybrid_llm.json").read_text())
    assert llm["auc"] == pytest.approx(auc(hybrid["label"], hybrid["llm_logit"]), abs=1e-12)
    # SASRec: the retrieval_score feature the hybrid was evaluated with
    features = pd.read_parquet(out / "features" / "test.parquet")
    sasrec = json.loads((out / "eval" / "sasrec.json").read_text())
    assert sasrec["auc"] == pytest.approx(auc(features["label"], features["retrieval_score"]), abs=1e-12)
    assert (out / "ranker" / "model" / "hybrid_head.safetensors").is_file()
    assert json.loads((out / "triton_repo" / "export.json").read_text())["hybrid"]["retrieval_input"] == "retrieval_scores"


def test_live_triton_answer_equals_in_process_scores(first_and_second_run):
    out, first, _ = first_and_second_run
    triton = next(s for s in first if s.name == "triton")
    diff = float(re.search(r"max score diff vs evaluate ([0-9.e+-]+)", triton.summary).group(1))
    assert diff <= 1e-5
    report = (out / "report.md").read_text()
    assert "with SASRec's retrieval_scores" in report
    ranked = re.findall(r"^\s+(\d+)\. (0\.\d{4})  ", report, re.M)
    assert [int(r) for r, _ in ranked] == list(range(1, len(ranked) + 1)) and len(ranked) == 10
    served = [float(s) for _, s in ranked]
    assert served == sorted(served, reverse=True)
    # The top served score is the best in-process score of that user's group.
    scores = pd.read_parquet(out / "eval" / "hybrid.scores.parquet")
    group = scores[scores["group_id"] == scores["group_id"].iloc[0]]
    assert abs(group["score"].max() - served[0]) < 1e-4


def test_second_run_reuses_every_cached_stage(first_and_second_run):
    _, first, second = first_and_second_run
    by_name = {s.name: s for s in second}
    for name in ("data", "features", "train", "evaluate", "export"):
        assert by_name[name].cached, name
    # Summaries go through the store: nothing is generated again.
    for name in ("item summaries", "user summaries"):
        assert re.search(r"\bgenerated 0,", by_name[name].summary), by_name[name].summary
    assert [s.name for s in second] == [s.name for s in first if s.name != "triton"]
    assert sum(s.seconds for s in second) < 0.5 * sum(s.seconds for s in first if s.name != "triton")


def test_a_run_on_other_data_is_rebuilt_keeping_the_summary_store(tmp_path):
    """An --out from an older quickstart (the paper protocol) is not reused."""
    out = tmp_path / "old"
    (out / "data").mkdir(parents=True)
    (out / "data" / "report.json").write_text(json.dumps({"protocol": "paper", "seed": 42,
                                                          "settings": {"max_users": USERS, "max_history": 6}}))
    (out / "ranker" / "model").mkdir(parents=True)
    (out / "ranker" / "model" / "ranker_config.json").write_text("{}")
    (out / "summaries").mkdir()
    (out / "summaries" / "segment").write_text("kept")
    quickstart = Quickstart(QuickstartSettings(out=out, max_users=USERS, test_users=TEST_USERS, max_history=6))
    quickstart.prepare_data()
    assert not quickstart.stages[0].cached and "timeline protocol" in quickstart.stages[0].summary
    assert json.loads((out / "data" / "report.json").read_text())["protocol"] == "timeline"
    assert not (out / "ranker").exists()
    assert (out / "summaries" / "segment").read_text() == "kept"
    quickstart.prepare_data()
    assert quickstart.stages[1].cached

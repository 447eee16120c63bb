"""The main job end to end, on the real embedded models, at a tiny size: every stage runs, the
live Triton server answers with the scores that evaluate computed, report.md is written, and a
second run reuses every cached stage."""
from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from merlin_mllm.quickstart import Quickstart, QuickstartSettings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def first_and_second_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    settings = QuickstartSettings(out=out, max_users=10, max_history=6, max_new_tokens=12, batch_size=16, epochs=1)
    first = Quickstart(settings).run()
    second = Quickstart(settings).run()
    return out, first, second


def test_every_stage_runs_and_the_report_has_all_rows(first_and_second_run):
    out, first, _ = first_and_second_run
    assert [s.name for s in first] == ["data", "item summaries", "user summaries", "train", "evaluate",
                                       "export", "triton"]
    assert not any(s.cached for s in first)
    report = (out / "report.md").read_text()
    for row in ("MLLM-MSR (SFT)", "MLLM-MSR zero-shot", "popularity"):
        assert re.search(rf"^\| {re.escape(row)} \| [01]\.\d{{3}} \|", report, re.M), row
    assert (out / "report_metrics.png").stat().st_size > 10_000
    # Popularity and the two MLLM rows were scored on the same test groups.
    groups = {json.loads((out / "eval" / f).read_text())["n_groups"] for f in ("sft.json", "zero_shot.json", "popularity.json")}
    assert len(groups) == 1


def test_live_triton_answer_equals_in_process_scores(first_and_second_run, capsys):
    out, first, _ = first_and_second_run
    triton = next(s for s in first if s.name == "triton")
    diff = float(re.search(r"max score diff vs evaluate ([0-9.e+-]+)", triton.summary).group(1))
    assert diff <= 1e-5
    report = (out / "report.md").read_text()
    ranked = re.findall(r"^\s+(\d+)\. (0\.\d{4})  ", report, re.M)
    assert [int(r) for r, _ in ranked] == list(range(1, len(ranked) + 1)) and len(ranked) == 10
    served = [float(s) for _, s in ranked]
    assert served == sorted(served, reverse=True)
    # The top served score is the best in-process score of that user's group.
    scores = pd.read_parquet(out / "eval" / "sft.scores.parquet")
    group = scores[scores["group_id"] == scores["group_id"].iloc[0]]
    assert abs(group["score"].max() - served[0]) < 1e-4


def test_second_run_reuses_every_cached_stage(first_and_second_run):
    _, first, second = first_and_second_run
    by_name = {s.name: s for s in second}
    for name in ("data", "train", "evaluate", "export"):
        assert by_name[name].cached, name
    # Summaries go through the store: nothing is generated again.
    for name in ("item summaries", "user summaries"):
        assert re.search(r"\bgenerated 0,", by_name[name].summary), by_name[name].summary
    assert sum(s.seconds for s in second if s.name != "triton") < 0.5 * sum(s.seconds for s in first if s.name != "triton")

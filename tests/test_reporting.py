"""The report's protocol line: the protocol by name and, on the timeline, both cut times as prepared."""
from __future__ import annotations

from merlin_mllm.data.prepare import prepare_dataset
from merlin_mllm.reporting import protocol_summary


def test_protocol_summary_names_the_cuts_of_a_timeline_folder(tmp_path):
    report = prepare_dataset("ml-100k", "timeline", tmp_path / "q", max_users=20, seed=1, n_negatives_test=5,
                             valid_cut_quantile=0.65)
    line = protocol_summary(report)
    valid, test = report["cuts"]["valid"]["date"], report["cuts"]["test"]["date"]
    assert line == (f"timeline protocol, cut at T_valid {valid[:10]} {valid[11:16]} UTC (65% quantile of the event "
                    f"times) and T_test {test[:10]} {test[11:16]} UTC (80% quantile of the event times)")
    fixed = prepare_dataset("ml-100k", "timeline", tmp_path / "t", max_users=20, seed=1, n_negatives_test=5,
                            valid_cut=report["cuts"]["valid"]["timestamp"], test_cut=report["cuts"]["test"]["timestamp"])
    assert protocol_summary(fixed) == line.replace("65% quantile of the event times", "set as a timestamp").replace(
        "80% quantile of the event times", "set as a timestamp")


def test_protocol_summary_of_a_folder_without_cuts(tmp_path):
    report = prepare_dataset("ml-100k", "leave-last-out", tmp_path, max_users=10, seed=1, n_negatives_test=5)
    assert protocol_summary(report) == "leave-last-out protocol"

"""The global-timeline protocol's settings (cuts, defaults, report) and the ``temporal`` alias.

The leakage checks of the folders themselves are in ``tests/test_leakage_audit.py``.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from datetime import datetime, timezone

import numpy as np
import pytest

from merlin_mllm.data.prepare import prepare_dataset
from merlin_mllm.data.splits import split_cuts
from merlin_mllm.data.tables import read_table


def _hashes(out):
    files = sorted(out.glob("*/*.parquet")) + sorted(out.glob("*/schema.pbtxt"))
    return {str(path.relative_to(out)): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


def test_temporal_is_a_warning_alias_of_leave_last_out(tmp_path):
    with pytest.warns(FutureWarning, match="leave-last-out"):
        old = prepare_dataset("ml-100k", "temporal", tmp_path / "old", max_users=20, seed=3, n_negatives_test=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the new name is not deprecated
        new = prepare_dataset("ml-100k", "leave-last-out", tmp_path / "new", max_users=20, seed=3, n_negatives_test=5)
    assert old == new and old["protocol"] == "leave-last-out"
    assert _hashes(tmp_path / "old") == _hashes(tmp_path / "new") and len(_hashes(tmp_path / "new")) == 12
    assert split_cuts(tmp_path / "new") is None


def test_timeline_cuts_by_quantile_and_by_timestamp(tmp_path):
    report = prepare_dataset("ml-100k", "timeline", tmp_path / "q", max_users=80, seed=2, n_negatives_test=5,
                             valid_cut_quantile=0.6, test_cut_quantile=0.75)
    cuts = report["cuts"]
    assert report["settings"]["max_history"] == 0  # timeline keeps every event by default
    assert cuts["valid"]["quantile"] == 0.6 and cuts["test"]["quantile"] == 0.75
    assert cuts["valid"]["timestamp"] < cuts["test"]["timestamp"]
    for name in ("valid", "test"):
        stamp = cuts[name]["timestamp"]
        assert cuts[name]["date"] == datetime.fromtimestamp(stamp, tz=timezone.utc).isoformat()
    # The quantiles are of the k-core events' times (all 943 users, not only the 80 chosen).
    assert abs(cuts["test"]["fraction_of_k_core_events_before"] - 0.75) < 0.01
    assert split_cuts(tmp_path / "q") == (cuts["valid"]["timestamp"], cuts["test"]["timestamp"])
    test = read_table(tmp_path / "q" / "test")
    assert (test["timestamp"] >= cuts["test"]["timestamp"]).all()
    assert report["users_per_split"]["test"] == test["user_id"].nunique() == test["group_id"].nunique()

    fixed = prepare_dataset("ml-100k", "timeline", tmp_path / "t", max_users=80, seed=2, n_negatives_test=5,
                            valid_cut=cuts["valid"]["timestamp"], test_cut=cuts["test"]["timestamp"])
    assert fixed["cuts"]["valid"]["quantile"] is None and fixed["cuts"]["test"]["quantile"] is None
    assert fixed["cuts"]["test"]["timestamp"] == cuts["test"]["timestamp"]
    assert _hashes(tmp_path / "t") == _hashes(tmp_path / "q")


def test_timeline_reports_targets_without_history(tmp_path):
    report = prepare_dataset("ml-100k", "timeline", tmp_path, max_users=100, seed=4, n_negatives_test=5)
    skipped = report["targets_without_history"]
    assert set(skipped) == {"train", "valid", "test"} and all(isinstance(n, int) and n >= 0 for n in skipped.values())
    # Every user with a test-window event is a test group, unless its target had no history.
    events = read_table(tmp_path / "events")
    in_window = events.loc[events["timestamp"] >= report["cuts"]["test"]["timestamp"], "user_id"].nunique()
    assert report["users_per_split"]["test"] + skipped["test"] == in_window


@pytest.mark.parametrize("settings, message", [
    ({"valid_cut_quantile": 0.9, "test_cut_quantile": 0.8}, "before"),
    ({"valid_cut": 10, "valid_cut_quantile": 0.5}, "not both"),
    ({"test_cut_quantile": 1.5}, "quantile"),
])
def test_timeline_rejects_bad_cuts(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        prepare_dataset("ml-100k", "timeline", tmp_path, max_users=10, **settings)


def test_cuts_are_for_the_timeline_only(tmp_path):
    with pytest.raises(ValueError, match="timeline"):
        prepare_dataset("ml-100k", "leave-last-out", tmp_path, max_users=10, test_cut_quantile=0.8)


def test_cli_prepare_timeline_writes_the_cuts(tmp_path):
    from typer.testing import CliRunner

    from merlin_mllm.cli import app

    out = tmp_path / "tl"
    result = CliRunner().invoke(app, ["data", "prepare", "--dataset", "ml-100k", "--protocol", "timeline",
                                      "--out", str(out), "--max-users", "40", "--seed", "1",
                                      "--valid-cut-quantile", "0.65", "--test-cut-quantile", "0.8",
                                      "--test-users", "20"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["protocol"] == "timeline" and report["settings"]["max_history"] == 0
    assert report["settings"]["test_users"] == 20
    assert report["users_per_split"]["test"] + report["targets_without_history"]["test"] == 20
    assert report["cuts"]["valid"]["quantile"] == 0.65 and report["cuts"]["test"]["quantile"] == 0.8
    assert split_cuts(out).valid == report["cuts"]["valid"]["timestamp"]
    assert np.all(read_table(out / "valid")["timestamp"] >= report["cuts"]["valid"]["timestamp"])


def test_test_users_draws_that_many_users_waiting_at_the_test_cut(tmp_path):
    """``test_users``: that many of the sample have an event at or after T_test (each a test group unless
    its target has no history), the others none; the default draw is unchanged by the option."""
    report = prepare_dataset("ml-100k", "timeline", tmp_path / "s", max_users=30, test_users=12, max_history=6,
                             seed=5, n_negatives_test=5)
    assert report["settings"]["test_users"] == 12 and report["kept"]["users"] == 30
    cut = report["cuts"]["test"]["timestamp"]
    events = read_table(tmp_path / "s" / "events")
    last = events.groupby("user_id")["timestamp"].max()
    assert (last >= cut).sum() == 12  # the latest event survives max_history, so each keeps its test target
    assert report["users_per_split"]["test"] + report["targets_without_history"]["test"] == 12
    assert report["users_per_split"]["train"] > 0
    # A uniform draw of the same size holds far fewer test users (ML-100k: 303 of 943 users).
    uniform = prepare_dataset("ml-100k", "timeline", tmp_path / "u", max_users=30, max_history=6, seed=5,
                              n_negatives_test=5)
    assert uniform["settings"]["test_users"] == 0
    assert uniform["users_per_split"]["test"] + uniform["targets_without_history"]["test"] < 12
    # Seeded: the same settings give the same folder.
    again = prepare_dataset("ml-100k", "timeline", tmp_path / "again", max_users=30, test_users=12, max_history=6,
                            seed=5, n_negatives_test=5)
    assert again == report and _hashes(tmp_path / "again") == _hashes(tmp_path / "s")


@pytest.mark.parametrize("protocol, settings, message", [
    ("leave-last-out", {"max_users": 10, "test_users": 5}, "timeline protocol only"),
    ("timeline", {"max_users": 0, "test_users": 5}, "max_users >= test_users"),
    ("timeline", {"max_users": 10, "test_users": 11}, "max_users >= test_users"),
    ("timeline", {"max_users": 10, "test_users": -1}, "integer >= 0"),
    ("timeline", {"max_users": 900, "test_users": 400}, "400 users asked for with an event at or after the test "
                                                        r"cut, but there are only 30\d"),
])
def test_test_users_rejects_what_it_cannot_draw(tmp_path, protocol, settings, message):
    with pytest.raises(ValueError, match=message):
        prepare_dataset("ml-100k", protocol, tmp_path, **settings)
    assert not tmp_path.joinpath("report.json").exists()

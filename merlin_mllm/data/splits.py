"""A prepared folder's split rows and its training-time events: what every scorer may count.

Training-time events, for ``split`` S. Split order is train < valid < test.

Timeline folders (``report.json`` has ``cuts``; :func:`split_cuts` reads them):

* S = test: every event with a timestamp before ``T_test``;
* S = valid: every event before ``T_valid``;
* S = train: every event before ``T_valid``, less, for each user with training rows, the user's
  events at or after the time of its earliest training target. No training target is seen by
  what scores the training rows. Other users' events after a training row's time (all before
  ``T_valid``) are still counted for it: one shared set of events serves every training row.

Valid and test rows are therefore scored from events that had all happened before any of them.

Paper and leave-last-out folders: an event is counted unless it is at or after the time of a
target of S or of a later split for the same user. For each user the cut-off is the smallest
``target_position`` among that user's rows in S and the later splits (``target_position``
counts the user's events strictly before the target's time, so events in the target's own
second are dropped too); the user's events with ``position`` < cut-off are kept, and all events
of a user with no such row are kept:

* paper protocol, S = test: all events of train and valid users (their train/valid targets
  included), and each test user's history before its test target. No test target is counted.
* leave-last-out protocol, S = test: every user's events before its last event's time.
* S = valid also drops the valid targets (and, in the paper protocol, the test users' targets).

Popularity therefore never counts the interaction it is asked to predict, and the ranker's own
user prompts see the same per-user histories (``history_item_ids`` are the events strictly
before the target's time). But this is not what a deployed system would have logged: a test
row's counts include other users' events logged after that row's own time (on ML-100k, for the
median leave-last-out test row, about half of them). Only the timeline rule keeps every counted
event before every row of the valid and test splits.

Both the baselines and the hybrid ranker's features (training), and the export (serving) read
them from here, so served features are counted from the events the test rows' features were.

Usage::

    from merlin_mllm.data.splits import split_rows, training_events
    events = training_events("data/ml100k", "test")   # see the rule above
    cuts = split_cuts("data/ml100k_timeline")          # SplitCuts(valid=..., test=...), or None
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple, Optional, Union

import pandas as pd

from merlin_mllm.data.tables import read_table

__all__ = ["SPLIT_ORDER", "ROW_COLUMNS", "SplitCuts", "read_prepared", "split_cuts", "split_rows",
           "training_events"]

SPLIT_ORDER = ("train", "valid", "test")
ROW_COLUMNS = ["group_id", "user_id", "item_id", "label", "target_position"]

PathLike = Union[str, os.PathLike]


def read_prepared(path: Path, what: str) -> pd.DataFrame:
    """A table of a prepared folder; a FileNotFoundError naming ``what`` when it is absent."""
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path} (expected the output of prepare_dataset)")
    return read_table(path)


class SplitCuts(NamedTuple):
    """A timeline folder's cut times (the data's timestamp unit): ``valid`` = T_valid, ``test`` = T_test."""

    valid: int
    test: int


def split_cuts(data_dir: PathLike) -> Optional[SplitCuts]:
    """The cut times of a timeline folder, from its ``report.json``; ``None`` for other protocols.

    Raises
    ------
    FileNotFoundError
        If the folder has no ``report.json``.
    """
    path = Path(data_dir) / "report.json"
    if not path.exists():
        raise FileNotFoundError(f"report not found: {path} (expected the output of prepare_dataset)")
    cuts = json.loads(path.read_text()).get("cuts")
    if cuts is None:
        return None
    return SplitCuts(int(cuts["valid"]["timestamp"]), int(cuts["test"]["timestamp"]))


def _check_split(split: str) -> None:
    if split not in SPLIT_ORDER:
        raise ValueError(f"split must be one of {SPLIT_ORDER}, got {split!r}")


def split_rows(data_dir: PathLike, split: str = "test") -> pd.DataFrame:
    """The rows of ``split`` (group_id, user_id, item_id, label, target_position, history_item_ids).

    Raises
    ------
    ValueError
        If a column is missing (naming the folder) or the split is unknown.
    """
    _check_split(split)
    path = Path(data_dir) / split
    rows = read_prepared(path, f"split {split!r}")
    missing = [c for c in ROW_COLUMNS if c not in rows.columns]
    if missing:
        raise ValueError(f"{path}: rows lack column(s) {missing}")
    return rows


def training_events(data_dir: PathLike, split: str = "test") -> pd.DataFrame:
    """The events available before ``split`` is scored (see the module docstring for the rule).

    Parameters
    ----------
    data_dir : path
        Output of ``prepare_dataset`` (``events/`` and the split folders).
    split : str
        ``"train"``, ``"valid"`` or ``"test"``.

    Returns
    -------
    DataFrame
        The kept rows of ``events/`` (user_id, item_id, position, ...), sorted by user and position.
    """
    _check_split(split)
    data_dir = Path(data_dir)
    events = read_prepared(data_dir / "events", "events table")
    for column in ("user_id", "item_id", "position"):
        if column not in events.columns:
            raise ValueError(f"{data_dir / 'events'}: events lack column {column!r}")
    cuts = split_cuts(data_dir) if (data_dir / "report.json").exists() else None
    if cuts is not None:
        return _timeline_events(data_dir, events, split, cuts)
    later = SPLIT_ORDER[SPLIT_ORDER.index(split):]
    cutoffs = [split_rows(data_dir, s)[["user_id", "target_position"]] for s in later if (data_dir / s).exists()]
    if split not in [s for s in later if (data_dir / s).exists()]:
        raise FileNotFoundError(f"split folder not found: {data_dir / split}")
    cutoff = pd.concat(cutoffs, ignore_index=True).groupby("user_id")["target_position"].min()
    limit = events["user_id"].map(cutoff)
    keep = limit.isna().to_numpy() | (events["position"].to_numpy() < limit.fillna(0).to_numpy())
    return events[keep].sort_values(["user_id", "position"], kind="stable").reset_index(drop=True)


def _timeline_events(data_dir: Path, events: pd.DataFrame, split: str, cuts: SplitCuts) -> pd.DataFrame:
    """The timeline rule of the module docstring."""
    if not (data_dir / split).exists():
        raise FileNotFoundError(f"split folder not found: {data_dir / split}")
    if "timestamp" not in events.columns:
        raise ValueError(f"{data_dir / 'events'}: events lack column 'timestamp'")
    limit = pd.Series(cuts.test if split == "test" else cuts.valid, index=events.index)
    if split == "train":
        train = split_rows(data_dir, "train")
        first = train.groupby("user_id")["target_position"].min()  # events strictly before its time
        own = events["user_id"].map(first)
        keep = (events["timestamp"] < limit) & (own.isna() | (events["position"] < own.fillna(0)))
    else:
        keep = events["timestamp"] < limit
    return events[keep.to_numpy()].sort_values(["user_id", "position"], kind="stable").reset_index(drop=True)

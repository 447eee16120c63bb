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

A job that reads a folder's tables in several places opens it once as :class:`PreparedTables` and
passes that down: it is a path (``os.PathLike``) to anything that takes ``data_dir``, and the
functions here, given one, read each table from disk once.

Usage::

    from merlin_mllm.data.splits import PreparedTables, split_rows, training_events
    data = PreparedTables("data/ml100k")             # reads nothing yet
    data.items, data.split("test")                   # each read on first use, then shared
    events = training_events(data, "test")            # see the rule above (a path works too)
    cuts = split_cuts("data/ml100k_timeline")          # SplitCuts(valid=..., test=...), or None
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple, Optional, Union

import pandas as pd

from merlin_mllm.data.tables import read_named_table

__all__ = ["SPLIT_ORDER", "ROW_COLUMNS", "PreparedTables", "prepared_tables", "SplitCuts", "read_prepared",
           "split_cuts", "split_rows", "training_events"]

SPLIT_ORDER = ("train", "valid", "test")
ROW_COLUMNS = ["group_id", "user_id", "item_id", "label", "target_position"]

PathLike = Union[str, os.PathLike]


def read_prepared(path: Path, what: str) -> pd.DataFrame:
    """A table of a prepared folder; a FileNotFoundError naming ``what`` when it is absent."""
    return read_named_table(path, what, hint="expected the output of prepare_dataset")


class PreparedTables(os.PathLike):
    """A prepared folder whose tables are each read once, on first use, and then shared.

    It is also the folder's path (``os.fspath``, ``Path(tables)``), so it can be passed wherever a
    ``data_dir`` is taken; the readers of this package (and those that call
    :func:`prepared_tables`) then use its tables instead of reading the files again.

    Parameters
    ----------
    folder : path
        Output of ``prepare_dataset``.
    """

    def __init__(self, folder: PathLike):
        self.folder = Path(folder)
        self._tables: dict = {}

    def __fspath__(self) -> str:
        return os.fspath(self.folder)

    def __str__(self) -> str:
        # Messages that name ``data_dir`` keep naming the folder.
        return str(self.folder)

    def __repr__(self) -> str:
        return f"PreparedTables({str(self.folder)!r}, read={sorted(self._tables)})"

    def table(self, name: str, what: Optional[str] = None) -> pd.DataFrame:
        """The table ``name`` (``"items"``, ``"events"``, ``"users"`` or a split), a copy of the
        one read; a FileNotFoundError naming ``what`` (default: the name) when it is absent."""
        if name not in self._tables:
            self._tables[name] = read_prepared(self.folder / name, what or f"{name} table")
        return self._tables[name].copy()

    @property
    def items(self) -> pd.DataFrame:
        return self.table("items", "items table")

    @property
    def events(self) -> pd.DataFrame:
        return self.table("events", "events table")

    def split(self, split: str) -> pd.DataFrame:
        """The rows of ``split``, checked as :func:`split_rows` checks them."""
        _check_split(split)
        rows = self.table(split, f"split {split!r}")
        missing = [c for c in ROW_COLUMNS if c not in rows.columns]
        if missing:
            raise ValueError(f"{self.folder / split}: rows lack column(s) {missing}")
        return rows


def prepared_tables(data_dir: Union[PathLike, PreparedTables]) -> PreparedTables:
    """``data_dir`` itself when it is :class:`PreparedTables`, else the folder opened as one."""
    return data_dir if isinstance(data_dir, PreparedTables) else PreparedTables(data_dir)


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
    return prepared_tables(data_dir).split(split)


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
    data = prepared_tables(data_dir)
    data_dir = data.folder
    events = data.events
    for column in ("user_id", "item_id", "position"):
        if column not in events.columns:
            raise ValueError(f"{data_dir / 'events'}: events lack column {column!r}")
    cuts = split_cuts(data_dir) if (data_dir / "report.json").exists() else None
    if cuts is not None:
        return _timeline_events(data, events, split, cuts)
    later = SPLIT_ORDER[SPLIT_ORDER.index(split):]
    cutoffs = [data.split(s)[["user_id", "target_position"]] for s in later if (data_dir / s).exists()]
    if split not in [s for s in later if (data_dir / s).exists()]:
        raise FileNotFoundError(f"split folder not found: {data_dir / split}")
    cutoff = pd.concat(cutoffs, ignore_index=True).groupby("user_id")["target_position"].min()
    limit = events["user_id"].map(cutoff)
    keep = limit.isna().to_numpy() | (events["position"].to_numpy() < limit.fillna(0).to_numpy())
    return events[keep].sort_values(["user_id", "position"], kind="stable").reset_index(drop=True)


def _timeline_events(data: PreparedTables, events: pd.DataFrame, split: str, cuts: SplitCuts) -> pd.DataFrame:
    """The timeline rule of the module docstring."""
    data_dir = data.folder
    if not (data_dir / split).exists():
        raise FileNotFoundError(f"split folder not found: {data_dir / split}")
    if "timestamp" not in events.columns:
        raise ValueError(f"{data_dir / 'events'}: events lack column 'timestamp'")
    limit = pd.Series(cuts.test if split == "test" else cuts.valid, index=events.index)
    if split == "train":
        train = data.split("train")
        first = train.groupby("user_id")["target_position"].min()  # events strictly before its time
        own = events["user_id"].map(first)
        keep = (events["timestamp"] < limit) & (own.isna() | (events["position"] < own.fillna(0)))
    else:
        keep = events["timestamp"] < limit
    return events[keep.to_numpy()].sort_values(["user_id", "position"], kind="stable").reset_index(drop=True)

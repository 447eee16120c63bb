"""A prepared folder's split rows and its training-time events: what every scorer may count.

Training-time events (no leakage). For ``split`` S, an event in ``events/`` is counted (and used
to train the sequential models) unless it is at or after a target of S or of a later split for
the same user. Split order is train < valid < test. Concretely, for each user the cut-off is the
smallest ``target_position`` among that user's rows in S and the later splits; the user's events
with ``position`` < cut-off are kept, and all events of a user with no such row are kept:

* paper protocol, S = test: all events of train and valid users (their train/valid targets
  included), and each test user's history before its test target. No test target is counted.
* temporal protocol, S = test: every user's events except the last one (the test target).
* S = valid also drops the valid targets (and, in the paper protocol, the test users' targets).

These are the interactions a deployed system would have logged before scoring the split; the
ranker's own user prompts see the same histories (``history_item_ids`` are the events before
the target). Popularity therefore never counts the interaction it is asked to predict.

Both the baselines and the hybrid ranker's features (training), and the export (serving) read
them from here, so served features are counted from the events the test rows' features were.

Usage::

    from merlin_mllm.data.splits import split_rows, training_events
    events = training_events("data/ml100k", "test")   # everything logged before the test targets
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import pandas as pd

from merlin_mllm.data.tables import read_table

__all__ = ["SPLIT_ORDER", "ROW_COLUMNS", "read_prepared", "split_rows", "training_events"]

SPLIT_ORDER = ("train", "valid", "test")
ROW_COLUMNS = ["group_id", "user_id", "item_id", "label", "target_position"]

PathLike = Union[str, os.PathLike]


def read_prepared(path: Path, what: str) -> pd.DataFrame:
    """A table of a prepared folder; a FileNotFoundError naming ``what`` when it is absent."""
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path} (expected the output of prepare_dataset)")
    return read_table(path)


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
    later = SPLIT_ORDER[SPLIT_ORDER.index(split):]
    cutoffs = [split_rows(data_dir, s)[["user_id", "target_position"]] for s in later if (data_dir / s).exists()]
    if split not in [s for s in later if (data_dir / s).exists()]:
        raise FileNotFoundError(f"split folder not found: {data_dir / split}")
    cutoff = pd.concat(cutoffs, ignore_index=True).groupby("user_id")["target_position"].min()
    limit = events["user_id"].map(cutoff)
    keep = limit.isna().to_numpy() | (events["position"].to_numpy() < limit.fillna(0).to_numpy())
    return events[keep].sort_values(["user_id", "position"], kind="stable").reset_index(drop=True)

"""The hybrid ranker's tabular features for one split of a prepared folder, each as of its row's time.

Point in time (issue 21): every feature of a row uses only what was logged strictly before the
row's timestamp.

* :func:`collaborative_features`: :class:`merlin_mllm.data.collaborative.CollaborativeFeatures`
  (the NVTabular workflow of log item count, log recent-window count and log user activity)
  fitted on *all* of the folder's events: each row counts only the events strictly before its
  own time (the recent window is the ``recent_days`` before it), so the same fitted workflow
  serves every split, training rows included, and nothing a row could not have seen is counted.
* :func:`add_retrieval_scores`: the upstream retrieval score, a compact SASRec
  (:mod:`merlin_mllm.baselines`) trained on :func:`merlin_mllm.data.splits.training_events`
  ``(data_dir, S)``, the events before the split's cut (a model's weights cannot be "as of" each
  row), scoring each row from the row's own history (``history_item_ids``: the user's events
  strictly before the row's time), as a ``retrieval_score`` column.
* :func:`fusion_feature_rows`: S's rows with all of them, what
  :func:`merlin_mllm.pipelines.fusion.train_fusion_head` trains and scores on.

Usage::

    from merlin_mllm.pipelines.features import FUSION_FEATURES, fusion_feature_rows
    train = fusion_feature_rows("data/ml100k", "train", seed=0)   # SASRec trained on train-time events
    test = fusion_feature_rows("data/ml100k", "test", seed=0)
    train[list(FUSION_FEATURES)].describe()
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd

from merlin_mllm.baselines import (
    SequentialBaseline,
    SequentialSettings,
    sequential_scores,
    split_rows,
    train_sequential_baseline,
)
from merlin_mllm.data.collaborative import DEFAULT_RECENT_DAYS, FEATURE_COLUMNS, collaborative_features

__all__ = [
    "RETRIEVAL_COLUMN",
    "FUSION_FEATURES",
    "collaborative_features",
    "add_retrieval_scores",
    "fusion_feature_rows",
    "attach_features",
]

PathLike = Union[str, os.PathLike]

RETRIEVAL_COLUMN = "retrieval_score"
#: The non-LLM fusion's inputs: the collaborative columns plus the upstream retrieval score.
FUSION_FEATURES = (*FEATURE_COLUMNS, RETRIEVAL_COLUMN)


def add_retrieval_scores(rows: pd.DataFrame, data_dir: PathLike, split: str = "test", *,
                         baseline: Optional[SequentialBaseline] = None, kind: str = "sasrec", seed: int = 0,
                         settings: Optional[SequentialSettings] = None,
                         column: str = RETRIEVAL_COLUMN) -> pd.DataFrame:
    """``rows`` of ``split`` with ``column`` = a compact sequential model's score of each row.

    The model is trained on the events logged before ``split`` is scored (so, for the training
    split, it never saw the training targets), unless ``baseline`` is given.

    Parameters
    ----------
    rows : DataFrame
        Rows of ``split`` (all or some), with ``group_id`` and ``item_id``.
    data_dir : path
    split : str
    baseline : SequentialBaseline, optional
        A model already trained with ``train_sequential_baseline(..., split=split)``. One trained
        for a later split has seen this split's targets: its scores would leak them.
    kind : {"sasrec", "gru4rec"}
        The model to train when ``baseline`` is None.
    seed : int
        Its training seed.
    settings : SequentialSettings, optional
    column : str
        Name of the added column.

    Returns
    -------
    DataFrame
        A copy of ``rows`` plus ``column`` (float64), in row order.
    """
    if baseline is None:
        baseline = train_sequential_baseline(kind, data_dir, seed, split=split, settings=settings)
    scored = sequential_scores(baseline, data_dir, split)[["group_id", "item_id", "score"]]
    merged = rows[["group_id", "item_id"]].merge(scored, on=["group_id", "item_id"], how="left", validate="m:1")
    unmatched = merged["score"].isna().to_numpy()
    if unmatched.any():
        first = rows.iloc[int(np.flatnonzero(unmatched)[0])]
        raise ValueError(f"{int(unmatched.sum())} rows are not rows of split {split!r} in {Path(data_dir)} "
                         f"(e.g. group {first['group_id']}, item {first['item_id']})")
    return rows.assign(**{column: merged["score"].to_numpy(np.float64)})


def fusion_feature_rows(data_dir: PathLike, split: str = "test", *, recent_days: float = DEFAULT_RECENT_DAYS,
                        retrieval: bool = True, baseline: Optional[SequentialBaseline] = None, seed: int = 0,
                        settings: Optional[SequentialSettings] = None) -> pd.DataFrame:
    """The rows of ``split`` with :data:`FUSION_FEATURES` (or the collaborative ones only).

    Parameters
    ----------
    data_dir : path
    split : str
    recent_days : float
        Width of the recent-count window, ending at each row's time.
    retrieval : bool
        Add ``retrieval_score`` (trains a compact SASRec on the split's training-time events
        unless ``baseline`` is given).
    baseline, seed, settings
        See :func:`add_retrieval_scores`.

    Returns
    -------
    DataFrame
        group_id, user_id, item_id, label, target_position, history_item_ids, ... and the features.
    """
    # Every event is fitted; each row counts those strictly before its own timestamp.
    rows = collaborative_features(data_dir, recent_days=recent_days).transform(split_rows(data_dir, split))
    if retrieval:
        rows = add_retrieval_scores(rows, data_dir, split, baseline=baseline, seed=seed, settings=settings)
    return rows


def attach_features(rows: pd.DataFrame, features: Union[PathLike, pd.DataFrame], names, *,
                    what: str = "rows") -> pd.DataFrame:
    """``rows`` with the feature columns ``names`` taken from ``features``, matched on (group_id, item_id).

    What a hybrid ranker trains and is scored on: ``features`` is e.g. the output of
    :func:`fusion_feature_rows` for the same split (a DataFrame or a parquet file/folder).

    Raises
    ------
    ValueError
        Naming the first row without features, or the columns ``features`` lacks, or a
        non-finite value.
    """
    if not isinstance(features, pd.DataFrame):
        features = pd.read_parquet(features)
    names = list(names)
    missing = [c for c in ("group_id", "item_id", *names) if c not in features.columns]
    if missing:
        raise ValueError(f"the feature rows lack column(s) {missing}; they have {sorted(features.columns)}")
    table = features[["group_id", "item_id", *names]].drop_duplicates(["group_id", "item_id"])
    merged = rows.drop(columns=[c for c in names if c in rows.columns]).merge(
        table, on=["group_id", "item_id"], how="left", validate="m:1")
    values = merged[names].to_numpy(np.float64)
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        first = merged.iloc[int(np.flatnonzero(bad)[0])]
        raise ValueError(f"{int(bad.sum())} of {len(merged)} {what} have no (or a non-finite) {names} value, e.g. "
                         f"group {int(first['group_id'])}, item {int(first['item_id'])}: the feature rows must be "
                         "those of the same split")
    merged[names] = values.astype(np.float32)
    return merged

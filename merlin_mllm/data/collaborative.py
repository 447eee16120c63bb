"""The hybrid's tabular features of candidate rows, as of each row's time, by an NVTabular workflow.

The hybrid ranker (issue 16; :mod:`merlin_mllm.ranker.hybrid_head`) and its non-LLM control score a
(user, candidate) row with a small head over :data:`HEAD_FEATURES`, next to the LLM's logit: the
collaborative columns below and :data:`RETRIEVAL_COLUMN`, the upstream retrieval stage's score
(computed by :mod:`merlin_mllm.pipelines.hybrid` offline, sent with each request when served).
This module is the one home of those column names and of the recent window's default. The
collaborative columns are what a Merlin ranking pipeline knows about the row at the moment it
is scored (issue 21: point in time):

=========================  =======  ==========  =====================================================
column                     dtype    tags        meaning, for a row (user, item) at time t
=========================  =======  ==========  =====================================================
``item_log_count``         float32  CONTINUOUS  log(1 + the item's events with timestamp < t)
``item_log_recent_count``  float32  CONTINUOUS  log(1 + the item's events with
                                                t - ``recent_days`` <= timestamp < t)
``user_log_count``         float32  CONTINUOUS  log(1 + the user's events with timestamp < t)
=========================  =======  ==========  =====================================================

Strictly before: an event in the same second (time unit) as the row is not counted, so a row
never counts its own target, nor anything logged at or after it. An item or user without such an
event gets count 0 (feature 0). Every row is counted as of its own time, training rows included,
so fitting on *all* logged events leaks nothing: the future of a row is excluded by the rule, not
by the choice of events.

When is "t"? :meth:`CollaborativeFeatures.transform` reads each row's ``time_column`` (a
prepared folder's rows carry their target's ``timestamp``); rows without it are refused, unless
``as_of`` names one moment for all of them. Serving uses that: a request is counted as of the
export's serving time, by default :attr:`CollaborativeFeatures.logged_until` (the first second
after the latest fitted event, so every logged event counts and the recent window ends at the
latest logged event).

The workflow is ``[key] >> AsOfCount(time_column[, window]) >> LogOp >> Rename``: ``AsOfCount``
is this module's NVTabular ``StatOperator``. ``Workflow.fit`` on the events keeps, per key, the
sorted event times; ``transform`` counts them with ``np.searchsorted(..., side="left")`` (strict)
at each row's time, so one request costs a few binary searches, and ``Workflow.save`` /
``Workflow.load`` carry the statistics to the served features model.

Usage::

    from merlin_mllm.data.collaborative import CollaborativeFeatures
    from merlin_mllm.data.splits import split_rows
    from merlin_mllm.data.tables import read_table

    features = CollaborativeFeatures(recent_days=30).fit(read_table("data/ml100k/events"))
    scored = features.transform(split_rows("data/ml100k", "test"))   # each row as of its timestamp
    served = features.transform(requests, as_of=features.logged_until)  # one moment ("now")
    features.output_schema["item_log_count"].tags                    # {Tags.CONTINUOUS}
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import pandas as pd

with warnings.catch_warnings():
    # merlin.dtypes warns that TensorFlow is absent; this project does not use it.
    warnings.simplefilter("ignore")
    import nvtabular as nvt
    from merlin.core.dispatch import DataFrameType
    from merlin.dag.ops.stat_operator import StatOperator
    from merlin.dag.selector import ColumnSelector
    from merlin.io import Dataset
    from merlin.schema import Schema, Tags
    from nvtabular import ops

from merlin_mllm.data.image_files import REPORT_FILE
from merlin_mllm.data.splits import read_prepared

__all__ = ["FEATURE_COLUMNS", "RETRIEVAL_COLUMN", "HEAD_FEATURES", "DEFAULT_RECENT_DAYS", "SECONDS_PER_DAY", "TIME_UNITS", "AsOfCount",
           "CollaborativeFeatures", "collaborative_features", "folder_time_unit"]

#: The workflow's output columns, in the order :attr:`CollaborativeFeatures.feature_names` gives.
FEATURE_COLUMNS = ("item_log_count", "item_log_recent_count", "user_log_count")
#: The upstream retrieval stage's score of a candidate row.
RETRIEVAL_COLUMN = "retrieval_score"
#: The hybrid head's default input columns: the collaborative columns plus the retrieval score.
HEAD_FEATURES = (*FEATURE_COLUMNS, RETRIEVAL_COLUMN)
#: The recent window's width (days) unless a caller names one: training, evaluation and serving alike.
DEFAULT_RECENT_DAYS = 30.0
SECONDS_PER_DAY = 86_400
#: Time units of a prepared folder's timestamps (``report.json`` ``timestamp_unit``) -> units per second.
TIME_UNITS = {"s": 1, "ms": 1_000}
# merlin.io.Dataset(cpu=True) is this project's supported CPU path; its warning says nothing.
_CPU_MODE_WARNING = r"Initializing an NVTabular Dataset in CPU mode"

PathLike = Union[str, os.PathLike]


def folder_time_unit(data_dir: PathLike) -> str:
    """The unit of a prepared folder's timestamps (``report.json``'s ``timestamp_unit``; ``"s"`` without one)."""
    path = Path(data_dir) / REPORT_FILE
    unit = json.loads(path.read_text(encoding="utf-8")).get("timestamp_unit", "s") if path.is_file() else "s"
    if unit not in TIME_UNITS:
        raise ValueError(f"{path}: timestamp_unit {unit!r} is not one of {sorted(TIME_UNITS)}")
    return unit


class AsOfCount(StatOperator):
    """Per row, how many fitted events share the row's key and happened strictly before the row's time.

    Fitted on events (one row per interaction: the key column and ``time_column``), it keeps each
    key's sorted event times. Transforming rows (the key and ``time_column``: the moment each row
    is scored) gives, per key column, the number of that key's events with
    ``time - window <= timestamp < time`` (``window`` None: every earlier event). A key never
    fitted counts 0. An event at the row's own time is not counted.

    Parameters
    ----------
    time_column : str
        The time column, in the events and in the transformed rows (a dependency of the operator).
    window : float, optional
        Only count events at most this long before the row (same unit as the times).
    output_suffix : str
        The output column of key column ``c`` is ``f"{c}_{output_suffix}"`` (int64).

    Examples
    --------
    >>> events = pd.DataFrame({"item_id": [5, 5, 5, 6], "timestamp": [10, 20, 30, 10]})
    >>> workflow = nvt.Workflow(["item_id"] >> AsOfCount("timestamp"))
    >>> _ = workflow.fit(Dataset(events, cpu=True))
    >>> rows = pd.DataFrame({"item_id": [5, 5, 7], "timestamp": [20, 31, 99]})
    >>> workflow.transform(rows)["item_id_count"].tolist()
    [1, 3, 0]
    """

    def __init__(self, time_column: str = "timestamp", window: Optional[float] = None,
                 output_suffix: Optional[str] = None):
        super().__init__()
        if window is not None and not window > 0:
            raise ValueError(f"window must be positive (or None), got {window!r}")
        self.time_column = time_column
        self.window = None if window is None else float(window)
        self.output_suffix = output_suffix or ("count" if window is None else "recent_count")
        self.stats: dict = {}

    # -- fitting
    def fit(self, col_selector: ColumnSelector, ddf):
        # The (key, time) pairs; dask computes them and fit_finalize sorts them.
        return {name: ddf[[name, self.time_column]] for name in col_selector.names}

    def fit_finalize(self, dask_stats):
        self.stats = {name: self._sorted_times(frame[name].to_numpy(np.int64), frame[self.time_column].to_numpy(np.int64))
                      for name, frame in dask_stats.items()}

    @staticmethod
    def _sorted_times(keys: np.ndarray, times: np.ndarray) -> dict:
        """Each key's event times as one sorted int64 array of ``key_index * stride + time_rank``.

        ``time_rank`` is the time's index among the distinct fitted times, so ``event < query``
        on the combined number is "same key, earlier time" without any overflow.
        """
        unique_keys, key_index = np.unique(keys, return_inverse=True)
        unique_times, time_rank = np.unique(times, return_inverse=True)
        stride = np.int64(len(unique_times) + 1)
        combined = np.sort(key_index.astype(np.int64) * stride + time_rank.astype(np.int64))
        starts = np.searchsorted(combined, np.arange(len(unique_keys), dtype=np.int64) * stride, side="left")
        return {"keys": unique_keys, "times": unique_times, "combined": combined, "starts": starts}

    def clear(self):
        self.stats = {}

    # -- counting
    @staticmethod
    def count_before(stats: dict, keys: np.ndarray, times: np.ndarray) -> np.ndarray:
        """How many fitted events of each ``keys[i]`` have a time strictly below ``times[i]``."""
        counts = np.zeros(len(keys), dtype=np.int64)
        if not len(stats["keys"]) or not len(keys):
            return counts
        index = np.minimum(np.searchsorted(stats["keys"], keys), len(stats["keys"]) - 1)
        known = stats["keys"][index] == keys
        # side="left": an event at exactly the row's time is not before it.
        rank = np.searchsorted(stats["times"], times, side="left").astype(np.int64)
        stride = np.int64(len(stats["times"]) + 1)
        position = np.searchsorted(stats["combined"], index.astype(np.int64) * stride + rank, side="left")
        counts[known] = (position - stats["starts"][index])[known]
        return counts

    def transform(self, col_selector: ColumnSelector, df: DataFrameType) -> DataFrameType:
        if not self.stats:
            raise RuntimeError("AsOfCount.transform called before the workflow was fitted")
        times = df[self.time_column].to_numpy(np.float64)
        output = {}
        for name in col_selector.names:
            keys = df[name].to_numpy(np.int64)
            counts = self.count_before(self.stats[name], keys, times)
            if self.window is not None:
                counts = counts - self.count_before(self.stats[name], keys, times - self.window)
            output[self._column_name(name)] = counts
        return type(df)(output, index=df.index)

    transform.__doc__ = StatOperator.transform.__doc__

    # -- schema, declared beside transform
    @property
    def dependencies(self):
        return [self.time_column]

    def column_mapping(self, col_selector):
        return {self._column_name(name): [name] for name in col_selector.names}

    @property
    def output_tags(self):
        return [Tags.CONTINUOUS]

    @property
    def output_dtype(self):
        return np.int64

    def _column_name(self, name: str) -> str:
        return f"{name}_{self.output_suffix}"


class CollaborativeFeatures:
    """Fit on events, then add the collaborative feature columns to rows, each as of its time.

    Parameters
    ----------
    recent_days : float
        Width of the recent window, in days, ending at each row's time (default 30; ML-100k's
        events span about 7 months).
    user_column, item_column, time_column : str
        Column names in the events and the rows.
    time_unit : {"s", "ms"}
        Unit of the timestamps (a prepared folder's: :func:`folder_time_unit`), for the window.

    Examples
    --------
    >>> events = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [5, 6, 5],
    ...                        "timestamp": [0, 40 * SECONDS_PER_DAY, 41 * SECONDS_PER_DAY]})
    >>> features = CollaborativeFeatures(recent_days=30).fit(events)
    >>> rows = pd.DataFrame({"user_id": [1, 1, 3], "item_id": [5, 5, 9],
    ...                      "timestamp": [40 * SECONDS_PER_DAY, 50 * SECONDS_PER_DAY, 0]})
    >>> np.round(np.expm1(features.transform(rows)[list(FEATURE_COLUMNS)].to_numpy()), 3).tolist()
    [[1.0, 0.0, 1.0], [2.0, 1.0, 2.0], [0.0, 0.0, 0.0]]
    >>> served = features.transform(rows.drop(columns="timestamp"), as_of=features.logged_until)
    >>> np.round(np.expm1(served["item_log_count"].to_numpy()), 3).tolist()
    [2.0, 2.0, 0.0]
    """

    def __init__(self, recent_days: float = DEFAULT_RECENT_DAYS, *, user_column: str = "user_id", item_column: str = "item_id",
                 time_column: str = "timestamp", time_unit: str = "s"):
        if not recent_days > 0:
            raise ValueError(f"recent_days must be positive, got {recent_days!r}")
        if time_unit not in TIME_UNITS:
            raise ValueError(f"time_unit must be one of {sorted(TIME_UNITS)}, got {time_unit!r}")
        self.recent_days = float(recent_days)
        self.user_column = user_column
        self.item_column = item_column
        self.time_column = time_column
        self.time_unit = time_unit
        self.workflow: Optional[nvt.Workflow] = None
        #: The latest fitted event's time (set by :meth:`fit`).
        self.latest_event: Optional[int] = None
        self.n_events = 0

    @property
    def feature_names(self) -> Tuple[str, ...]:
        return FEATURE_COLUMNS

    @property
    def recent_window(self) -> float:
        """The recent window's width in the timestamps' unit."""
        return self.recent_days * SECONDS_PER_DAY * TIME_UNITS[self.time_unit]

    @property
    def logged_until(self) -> Optional[int]:
        """The first time after every fitted event: as of it, all of them count (serving's default "now")."""
        return None if self.latest_event is None else int(self.latest_event) + 1

    def build_workflow(self) -> nvt.Workflow:
        """The unfitted workflow: as-of counts per item (all, recent) and per user -> log(1 + x)."""
        names = {
            f"{self.item_column}_count": "item_log_count",
            f"{self.item_column}_recent_count": "item_log_recent_count",
            f"{self.user_column}_count": "user_log_count",
        }
        item = [self.item_column] >> AsOfCount(self.time_column)
        recent = [self.item_column] >> AsOfCount(self.time_column, window=self.recent_window)
        user = [self.user_column] >> AsOfCount(self.time_column)
        features = (item + recent + user) >> ops.LogOp() >> ops.Rename(f=names.get)
        return nvt.Workflow(features)

    def _frame(self, frame: pd.DataFrame, times: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame({
            self.user_column: frame[self.user_column].to_numpy(np.int64),
            self.item_column: frame[self.item_column].to_numpy(np.int64),
            self.time_column: times,
        })

    def fit(self, events: pd.DataFrame) -> "CollaborativeFeatures":
        """Keep the times of ``events`` (one row per interaction) in the workflow's statistics.

        Parameters
        ----------
        events : DataFrame
            ``user_column``, ``item_column`` and ``time_column``. Every event may be given: a
            row only ever counts those strictly before its own time.

        Returns
        -------
        CollaborativeFeatures
            ``self``, fitted.
        """
        missing = [c for c in (self.user_column, self.item_column, self.time_column) if c not in events.columns]
        if missing:
            raise ValueError(f"events lack column(s) {missing}")
        if events.empty:
            raise ValueError("no events to fit the collaborative features on")
        times = events[self.time_column].to_numpy()
        if not np.issubdtype(times.dtype, np.integer):
            raise ValueError(f"events' {self.time_column!r} must be integer timestamps, got dtype {times.dtype}")
        frame = self._frame(events, times.astype(np.int64))
        self.workflow = self.build_workflow()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_CPU_MODE_WARNING)
            self.workflow.fit(Dataset(frame, cpu=True))
        self.latest_event = int(frame[self.time_column].max())
        self.n_events = len(frame)
        return self

    def transform(self, rows: pd.DataFrame, as_of: Optional[float] = None) -> pd.DataFrame:
        """A copy of ``rows`` with :data:`FEATURE_COLUMNS` appended (float32), in row order.

        Parameters
        ----------
        rows : DataFrame
            Rows with ``user_column`` and ``item_column``, and ``time_column`` unless ``as_of``
            is given; other columns are kept.
        as_of : number, optional
            Count every row as of this one moment instead of its own time (e.g. a served request:
            :attr:`logged_until`). Default: each row's ``time_column``.

        Raises
        ------
        ValueError
            A missing column, or a row without a valid time (naming it).
        """
        if self.workflow is None:
            raise RuntimeError("CollaborativeFeatures.transform called before fit")
        missing = [c for c in (self.user_column, self.item_column) if c not in rows.columns]
        if missing:
            raise ValueError(f"rows lack column(s) {missing}")
        if as_of is None:
            if self.time_column not in rows.columns:
                raise ValueError(f"rows lack the time column {self.time_column!r}: each row is counted as of its "
                                 "own time (events strictly before it); give as_of=<a time> to count every row "
                                 "as of one moment (e.g. serving)")
            times = rows[self.time_column].to_numpy(np.float64)
        else:
            times = np.full(len(rows), float(as_of))
        bad = ~np.isfinite(times)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"row {row} (user {rows[self.user_column].iloc[row]}, item {rows[self.item_column].iloc[row]}) "
                             f"has no valid {self.time_column!r}: {times[row]!r}")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_CPU_MODE_WARNING)
            features = self.workflow.transform(self._frame(rows, times))
        out = rows.copy()
        for column in FEATURE_COLUMNS:
            out[column] = features[column].to_numpy(np.float32)
        return out

    @property
    def output_schema(self) -> Schema:
        """The feature columns' Merlin schema (float32, ``Tags.CONTINUOUS``)."""
        if self.workflow is None:
            raise RuntimeError("CollaborativeFeatures.output_schema needs fit first")
        return self.workflow.output_schema.select_by_name(list(FEATURE_COLUMNS))

    def settings(self) -> dict:
        """JSON-ready: what :meth:`load` needs besides the saved workflow."""
        return {"recent_days": self.recent_days, "time_unit": self.time_unit, "latest_event": self.latest_event,
                "n_events": int(self.n_events), "user_column": self.user_column, "item_column": self.item_column,
                "time_column": self.time_column}

    def save(self, folder: PathLike) -> Path:
        """Write the fitted workflow (``Workflow.save``, with its AsOfCount statistics) to ``folder``.

        The settings (:meth:`settings`) are the caller's to keep, e.g. beside it in a JSON file.
        """
        if self.workflow is None:
            raise RuntimeError("CollaborativeFeatures.save needs fit first")
        # Workflow.save points its statistics at the saved folder: save a copy, so this object
        # keeps reading its own.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            copy.deepcopy(self.workflow).save(str(folder))
        return Path(folder)

    @classmethod
    def load(cls, folder: PathLike, settings: dict) -> "CollaborativeFeatures":
        """The fitted features from a folder written by :meth:`save` and their :meth:`settings`."""
        features = cls(settings["recent_days"], user_column=settings["user_column"],
                       item_column=settings["item_column"], time_column=settings["time_column"],
                       time_unit=settings["time_unit"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            features.workflow = nvt.Workflow.load(str(folder))
        features.latest_event = settings["latest_event"]
        features.n_events = settings["n_events"]
        return features


def collaborative_features(data_dir: PathLike, *, recent_days: float = DEFAULT_RECENT_DAYS) -> CollaborativeFeatures:
    """The collaborative features fitted on every event of a prepared folder (``events/``).

    All events, whatever split is scored: each row counts only the events strictly before its own
    time (:meth:`CollaborativeFeatures.transform`), so no row sees its target or its future, and a
    row of any split sees everything logged before it, as a deployed system would.

    Parameters
    ----------
    data_dir : path
        Output of ``prepare_dataset`` (its ``report.json`` gives the timestamps' unit).
    recent_days : float
        Width of the recent-count window, ending at each row's time.

    Returns
    -------
    CollaborativeFeatures
        Fitted; ``.transform(rows)`` adds the columns.
    """
    events = read_prepared(Path(data_dir) / "events", "events table")
    return CollaborativeFeatures(recent_days, time_unit=folder_time_unit(data_dir)).fit(events)

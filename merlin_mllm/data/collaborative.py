"""Collaborative tabular features of candidate rows, made by an NVTabular workflow fitted on events.

The hybrid ranker (issue 16) and its non-LLM control score a (user, candidate) row with a small
head over these columns, next to the LLM's logit. They are what a Merlin ranking pipeline
already knows about the row, computed by Merlin's own operators (``JoinGroupby``,
``FillMissing``, ``LogOp``, ``Rename``):

=========================  =======  ==========  =====================================================
column                     dtype    tags        meaning
=========================  =======  ==========  =====================================================
``item_log_count``         float32  CONTINUOUS  log(1 + the candidate's interactions in the events)
``item_log_recent_count``  float32  CONTINUOUS  log(1 + its interactions in the last ``recent_days``
                                                days of the events: timestamp >= latest - window)
``user_log_count``         float32  CONTINUOUS  log(1 + the user's interactions in the events)
=========================  =======  ==========  =====================================================

An item or user absent from the events gets count 0 (feature 0). The recent window is anchored
at the latest event fitted on, not at each row's time: it is the count a deployed system would
read at scoring time ("the last 30 days"), one statistic per item, which ``JoinGroupby`` joins
by key alone.

Which events to fit on is the caller's business and decides leakage:
:func:`merlin_mllm.pipelines.features.collaborative_features` fits on
``merlin_mllm.data.splits.training_events(data_dir, split)``, the events logged before ``split``
is scored, so no target of the scored split is ever counted.

Two details of ``JoinGroupby`` 23.8 on the CPU shape the workflow:

* ``stats=["count"]`` casts its result to int32 and raises on a key it never saw (the left
  join's NaN). The counts are therefore ``"sum"`` over an indicator column that is 1 for each
  event (and, for the recent count, 1 inside the window): the same numbers, kept as floats, so
  an unseen key stays NaN until ``FillMissing(0)``.
* Its ``cont_cols`` must be present in every frame it transforms, although only the key is
  read there: :meth:`CollaborativeFeatures.transform` adds them as zeros to the candidate rows.

Usage::

    from merlin_mllm.data.splits import split_rows, training_events
    from merlin_mllm.data.collaborative import CollaborativeFeatures

    features = CollaborativeFeatures(recent_days=30).fit(training_events("data/ml100k", "test"))
    scored = features.transform(split_rows("data/ml100k", "test"))   # rows + the three columns
    features.output_schema["item_log_count"].tags                    # {Tags.CONTINUOUS}
"""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import pandas as pd

with warnings.catch_warnings():
    # merlin.dtypes warns that TensorFlow is absent; this project does not use it.
    warnings.simplefilter("ignore")
    import nvtabular as nvt
    from merlin.io import Dataset
    from merlin.schema import Schema
    from nvtabular import ops

__all__ = ["FEATURE_COLUMNS", "SECONDS_PER_DAY", "CollaborativeFeatures"]

#: The workflow's output columns, in the order :attr:`CollaborativeFeatures.feature_names` gives.
FEATURE_COLUMNS = ("item_log_count", "item_log_recent_count", "user_log_count")
SECONDS_PER_DAY = 86_400
# merlin.io.Dataset(cpu=True) is this project's supported CPU path; its warning says nothing.
_CPU_MODE_WARNING = r"Initializing an NVTabular Dataset in CPU mode"
# Indicator columns summed by JoinGroupby (see the module docstring for why not "count").
_EVENT_FLAG = "event_indicator"
_RECENT_FLAG = "recent_indicator"


class CollaborativeFeatures:
    """Fit on events, then add the collaborative feature columns to candidate rows.

    Parameters
    ----------
    recent_days : float
        Width of the recent window, in days, ending at the latest fitted event (default 30;
        ML-100k's events span about 7 months).
    user_column, item_column, time_column : str
        Column names in the events and the rows (``time_column`` in the events only, in seconds).
    work_dir : path, optional
        Where ``JoinGroupby`` writes its statistics (parquet). Default: a temporary folder that
        lives as long as this object.

    Examples
    --------
    >>> events = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [5, 6, 5],
    ...                        "timestamp": [0, 40 * SECONDS_PER_DAY, 41 * SECONDS_PER_DAY]})
    >>> features = CollaborativeFeatures(recent_days=30).fit(events)
    >>> out = features.transform(pd.DataFrame({"user_id": [1, 3], "item_id": [5, 9]}))
    >>> np.round(np.expm1(out[list(FEATURE_COLUMNS)].to_numpy()), 3).tolist()
    [[2.0, 1.0, 2.0], [0.0, 0.0, 0.0]]
    """

    def __init__(self, recent_days: float = 30.0, *, user_column: str = "user_id", item_column: str = "item_id",
                 time_column: str = "timestamp", work_dir: Optional[Union[str, Path]] = None):
        if not recent_days > 0:
            raise ValueError(f"recent_days must be positive, got {recent_days!r}")
        self.recent_days = float(recent_days)
        self.user_column = user_column
        self.item_column = item_column
        self.time_column = time_column
        if work_dir is None:
            self._temporary = tempfile.TemporaryDirectory(prefix="collaborative-features-")
            work_dir = self._temporary.name
        self.work_dir = Path(work_dir)
        self.workflow: Optional[nvt.Workflow] = None
        #: The first timestamp inside the recent window (set by :meth:`fit`).
        self.recent_since: Optional[int] = None
        self.n_events = 0

    @property
    def feature_names(self) -> Tuple[str, ...]:
        return FEATURE_COLUMNS

    def build_workflow(self) -> nvt.Workflow:
        """The unfitted workflow: per-key sums of the indicator columns -> fill 0 -> log(1 + x)."""
        names = {
            f"{self.item_column}_{_EVENT_FLAG}_sum": "item_log_count",
            f"{self.item_column}_{_RECENT_FLAG}_sum": "item_log_recent_count",
            f"{self.user_column}_{_EVENT_FLAG}_sum": "user_log_count",
        }
        out_path = str(self.work_dir)
        item = [self.item_column] >> ops.JoinGroupby(cont_cols=[_EVENT_FLAG, _RECENT_FLAG], stats=["sum"],
                                                      out_path=out_path)
        user = [self.user_column] >> ops.JoinGroupby(cont_cols=[_EVENT_FLAG], stats=["sum"], out_path=out_path)
        features = (item + user) >> ops.FillMissing(0) >> ops.LogOp() >> ops.Rename(f=names.get)
        return nvt.Workflow(features)

    def fit(self, events: pd.DataFrame) -> "CollaborativeFeatures":
        """Count ``events`` (one row per interaction) into the workflow's statistics.

        Parameters
        ----------
        events : DataFrame
            ``user_column``, ``item_column`` and ``time_column`` (seconds).

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
        times = events[self.time_column].to_numpy(np.int64)
        self.recent_since = int(times.max() - round(self.recent_days * SECONDS_PER_DAY))
        frame = pd.DataFrame({
            self.user_column: events[self.user_column].to_numpy(np.int64),
            self.item_column: events[self.item_column].to_numpy(np.int64),
            _EVENT_FLAG: np.ones(len(events), dtype=np.float32),
            _RECENT_FLAG: (times >= self.recent_since).astype(np.float32),
        })
        self.workflow = self.build_workflow()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_CPU_MODE_WARNING)
            self.workflow.fit(Dataset(frame, cpu=True))
        self.n_events = len(frame)
        return self

    def transform(self, rows: pd.DataFrame) -> pd.DataFrame:
        """A copy of ``rows`` with :data:`FEATURE_COLUMNS` appended (float32), in row order.

        Parameters
        ----------
        rows : DataFrame
            Candidate rows with ``user_column`` and ``item_column``; other columns are kept.
        """
        if self.workflow is None:
            raise RuntimeError("CollaborativeFeatures.transform called before fit")
        missing = [c for c in (self.user_column, self.item_column) if c not in rows.columns]
        if missing:
            raise ValueError(f"rows lack column(s) {missing}")
        keys = pd.DataFrame({
            self.user_column: rows[self.user_column].to_numpy(np.int64),
            self.item_column: rows[self.item_column].to_numpy(np.int64),
            # Read by nobody: JoinGroupby only needs them present (module docstring).
            _EVENT_FLAG: np.zeros(len(rows), dtype=np.float32),
            _RECENT_FLAG: np.zeros(len(rows), dtype=np.float32),
        })
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_CPU_MODE_WARNING)
            features = self.workflow.transform(keys)
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

"""The hybrid's pipeline: its feature tables, and its head trained alone (the non-LLM control).

Feature tables (point in time, issue 21: every feature of a row uses only what was logged
strictly before the row's timestamp):

* :func:`hybrid_feature_rows`: a split's rows with :data:`~merlin_mllm.data.collaborative.HEAD_FEATURES`:
  the collaborative counts of :class:`merlin_mllm.data.collaborative.CollaborativeFeatures`
  (fitted on *all* of the folder's events: each row counts only the events strictly before its
  own time, so the same fitted workflow serves every split, training rows included), and
* :func:`add_retrieval_scores`: the upstream retrieval score, a compact SASRec
  (:mod:`merlin_mllm.baselines`) trained on :func:`merlin_mllm.data.splits.training_events`
  ``(data_dir, S)``, the events before the split's cut (a model's weights cannot be "as of" each
  row), scoring each row from the row's own history.
* :func:`write_feature_table`: the same rows as a parquet file, reused while it is newer than the
  prepared folder: what the CLI, the quickstart and the benchmarks hand to ``train_ranker`` and
  ``evaluate_ranker``.
* :func:`attach_features`: labelled rows with the feature columns of such a table.

The head alone (:func:`train_head`, :func:`head_scores`): :class:`merlin_mllm.ranker.hybrid_head.HybridHead`
trained with binary cross-entropy on the training split's groups (1 positive + negatives each),
the non-LLM control of issue 16, and the joint training's warm start. After every epoch the
pooled AUC on the validation rows is measured; the epoch with the best one is kept, and
training stops ``patience`` epochs after it. The test rows are never looked at. The training
set is small (one group per training user: 1,886 rows on ML-100k's leave-last-out protocol),
so each epoch is one full-batch Adam step by default.

Usage::

    from merlin_mllm.data.collaborative import HEAD_FEATURES
    from merlin_mllm.pipelines.hybrid import head_scores, hybrid_feature_rows, train_head

    rows = {s: hybrid_feature_rows("data/ml100k", s, seed=0) for s in ("train", "valid", "test")}
    fit = train_head(rows["train"], rows["valid"], HEAD_FEATURES, seed=0)
    scored = head_scores(fit.head, rows["test"])        # rows + score (the head's logit)
    write_feature_table("data/ml100k", "train", "runs/ranker/features_train.parquet")
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from merlin_mllm.baselines import (
    SequentialBaseline,
    SequentialSettings,
    sequential_scores,
    split_rows,
    train_sequential_baseline,
)
from merlin_mllm.data.collaborative import DEFAULT_RECENT_DAYS, HEAD_FEATURES, RETRIEVAL_COLUMN, collaborative_features
from merlin_mllm.metrics import auc
from merlin_mllm.ranker.hybrid_head import HybridHead

__all__ = [
    "add_retrieval_scores",
    "hybrid_feature_rows",
    "write_feature_table",
    "TABLE_METADATA_KEY",
    "attach_features",
    "HeadSettings",
    "HeadFit",
    "train_head",
    "head_scores",
]

PathLike = Union[str, os.PathLike]


def add_retrieval_scores(rows: pd.DataFrame, data_dir: PathLike, split: str = "test", *,
                         baseline: Optional[SequentialBaseline] = None, kind: str = "sasrec", seed: int = 0,
                         settings: Optional[SequentialSettings] = None,
                         column: str = RETRIEVAL_COLUMN, scores: Optional[pd.DataFrame] = None) -> pd.DataFrame:
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
    scores : DataFrame, optional
        ``group_id``, ``item_id``, ``score`` of ``split``'s rows from a model already scored (so that
        a benchmark's SASRec row and the head's retrieval column are one trained model); then
        nothing is trained or scored here.

    Returns
    -------
    DataFrame
        A copy of ``rows`` plus ``column`` (float64), in row order.
    """
    if scores is None:
        if baseline is None:
            baseline = train_sequential_baseline(kind, data_dir, seed, split=split, settings=settings)
        scores = sequential_scores(baseline, data_dir, split)
    scored = scores[["group_id", "item_id", "score"]]
    merged = rows[["group_id", "item_id"]].merge(scored, on=["group_id", "item_id"], how="left", validate="m:1")
    unmatched = merged["score"].isna().to_numpy()
    if unmatched.any():
        first = rows.iloc[int(np.flatnonzero(unmatched)[0])]
        raise ValueError(f"{int(unmatched.sum())} rows are not rows of split {split!r} in {Path(data_dir)} "
                         f"(e.g. group {first['group_id']}, item {first['item_id']})")
    return rows.assign(**{column: merged["score"].to_numpy(np.float64)})


def hybrid_feature_rows(data_dir: PathLike, split: str = "test", *, recent_days: float = DEFAULT_RECENT_DAYS,
                        retrieval: bool = True, baseline: Optional[SequentialBaseline] = None, seed: int = 0,
                        settings: Optional[SequentialSettings] = None) -> pd.DataFrame:
    """The rows of ``split`` with :data:`HEAD_FEATURES` (or the collaborative ones only).

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


#: The parquet metadata key under which :func:`write_feature_table` records how a table was made.
TABLE_METADATA_KEY = b"merlin_mllm.hybrid_features"


def write_feature_table(data_dir: PathLike, split: str, path: PathLike, *, columns: Sequence[str] = HEAD_FEATURES,
                        recent_days: float = DEFAULT_RECENT_DAYS, seed: int = 0,
                        settings: Optional[SequentialSettings] = None) -> Path:
    """``split``'s rows with the hybrid's feature ``columns``, as a parquet file at ``path``.

    The one way the CLI, the quickstart and the benchmarks make the feature table that
    ``train_ranker`` / ``evaluate_ranker`` read (``features=``). A file already at ``path`` is
    reused when it was written after the prepared folder's ``report.json``, with the same split,
    ``recent_days`` and ``seed`` (recorded in its parquet metadata), and holds ``columns``;
    otherwise it is computed again (:func:`hybrid_feature_rows`; the SASRec retrieval score only
    when ``columns`` holds :data:`~merlin_mllm.data.collaborative.RETRIEVAL_COLUMN`).

    Raises
    ------
    ValueError
        A column the prepared folder cannot give (naming it): pass such a table yourself.
    """
    path, columns = Path(path), list(columns)
    recipe = {"split": split, "recent_days": float(recent_days), "seed": int(seed)}
    report = Path(data_dir) / "report.json"
    if path.is_file() and (not report.exists() or path.stat().st_mtime >= report.stat().st_mtime):
        schema = pq.read_schema(path)
        made = json.loads((schema.metadata or {}).get(TABLE_METADATA_KEY, b"{}"))
        if made == recipe and set(columns) <= set(schema.names):
            return path
    rows = hybrid_feature_rows(data_dir, split, recent_days=recent_days, retrieval=RETRIEVAL_COLUMN in columns,
                               seed=seed, settings=settings)
    missing = [c for c in columns if c not in rows.columns]
    if missing:
        raise ValueError(f"the prepared folder {data_dir} gives no feature {missing}: pass a table of them")
    table = pa.Table.from_pandas(rows.drop(columns=["history_item_ids"], errors="ignore"), preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           TABLE_METADATA_KEY: json.dumps(recipe).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)  # a reader never sees half a table
    return path


def attach_features(rows: pd.DataFrame, features: Union[PathLike, pd.DataFrame], names, *,
                    what: str = "rows") -> pd.DataFrame:
    """``rows`` with the feature columns ``names`` taken from ``features``, matched on (group_id, item_id).

    What a hybrid ranker trains and is scored on: ``features`` is e.g. the output of
    :func:`hybrid_feature_rows` for the same split (a DataFrame or a parquet file/folder).

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


@dataclass
class HeadSettings:
    """How the head is built and trained (fixed defaults; chosen on nothing but their smallness)."""

    hidden: Tuple[int, ...] = (16,)
    dropout: Optional[float] = None
    lr: float = 1e-2
    weight_decay: float = 1e-4
    #: The most epochs; early stopping usually ends sooner.
    epochs: int = 400
    #: Rows per optimizer step; 0 = the whole training split (one step per epoch).
    batch_size: int = 0
    #: Epochs without a better validation AUC before stopping.
    patience: int = 50

    def to_dict(self) -> dict:
        return {**asdict(self), "hidden": list(self.hidden)}


@dataclass
class HeadFit:
    """A trained head and how it trained."""

    head: HybridHead
    feature_names: Tuple[str, ...]
    seed: int
    settings: HeadSettings
    best_epoch: int
    best_valid_auc: Optional[float]
    train_loss: List[float] = field(default_factory=list)
    valid_auc: List[float] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        """JSON-ready: everything but the head itself."""
        return {"feature_names": list(self.feature_names), "seed": self.seed, "settings": self.settings.to_dict(),
                "best_epoch": self.best_epoch, "best_valid_auc": self.best_valid_auc,
                "epochs_run": len(self.train_loss), "final_train_loss": self.train_loss[-1] if self.train_loss else None,
                "seconds": self.seconds}


def _check_rows(rows: pd.DataFrame, feature_names: Sequence[str], what: str) -> None:
    missing = [c for c in (*feature_names, "label") if c not in rows.columns]
    if missing:
        raise ValueError(f"{what} rows lack column(s) {missing}")
    if rows.empty:
        raise ValueError(f"no {what} rows")
    values = rows[list(feature_names)].to_numpy(np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"{what} rows hold non-finite feature values")


def _matrix(rows: pd.DataFrame, feature_names: Sequence[str]) -> torch.Tensor:
    return torch.as_tensor(rows[list(feature_names)].to_numpy(np.float32))


def train_head(train: pd.DataFrame, valid: Optional[pd.DataFrame] = None,
               feature_names: Sequence[str] = HEAD_FEATURES, *, seed: int = 0,
               settings: Optional[HeadSettings] = None, recent_days: float = DEFAULT_RECENT_DAYS) -> HeadFit:
    """Train a :class:`HybridHead` with BCE on ``train``, keeping the best epoch on ``valid``.

    Parameters
    ----------
    train : DataFrame
        Training rows: ``feature_names`` and ``label`` (0/1).
    valid : DataFrame, optional
        Validation rows (both labels present). Without them, every epoch runs and the last is kept.
    feature_names : sequence of str
        The head's input columns.
    seed : int
        Seeds initialisation and batch order.
    settings : HeadSettings, optional
    recent_days : float
        The recent window the rows' features were counted with (saved with the head).

    Returns
    -------
    HeadFit
    """
    settings = settings or HeadSettings()
    feature_names = tuple(feature_names)
    _check_rows(train, feature_names, "training")
    if valid is not None:
        _check_rows(valid, feature_names, "validation")
        if valid["label"].nunique() != 2:
            raise ValueError("the validation rows need both labels for an AUC")
    started = time.time()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x = _matrix(train, feature_names)
    y = torch.as_tensor(train["label"].to_numpy(np.float32))
    head = HybridHead(feature_names, settings.hidden, dropout=settings.dropout,
                      recent_days=recent_days).fit_scaling(x.numpy())
    optimizer = torch.optim.Adam(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    valid_x = _matrix(valid, feature_names) if valid is not None else None
    valid_y = valid["label"].to_numpy() if valid is not None else None
    batch_size = settings.batch_size or len(x)
    best_state, best_epoch, best_auc = None, 0, None
    losses: List[float] = []
    valid_aucs: List[float] = []
    for epoch in range(1, settings.epochs + 1):
        head.train()
        order = torch.as_tensor(rng.permutation(len(x)))
        total = 0.0
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            loss = loss_fn(head(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(index)
        losses.append(total / len(x))
        if valid_x is None:
            best_epoch = epoch
            continue
        head.eval()
        with torch.no_grad():
            valid_aucs.append(auc(valid_y, head(valid_x).double().numpy()))
        if best_auc is None or valid_aucs[-1] > best_auc:
            best_auc, best_epoch, best_state = valid_aucs[-1], epoch, copy.deepcopy(head.state_dict())
        elif epoch - best_epoch >= settings.patience:
            break
    if best_state is not None:
        head.load_state_dict(best_state)
    head.eval()
    return HeadFit(head, feature_names, int(seed), settings, best_epoch, best_auc, losses, valid_aucs,
                     round(time.time() - started, 2))


def head_scores(head: HybridHead, rows: pd.DataFrame, column: str = "score") -> pd.DataFrame:
    """A copy of ``rows`` with ``column`` = the head's logit of each row (float64)."""
    _check_rows(rows.assign(label=0) if "label" not in rows.columns else rows, head.feature_names, "scored")
    head.eval()
    with torch.no_grad():
        logits = head(_matrix(rows, head.feature_names)).double().numpy()
    return rows.assign(**{column: logits})

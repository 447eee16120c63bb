"""Train the tabular fusion head on one split's rows, early-stopped on another's, and score rows.

This is the non-LLM fusion of issue 16: :class:`merlin_mllm.ranker.fusion.TabularFusionHead`
over the tabular features of :mod:`merlin_mllm.pipelines.features`, trained with binary
cross-entropy on the training split's groups (1 positive + negatives each). After every epoch
the pooled AUC on the validation rows is measured; the epoch with the best one is kept, and
training stops ``patience`` epochs after it. The test rows are never looked at.

The training set is small (one group per training user: 1,886 rows on ML-100k's leave-last-out
protocol), so each epoch is one full-batch Adam step by default.

Usage::

    from merlin_mllm.pipelines.features import FUSION_FEATURES, fusion_feature_rows
    from merlin_mllm.pipelines.fusion import train_fusion_head, fusion_scores

    rows = {s: fusion_feature_rows("data/ml100k", s, seed=0) for s in ("train", "valid", "test")}
    fit = train_fusion_head(rows["train"], rows["valid"], FUSION_FEATURES, seed=0)
    scored = fusion_scores(fit.head, rows["test"])       # rows + score (the head's logit)
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch

from merlin_mllm.metrics import auc
from merlin_mllm.pipelines.features import FUSION_FEATURES
from merlin_mllm.ranker.fusion import TabularFusionHead

__all__ = ["FusionSettings", "FusionFit", "train_fusion_head", "fusion_scores"]


@dataclass
class FusionSettings:
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
class FusionFit:
    """A trained head and how it trained."""

    head: TabularFusionHead
    feature_names: Tuple[str, ...]
    seed: int
    settings: FusionSettings
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


def train_fusion_head(train: pd.DataFrame, valid: Optional[pd.DataFrame] = None,
                      feature_names: Sequence[str] = FUSION_FEATURES, *, seed: int = 0,
                      settings: Optional[FusionSettings] = None) -> FusionFit:
    """Train a :class:`TabularFusionHead` with BCE on ``train``, keeping the best epoch on ``valid``.

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
    settings : FusionSettings, optional

    Returns
    -------
    FusionFit
    """
    settings = settings or FusionSettings()
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
    head = TabularFusionHead(feature_names, settings.hidden, dropout=settings.dropout).fit_scaling(x.numpy())
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
    return FusionFit(head, feature_names, int(seed), settings, best_epoch, best_auc, losses, valid_aucs,
                     round(time.time() - started, 2))


def fusion_scores(head: TabularFusionHead, rows: pd.DataFrame, column: str = "score") -> pd.DataFrame:
    """A copy of ``rows`` with ``column`` = the head's logit of each row (float64)."""
    _check_rows(rows.assign(label=0) if "label" not in rows.columns else rows, head.feature_names, "scored")
    head.eval()
    with torch.no_grad():
        logits = head(_matrix(rows, head.feature_names)).double().numpy()
    return rows.assign(**{column: logits})

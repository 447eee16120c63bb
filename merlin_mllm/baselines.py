"""Non-LLM baselines scored on exactly the rows the MLLM ranker is scored on.

The baselines each give one score per row of a split (1 positive + N negatives per group),
evaluated with :func:`merlin_mllm.metrics.ranking_metrics` and written in the JSON layout of
:func:`merlin_mllm.pipelines.evaluation.evaluate_ranker`, so that rows of a results table compare 1:1:

* **popularity**: the candidate's interaction count in the training-time events (below).
* **popularity as of the row** and **recent popularity as of the row**: the candidate's events
  strictly before the row's own timestamp (all of them, or those of the ``recent_days`` before
  it), counted by :class:`merlin_mllm.data.collaborative.CollaborativeFeatures`, the hybrid's
  own count features (one home for the as-of rule).
* **SASRec** and **GRU4Rec**: *compact re-implementations* in plain torch (not RecBole's code),
  small versions of Kang & McAuley 2018 (causal self-attention over the item sequence) and
  Hidasi et al. 2016 (a GRU over the item sequence). Both are trained for next-item prediction
  with a full softmax over the catalogue, and score a candidate by the dot product of the
  history's last hidden state with the candidate's (tied) item embedding.

Training-time events: :func:`merlin_mllm.data.splits.training_events` gives, for a split, the
events before the split's cut (per user on leave-last-out and paper folders, one global time on
timeline folders); popularity counts and the sequential models train on exactly those, so
popularity never counts the interaction it is asked to predict. On leave-last-out folders those
events still include other users' events after a row's time: the as-of popularity rows do not.

Usage::

    from merlin_mllm.baselines import evaluate_popularity, evaluate_popularity_as_of, evaluate_sequential
    popularity = evaluate_popularity("data/ml100k", "runs/eval/popularity.json")
    recent = evaluate_popularity_as_of("data/ml100k", "runs/eval/recent_popularity.json", recent_days=30)
    sasrec = evaluate_sequential("sasrec", "data/ml100k", "runs/eval/sasrec_s0.json", seed=0)
    popularity["auc"], sasrec["ndcg@5"]
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Union

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from merlin_mllm.data.collaborative import collaborative_features
from merlin_mllm.data.splits import ROW_COLUMNS, read_prepared, split_rows, training_events
from merlin_mllm.data.tables import read_table
from merlin_mllm.metrics import DEFAULT_KS, auc_difference_interval, paired_scores, ranking_metrics

# torch is imported inside the sequential baselines' functions only: popularity and the item
# counts run without loading it.

__all__ = [
    "SEQUENTIAL_KINDS",
    "popularity_scores",
    "evaluate_popularity",
    "item_prior_rows",
    "popularity_as_of_scores",
    "evaluate_popularity_as_of",
    "SequentialSettings",
    "SequentialBaseline",
    "train_sequential_baseline",
    "sequential_scores",
    "evaluate_sequential",
    "evaluate_scores",
]

SEQUENTIAL_KINDS = ("sasrec", "gru4rec")

PathLike = Union[str, os.PathLike]


# ----------------------------------------------------------------------------- scoring output
def evaluate_scores(table: pd.DataFrame, out_json: PathLike, run: dict, *, ks: Iterable[int] = DEFAULT_KS,
                    started: Optional[float] = None) -> dict:
    """Metrics of a scored table, written like ``evaluate_ranker`` writes them.

    Writes ``out_json`` (metrics at the top level + ``run``) and ``<out>.scores.parquet``
    (group_id, user_id, item_id, label, score).

    Parameters
    ----------
    table : DataFrame
        One row per candidate with group_id, user_id, item_id, label and score.
    out_json : path
    run : dict
        Details recorded under ``"run"`` (model, split, ...); timings and paths are added.
    ks : iterable of int
    started : float, optional
        ``time.time()`` at the start of the run, for the recorded wall time.
    """
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    scores_path = Path(f"{out_json.with_suffix('')}.scores.parquet")
    table = table[["group_id", "user_id", "item_id", "label", "score"]].reset_index(drop=True)
    table.to_parquet(scores_path, index=False)
    metrics = ranking_metrics(table["label"].to_numpy(), table["score"].to_numpy(), table["group_id"].to_numpy(), ks=ks)
    result = {**metrics, "run": {**run, "seconds": round(time.time() - started, 2) if started else None,
                                 "scores": str(scores_path), "plot": None}}
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    return result


# ----------------------------------------------------------------------------- popularity
def popularity_scores(data_dir: PathLike, split: str = "test") -> pd.DataFrame:
    """Each row of ``split`` with ``score`` = its item's count in :func:`training_events`.

    An item never seen in the training-time events scores 0 (ties are handled by the metrics).

    Parameters
    ----------
    data_dir : path
        Output of ``prepare_dataset``.
    split : str
        The split to score (default ``"test"``).

    Returns
    -------
    DataFrame
        group_id, user_id, item_id, label, target_position, score (float), in file order.
    """
    return item_count_scores(split_rows(data_dir, split)[ROW_COLUMNS], training_events(data_dir, split))


def item_count_scores(rows: pd.DataFrame, events: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with ``score`` = how often its item occurs in ``events`` (0 if never).

    Parameters
    ----------
    rows : DataFrame
        Rows to score, with ``item_id``.
    events : DataFrame
        The events counted, with ``item_id``.

    Returns
    -------
    DataFrame
        A copy of ``rows`` plus ``score`` (float).
    """
    counts = events["item_id"].value_counts()
    return rows.assign(score=rows["item_id"].map(counts).fillna(0).astype(np.float64))


def evaluate_popularity(data_dir: PathLike, out_json: PathLike, split: str = "test",
                        ks: Iterable[int] = DEFAULT_KS) -> dict:
    """Score ``split`` by popularity and write metrics in ``evaluate_ranker``'s JSON layout.

    Returns
    -------
    dict
        ``auc``, ``hr@K``, ``mrr@K``, ``ndcg@K``, counts, and ``run``.
    """
    started = time.time()
    table = popularity_scores(data_dir, split)
    run = _count_run("popularity", data_dir, split,
                     counted=f"events before the {split} targets (merlin_mllm.data.splits.training_events)")
    return evaluate_scores(table, out_json, run, ks=ks, started=started)


def item_prior_rows(data_dir: PathLike, prefix_data_dir: Optional[PathLike] = None) -> List[dict]:
    """How far an item prior learned from the ranker's own training rows goes, next to popularity.

    Scores the test groups of ``data_dir`` with item counts over different event sets: how often
    each item is the positive of a training group; the same over ``prefix_data_dir``'s training
    groups (an ``add_prefix_targets`` copy, optional); and every event of the training users after
    their first (the positives the ranker would see if every prefix were a training group).

    Parameters
    ----------
    data_dir : path
        Output of ``prepare_dataset``.
    prefix_data_dir : path, optional
        Its ``add_prefix_targets`` copy; it must hold the same test groups.

    Returns
    -------
    list of dict
        One per scorer, popularity first: ``scorer``, ``events_counted``, ``auc``, ``hr@5`` and,
        except for popularity, ``minus_popularity`` (the paired AUC difference and its interval).

    Raises
    ------
    ValueError
        If ``prefix_data_dir`` has other test groups than ``data_dir``.
    """
    data = Path(data_dir)
    test = read_table(data / "test")[["group_id", "item_id", "label"]]
    popularity = popularity_scores(data)
    counted = int(len(training_events(data, "test")))
    scorers = {"popularity (every event before the test targets)": (popularity, counted)}
    sources = [("training positives", data)]
    if prefix_data_dir:
        sources.append(("block-prefix training positives", Path(prefix_data_dir)))
    for name, folder in sources:
        if not read_table(folder / "test")[["group_id", "item_id", "label"]].equals(test):
            raise ValueError(f"{folder} has other test groups than {data}: the rows would not be comparable")
        positives = read_table(folder / "train").query("label == 1")
        scorers[name] = (item_count_scores(test, positives), int(len(positives)))
    # Every prefix as a training group: each event of a training user after its first.
    train_users = read_table(data / "train")["user_id"].unique()
    events = read_table(data / "events")
    every = events[events["user_id"].isin(train_users).to_numpy() & (events["position"] >= 1).to_numpy()]
    scorers["every-prefix training positives"] = (item_count_scores(test, every), int(len(every)))
    rows = []
    for name, (scores, counted) in scorers.items():
        metrics = ranking_metrics(scores["label"], scores["score"], scores["group_id"], ks=(5,))
        row = {"scorer": name, "events_counted": counted, "auc": metrics["auc"], "hr@5": metrics["hr@5"]}
        if not name.startswith("popularity"):
            paired = paired_scores(scores, popularity, ("counts", "popularity"), where=name)
            row["minus_popularity"] = auc_difference_interval(paired["label"], paired["score_counts"],
                                                              paired["score_popularity"], paired["group_id"])
        rows.append(row)
    return rows


def popularity_as_of_scores(data_dir: PathLike, split: str = "test", *,
                            recent_days: Optional[float] = None) -> pd.DataFrame:
    """Each row of ``split`` scored by its item's events strictly before the row's own timestamp.

    Counted from every event of the folder by
    :class:`~merlin_mllm.data.collaborative.CollaborativeFeatures` (events in the row's own second
    are not counted). The score is the feature itself, log(1 + count): a monotone function of the
    count, so every ranking metric is the count's.

    Parameters
    ----------
    data_dir : path
        Output of ``prepare_dataset``; every event of its ``events/`` is counted, each for the
        rows after it.
    split : str
        The split whose rows are scored (default ``"test"``).
    recent_days : float, optional
        Count only the events of the ``recent_days`` days before the row's time (recent
        popularity); default: all earlier events.

    Returns
    -------
    DataFrame
        group_id, user_id, item_id, label, target_position, score (float), in file order.
    """
    rows = split_rows(data_dir, split)
    if recent_days is None:
        column, featured = "item_log_count", collaborative_features(data_dir).transform(rows)
    else:
        column = "item_log_recent_count"
        featured = collaborative_features(data_dir, recent_days=recent_days).transform(rows)
    return rows[ROW_COLUMNS].assign(score=featured[column].to_numpy(np.float64))


def evaluate_popularity_as_of(data_dir: PathLike, out_json: PathLike, split: str = "test", *,
                              recent_days: Optional[float] = None, ks: Iterable[int] = DEFAULT_KS) -> dict:
    """Score ``split`` by :func:`popularity_as_of_scores` and write metrics in ``evaluate_ranker``'s layout."""
    started = time.time()
    table = popularity_as_of_scores(data_dir, split, recent_days=recent_days)
    what = "every event" if recent_days is None else f"the events of the {recent_days:g} days"
    run = _count_run("popularity_as_of_row" if recent_days is None else "recent_popularity_as_of_row", data_dir,
                     split, recent_days=recent_days,
                     counted=f"{what} strictly before each row's timestamp (merlin_mllm.data.collaborative)")
    return evaluate_scores(table, out_json, run, ks=ks, started=started)


def _count_run(model: str, data_dir: PathLike, split: str, **details) -> dict:
    """The ``run`` record of a count baseline, in ``evaluate_ranker``'s layout."""
    return {"model": model, "base_model": None, "zero_shot": False, "use_images": False, "split": split,
            "data_dir": str(Path(data_dir).resolve()), "max_groups": None, **details}


# ----------------------------------------------------------------------------- sequential models
@dataclass
class SequentialSettings:
    """Hyper-parameters of the compact sequential baselines (fixed, not tuned on test).

    Defaults follow the small settings common for ML-100k in the SASRec/GRU4Rec papers and
    RecBole's defaults, scaled down for CPU.
    """

    hidden: int = 64
    max_len: int = 50
    layers: int = 2          # SASRec blocks (GRU4Rec always has one GRU layer)
    heads: int = 1
    dropout: float = 0.2
    epochs: int = 40
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0


@dataclass
class SequentialBaseline:
    """A trained compact baseline: ``model`` (torch module), its kind and settings."""

    kind: str
    model: object
    n_items: int
    settings: SequentialSettings
    seed: int
    losses: List[float] = field(default_factory=list)
    seconds: float = 0.0


def _build_module(kind: str, n_items: int, s: SequentialSettings):
    import torch
    from torch import nn

    class _SASRec(nn.Module):
        """Causal self-attention over item embeddings + learned positions (compact SASRec)."""

        def __init__(self):
            super().__init__()
            self.items = nn.Embedding(n_items + 1, s.hidden, padding_idx=0)
            self.positions = nn.Embedding(s.max_len, s.hidden)
            layer = nn.TransformerEncoderLayer(s.hidden, s.heads, dim_feedforward=s.hidden, dropout=s.dropout,
                                               batch_first=True, norm_first=True, activation="gelu")
            self.encoder = nn.TransformerEncoder(layer, s.layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(s.hidden)
            self.drop = nn.Dropout(s.dropout)

        def forward(self, sequence: torch.Tensor) -> torch.Tensor:
            length = sequence.shape[1]
            positions = torch.arange(length, device=sequence.device)
            x = self.drop(self.items(sequence) * math.sqrt(s.hidden) + self.positions(positions))
            causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=sequence.device), diagonal=1)
            # Sequences are right-padded, so the causal mask alone keeps every real position to
            # real, earlier items; padding outputs are never read.
            x = self.encoder(x, mask=causal)
            return self.norm(x)

    class _GRU4Rec(nn.Module):
        """A GRU over item embeddings (compact GRU4Rec, full-softmax next-item training)."""

        def __init__(self):
            super().__init__()
            self.items = nn.Embedding(n_items + 1, s.hidden, padding_idx=0)
            self.drop = nn.Dropout(s.dropout)
            self.gru = nn.GRU(s.hidden, s.hidden, num_layers=1, batch_first=True)
            self.out = nn.Linear(s.hidden, s.hidden)

        def forward(self, sequence: torch.Tensor) -> torch.Tensor:
            hidden, _ = self.gru(self.drop(self.items(sequence)))
            return self.out(hidden)

    if kind == "sasrec":
        return _SASRec()
    if kind == "gru4rec":
        return _GRU4Rec()
    raise ValueError(f"kind must be one of {SEQUENTIAL_KINDS}, got {kind!r}")


def _right_pad(sequences: Sequence[Sequence[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Each sequence's last ``length`` items, right-padded with 0, and how many are real."""
    out = np.zeros((len(sequences), length), dtype=np.int64)
    lengths = np.zeros(len(sequences), dtype=np.int64)
    for i, sequence in enumerate(sequences):
        tail = list(sequence)[-length:]
        out[i, :len(tail)] = tail
        lengths[i] = len(tail)
    return out, lengths


def train_sequential_baseline(
    kind: str,
    data_dir: PathLike,
    seed: int = 0,
    *,
    split: str = "test",
    settings: Optional[SequentialSettings] = None,
    progress: bool = False,
) -> SequentialBaseline:
    """Train a compact SASRec or GRU4Rec on the events available before ``split``.

    Each user's training-time sequence (:func:`training_events`) gives one training example:
    inputs are the items but the last, targets the items shifted by one; the loss is the full
    softmax cross-entropy over the catalogue at every real position.

    Parameters
    ----------
    kind : {"sasrec", "gru4rec"}
    data_dir : path
        Output of ``prepare_dataset`` (``events/``, ``items/`` and the splits).
    seed : int
        Seeds initialisation, dropout and batch order.
    split : str
        The split that will be scored; its targets (and later ones) are held out.
    settings : SequentialSettings, optional
    progress : bool
        Show a tqdm bar over epochs.

    Returns
    -------
    SequentialBaseline

    Examples
    --------
    >>> baseline = train_sequential_baseline("sasrec", "data/ml100k", seed=0)  # doctest: +SKIP
    >>> sequential_scores(baseline, "data/ml100k")["score"]  # doctest: +SKIP
    """
    import torch

    if kind not in SEQUENTIAL_KINDS:
        raise ValueError(f"kind must be one of {SEQUENTIAL_KINDS}, got {kind!r}")
    settings = settings or SequentialSettings()
    started = time.time()
    data_dir = Path(data_dir)
    items = read_prepared(data_dir / "items", "items table")
    n_items = int(items["item_id"].max())
    events = training_events(data_dir, split)
    sequences = [group["item_id"].to_numpy() for _, group in events.groupby("user_id", sort=True)]
    sequences = [s for s in sequences if len(s) >= 2]
    if not sequences:
        raise ValueError(f"{data_dir}: no user has two training-time events; nothing to train {kind} on")
    padded, _ = _right_pad(sequences, settings.max_len + 1)
    inputs, targets = torch.from_numpy(padded[:, :-1]), torch.from_numpy(padded[:, 1:])

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = _build_module(kind, n_items, settings)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    losses: List[float] = []
    model.train()
    for _ in tqdm(range(settings.epochs), desc=f"train {kind}", disable=not progress):
        order = rng.permutation(len(inputs))
        total, count = 0.0, 0
        for start in range(0, len(order), settings.batch_size):
            batch = torch.from_numpy(order[start:start + settings.batch_size])
            x, y = inputs[batch], targets[batch]
            hidden = model(x)
            real = (y > 0) & (x > 0)  # a target with an item before it
            logits = hidden[real] @ model.items.weight.T
            logits[:, 0] = float("-inf")  # never predict padding
            loss = torch.nn.functional.cross_entropy(logits, y[real])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * int(real.sum())
            count += int(real.sum())
        losses.append(total / max(count, 1))
    model.eval()
    return SequentialBaseline(kind, model, n_items, settings, int(seed), losses, round(time.time() - started, 2))


def sequential_scores(baseline: SequentialBaseline, data_dir: PathLike, split: str = "test",
                      batch_size: int = 256) -> pd.DataFrame:
    """Score every row of ``split``: the history's last hidden state · the candidate's embedding.

    The history is the row's ``history_item_ids`` (the user's items before the target), the
    same history the MLLM ranker's user summary is built from.

    Returns
    -------
    DataFrame
        group_id, user_id, item_id, label, target_position, score, in file order.
    """
    import torch

    rows = split_rows(data_dir, split)
    if "history_item_ids" not in rows.columns:
        raise ValueError(f"{Path(data_dir) / split}: rows lack history_item_ids")
    too_big = rows["item_id"].to_numpy() > baseline.n_items
    if too_big.any():
        raise ValueError(f"{Path(data_dir) / split}: item_id {int(rows.loc[too_big, 'item_id'].iloc[0])} is beyond "
                         f"the {baseline.n_items} items the {baseline.kind} model was trained with")
    histories = [list(h) if h is not None else [] for h in rows["history_item_ids"]]
    empty = [i for i, h in enumerate(histories) if not h]
    if empty:
        raise ValueError(f"{Path(data_dir) / split}: row {empty[0]} (user {int(rows['user_id'].iloc[empty[0]])}) "
                         "has an empty history; the sequential baselines need at least one item")
    padded, lengths = _right_pad(histories, baseline.settings.max_len)
    padded, last_index = torch.from_numpy(padded), torch.from_numpy(lengths - 1)
    candidates = torch.as_tensor(rows["item_id"].to_numpy(np.int64))
    scores = np.empty(len(rows), dtype=np.float64)
    model = baseline.model
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            stop = start + batch_size
            hidden = model(padded[start:stop])
            last = hidden[torch.arange(hidden.shape[0]), last_index[start:stop]]
            scores[start:stop] = (last * model.items(candidates[start:stop])).sum(-1).double().numpy()
    out = rows[ROW_COLUMNS].copy()
    out["score"] = scores
    return out


def evaluate_sequential(kind: str, data_dir: PathLike, out_json: PathLike, seed: int = 0, *,
                        split: str = "test", settings: Optional[SequentialSettings] = None,
                        ks: Iterable[int] = DEFAULT_KS, progress: bool = False) -> dict:
    """Train a compact ``kind`` baseline with ``seed`` and write its metrics on ``split``.

    The JSON layout is ``evaluate_ranker``'s; ``run`` adds the settings, the per-epoch loss
    and ``"implementation": "compact"`` (not RecBole).
    """
    started = time.time()
    baseline = train_sequential_baseline(kind, data_dir, seed, split=split, settings=settings, progress=progress)
    table = sequential_scores(baseline, data_dir, split)
    run = {"model": kind, "implementation": "compact re-implementation (merlin_mllm.baselines), not RecBole",
           "base_model": None, "zero_shot": False, "use_images": False, "split": split,
           "data_dir": str(Path(data_dir).resolve()), "max_groups": None, "seed": int(seed),
           "settings": asdict(baseline.settings), "train_seconds": baseline.seconds,
           "epoch_loss": [round(v, 4) for v in baseline.losses]}
    return evaluate_scores(table, out_json, run, ks=ks, started=started)
